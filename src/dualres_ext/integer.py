"""Integer networks: convolutions whose results are exact integers on every CPU, GPU and thread count.

After Ballé, Johnston and Minnen, "Integer networks for data compression with latent-variable
models" (ICLR 2019). An entropy model's decoder must derive every symbol's scale index and mean
exactly as the encoder did; floating-point networks cannot promise that (summation order,
instruction sets and convolution algorithms change the last bits). The layers here compute on
integers only:

* **Activations** are integers ``a`` standing for ``a * s`` on a fixed grid ``s`` per channel;
  each layer clamps its input to a fixed bound ``|a_i| <= A_i`` (part of the arithmetic).
* **Weights** are integers: the real weight times its input channel's grid ``s_i``, divided by a
  unit ``u_c`` per output channel and rounded. The bias is an integer in the same unit. So a
  layer's accumulator ``acc_c = b_c + sum w_ci * a_i`` is an integer that stands for ``acc_c * u_c``.
* **Requantisation** to the output grid: ``q = round_half_even(acc * m_c)`` with one float64
  multiply by ``m_c = u_c / s_out_c`` (a float32 value, stored exactly; the product is IEEE
  correctly rounded, hence the same everywhere), then a clamp to the output bounds.
* **Nonlinearities** are lookup tables indexed by the clamped integer (:class:`IntLUT`), computed
  once at conversion and stored: no exp/tanh/erf on the path.

**How the sums stay exact.** On CPU a layer is one native op (:mod:`dualres_ext.ops.int_conv`,
``csrc/integer``): the input, clamped to its bounds, is converted to int16 (the bounds are at most
32767), the weights are int16 (packed once per layer), and every output's ``bias + sum w * a`` is
accumulated in int32 (AVX-512 VNNI, AVX2 or plain C++, chosen at run time): integer arithmetic,
exact whatever the summation order, vector width or thread count -- provided nothing wraps. The op
makes sure of it, on every call: for each output channel, ``|bias|`` plus the largest sum of
``|w| * A_i`` over the taps of one output phase must be below 2^31 (then every partial sum is);
:func:`dualres_ext.ops.int_conv.int16_fits` makes the same check once, to choose the formulation.
Every shipped layer fits. A transposed convolution runs as its ``stride^2`` output phases
(ordinary convolutions of the same input, on the taps congruent to the phase) whose outputs
interleave. The requantisation and the table of the layer that follows (``forward(..., table=)``)
run in the same pass, and the op takes the pieces of a concatenated input as a list. The tests
(``tests/test_int_conv.py``) check it against PyTorch references on inputs and weights at their
extremes, and bit for bit under every kernel set and thread count, in other processes.

A layer the int16 kernel does not take (bounds beyond int16, or sums that could reach 2^31) is an
im2col matrix times the weight matrix computed by ``torch._int_mm`` (int8 x int8 -> int32,
oneDNN), again exact provided nothing saturates or wraps. Two preconditions make sure of it:

* **7-bit digits.** Full-range int8 operands are not safe: oneDNN's kernels for CPUs without
  AVX-512 VNNI (SSE4.1, AVX2, AVX-512 without VNNI, i.e. ``ONEDNN_MAX_CPU_ISA`` below
  ``AVX512_CORE_VNNI``) shift one operand to u8 (``+128``) and add pairs of u8 x s8 products in
  int16 with saturation (``vpmaddubsw``): sums of values in [-128, 127] come out wrong.
  So every operand is split into balanced base-128 digits in [-64, 63] (``a = sum_j d_j 128^j``,
  :func:`split_digits`; the digit counts follow from the stored bounds: :func:`digit_count` of
  ``in_bound`` and of the weights); a pair sum is then at most ``2 * 191 * 64 < 2^15``. The weight
  digits are stacked along the rows, the activation digits along the columns, so one ``_int_mm``
  per layer (per output phase of a transposed one) gives every block ``W_i X_j`` (:func:`gemm_plan`,
  :func:`gemm_accumulate`).
* **int32 blocks.** Any partial sum of a block, with that shift and its compensation, is at most
  ``K * 192 * 64 < 2^31`` for a depth ``K`` (input channels x taps), asserted when the plan is made.

The blocks are recombined by Horner's rule with powers of 128, plus the bias, in int32 as far as
the per-row bound ``sum_k |W_i[m, k]| * sum_j 128^j |a_j|`` allows, otherwise in float64, exact
below 2^53 (the plan refuses a layer whose bound reaches 2^53; :meth:`IntConv.convert` asserts it
too). A transposed convolution is split into its ``stride^2`` output phases, ordinary convolutions
on one shared im2col window of the input, each on the columns of its own taps, whose outputs are
interleaved (a copy, no arithmetic). A weight digit that is zero in most columns gets a GEMM of its
own on its nonzero columns. Such a 1x1 layer (a GEMM of small depth) runs as one float64 GEMM
instead, as below: measured faster on CPU than splitting and recombining digits for it. The tests
(``tests/test_integer_gemm.py``) check the accumulators against float64/int64 references on inputs
and weights at their extremes, and bit for bit under other oneDNN instruction sets (SSE4.1, AVX2,
AVX-512 without VNNI: a control shows those kernels do saturate full-range operands) and ATen CPU
capabilities, in other processes.

Elsewhere (CUDA, or any device without ``_int_mm`` on it; also wherever a plan's precondition
fails) the same integers go through ATen's im2col + GEMM convolution in float64
(``thnn_conv2d`` / ``slow_conv_transpose2d``, no cuDNN, so no Winograd/FFT or TF32 algorithm),
exact below 2^53: the same integers come out, slower (:func:`float64_convolutions` runs them on the
CPU too, as a reference). CUDA's ``_int_mm`` has shape constraints and other kernels; it is not
used. (The state keeps the float32 chunk plan of earlier versions -- ``chunks`` and ``meta``'s
``split_bits`` / ``float64`` -- as part of a weights file's identity; it is no longer used for
running.)
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .cache import TensorCache
from .ops import int_conv as _int16

FLOAT32_EXACT = 1 << 24  # every integer of magnitude <= 2^24 is a float32
FLOAT64_EXACT = 1 << 53  # ... <= 2^53 a float64
DIGIT_BASE = 128  # balanced base-128 digits in [-64, 63] feed the int8 GEMMs
DIGIT_HALF = 64
_SPARSE_DIGIT = 0.5  # a weight digit nonzero in at most this share of the columns: a GEMM of its own

__all__ = [
    "IntConv",
    "IntLUT",
    "float64_convolutions",
    "int16_conv_ok",
    "int8_gemm_ok",
    "quantize_to_grid",
    "FLOAT32_EXACT",
    "FLOAT64_EXACT",
]


_float64_only = False  # set by float64_convolutions()


@contextlib.contextmanager
def float64_convolutions():
    """Within the block, every :class:`IntConv` call runs the float64 convolutions (the formulation
    used off CPU): a reference for tests and benchmarks. Process-wide, not thread-safe."""
    global _float64_only
    saved, _float64_only = _float64_only, True
    try:
        yield
    finally:
        _float64_only = saved


def int16_conv_ok(device: torch.device) -> bool:
    """Whether :class:`IntConv` runs the native int16 kernel (:mod:`dualres_ext.ops.int_conv`) on
    ``device`` for the layers it takes: the CPU."""
    return device.type == "cpu" and not _float64_only


def int8_gemm_ok(device: torch.device) -> bool:
    """Whether :class:`IntConv` computes by int8 GEMMs (``torch._int_mm``, exact for operands in
    ``[-64, 63]`` on every CPU instruction set) on ``device`` for the layers the int16 kernel does
    not take: CPU, where ``_int_mm`` exists and oneDNN is on (without it ``_int_mm`` falls back to
    a loop about 100x slower). Elsewhere it uses the float64 im2col convolutions (the same
    integers)."""
    return not _float64_only and _int8_capable(device)


def _int8_capable(device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
        and _int_mm_on_cpu()
    )


@functools.lru_cache(maxsize=None)
def _int_mm_on_cpu() -> bool:
    """Whether this PyTorch has a CPU ``_int_mm`` (probed once on a tiny product)."""
    try:
        a = torch.tensor([[-64, 63], [5, -7]], dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, a.t().contiguous()), a.int() @ a.int().t()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def quantize_to_grid(x: Tensor, frac_bits: int, bound: int) -> Tensor:
    """``clamp(round_half_even(x * 2^frac_bits), -bound, bound)`` in float64: a tensor of exact
    values (``x`` itself must be computed the same way everywhere, e.g. a dequantised latent)."""
    return torch.round(x.double() * float(2**frac_bits)).clamp_(-bound, bound)


class IntConv(nn.Module):
    """One convolution or transposed convolution on integer activations (module docstring).

    Buffers (all in the state dict, so a weights id covers them): ``weight`` int16 (or int32) in
    the float layer's layout, ``bias`` int64, ``multiplier`` float32 (used in float64), ``in_bound`` int64
    per input channel, ``out_low``/``out_high`` int64 per output channel, ``chunks`` int64 input
    channel boundaries, ``meta`` int64 ``[transposed, stride, padding, output_padding, split_bits,
    float64]`` (``chunks``, ``split_bits`` and ``float64``: the float32 chunk plan of earlier
    versions, kept in the state, unused for running). The packed int16 weights of the native
    kernel, or else the int8 GEMM plan (:func:`gemm_plan`), are derived from the buffers at run
    time, per device, and cached.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        multiplier: Tensor,
        in_bound: Tensor,
        out_low: Tensor,
        out_high: Tensor,
        chunks: Tensor,
        meta: Tensor,
    ):
        super().__init__()
        self.register_buffer("weight", weight if weight.dtype in (torch.int16, torch.int32) else weight.to(torch.int32))
        self.register_buffer("bias", bias.to(torch.int64))
        self.register_buffer("multiplier", multiplier.to(torch.float32))
        self.register_buffer("in_bound", in_bound.to(torch.int64))
        self.register_buffer("out_low", out_low.to(torch.int64))
        self.register_buffer("out_high", out_high.to(torch.int64))
        self.register_buffer("chunks", chunks.to(torch.int64))
        self.register_buffer("meta", meta.to(torch.int64))
        self._config = None
        self._float64 = False

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "IntConv":
        names = ("weight", "bias", "multiplier", "in_bound", "out_low", "out_high", "chunks", "meta")
        return cls(*(state[prefix + n] for n in names))

    # ------------------------------------------------------------------ conversion
    @classmethod
    def convert(
        cls,
        layer: nn.Module,
        in_scale: Tensor,
        in_bound: Tensor,
        out_scale: Tensor,
        out_low: Tensor,
        out_high: Tensor,
        weight_bits: int,
    ) -> "IntConv":
        """The integer form of ``layer`` (``nn.Conv2d`` or ``nn.ConvTranspose2d``, groups 1, no
        dilation): input channel ``i`` on grid ``in_scale[i]`` with ``|a_i| <= in_bound[i]``,
        output channel ``c`` requantised to grid ``out_scale[c]`` and clamped to
        ``[out_low[c], out_high[c]]``; weights of ``weight_bits`` bits (sign included) per output
        channel. Plans the chunks and asserts the exactness bounds."""
        transposed = isinstance(layer, nn.ConvTranspose2d)
        if (
            not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))
            or layer.groups != 1
            or tuple(layer.dilation) != (1, 1)
        ):
            raise ValueError(f"IntConv: a plain Conv2d or ConvTranspose2d, got {layer}")
        (stride, s2), (padding, p2) = layer.stride, layer.padding
        output_padding = layer.output_padding[0] if transposed else 0
        if stride != s2 or padding != p2 or (transposed and layer.output_padding[1] != output_padding):
            raise ValueError("IntConv: square strides and paddings only")
        w = layer.weight.detach().double().cpu()
        b = (
            layer.bias.detach().double().cpu()
            if layer.bias is not None
            else torch.zeros(w.shape[1] if transposed else w.shape[0], dtype=torch.float64)
        )
        in_scale = in_scale.double().cpu()
        in_bound = in_bound.to(torch.int64).cpu()
        out_scale = out_scale.double().cpu()
        # Effective weights act on the integers: w * s_in, per output channel c.
        wc = w.transpose(0, 1) if transposed else w  # (C_out, C_in, k, k)
        eff = wc * in_scale[None, :, None, None]
        top = (1 << (weight_bits - 1)) - 1
        peak = eff.abs().amax(dim=(1, 2, 3))
        unit = torch.where(peak > 0, peak / top, torch.ones_like(peak))
        multiplier = (unit / out_scale).float()  # stored as float32, used in float64
        unit = multiplier.double() * out_scale  # the unit the multiplier implies
        w_int = torch.round(eff / unit[:, None, None, None]).to(torch.int64)
        assert int(w_int.abs().max()) <= top + 1
        b_int = torch.round(b / unit).to(torch.int64)
        # L[c, i]: bound of channel i's contribution to any partial sum of output channel c.
        taps = w_int.abs()
        if transposed and stride > 1:
            k = taps.shape[-1]
            phase = torch.stack(
                [
                    taps[:, :, ry::stride, rx::stride].sum(dim=(2, 3))
                    for ry in range(min(stride, k))
                    for rx in range(min(stride, k))
                ]
            )
            per_input = phase.amax(0)  # (C_out, C_in) bounds of one phase
            # conservative: the largest phase per (c, i); a sum over i of maxima bounds every phase
        else:
            per_input = taps.sum(dim=(2, 3))
        # The stored float32 chunk plan (``chunks``, ``split_bits``, ``float64``): what earlier
        # versions ran, kept in the state so that a conversion gives the same buffers (and weights
        # id); the layers now run what :meth:`_runtime` derives from the buffers. Input
        # channels chunked so each chunk's partial sums stay within 2^24 (the activations split
        # only when one channel alone is too much); a 1x1 layer of more than three chunks or
        # with a split: one float64 convolution.
        amax = int(in_bound.max())
        plan = cls._plan(per_input, in_bound, 0)
        if plan is None:
            plan = cls._plan(per_input, in_bound, max(1, (amax.bit_length() + 1) // 2))
        if plan is None:
            raise ValueError(
                f"IntConv: one input channel alone exceeds 2^24 even split "
                f"(weight_bits={weight_bits}, bound {amax}): use fewer bits"
            )
        split_bits, bounds, load = plan
        use_float64 = layer.weight.shape[-1] == 1 and layer.weight.shape[-2] == 1 and (len(bounds) > 3 or split_bits)
        if use_float64:
            split_bits, bounds = 0, [0, load.shape[1]]
        # Proof obligations: every chunk's partial sums within 2^24 (float32), the whole sum with
        # the bias and the parts' recombination within 2^53 (float64).
        if not use_float64:
            for lo, hi_ in zip(bounds[:-1], bounds[1:]):
                assert int(load[:, lo:hi_].sum(1).amax()) <= FLOAT32_EXACT
        total = (per_input * in_bound[None]).sum(1) + b_int.abs()
        if split_bits:
            total = total + (per_input * (2 << split_bits)).sum(1)  # |hi| * 2^S + |lo| < A + 2^(S+1)
        assert int(total.amax()) < FLOAT64_EXACT
        # The requantised product must be finite and exact to round: |acc * m| < 2^53.
        assert float((total.double() * multiplier.double()).amax()) < FLOAT64_EXACT
        meta = torch.tensor([int(transposed), stride, padding, output_padding, split_bits, int(use_float64)])
        w_int = w_int.to(torch.int16 if top < (1 << 15) else torch.int32)  # stored compactly
        return cls(
            w_int.transpose(0, 1) if transposed else w_int,
            b_int,
            multiplier,
            in_bound,
            out_low.to(torch.int64),
            out_high.to(torch.int64),
            torch.tensor(bounds),
            meta,
        )

    @staticmethod
    def _plan(per_input: Tensor, in_bound: Tensor, split_bits: int):
        """``(split_bits, chunk boundaries, load)``: input channels grouped greedily so that each
        group's bound ``sum_i load[c, i]`` is at most 2^24 for every output channel ``c``, where
        ``load[c, i] = per_input[c, i] * (bound of one part of a_i)``; None if a channel alone is
        too much. With a split, ``hi = floor(a / 2^S)`` has ``|hi| <= ceil(A / 2^S)`` and
        ``0 <= lo < 2^S``."""
        part = in_bound
        if split_bits:
            hi = -(-in_bound // (1 << split_bits))
            part = torch.minimum(torch.clamp(hi, min=(1 << split_bits) - 1), in_bound)
        load = per_input * part[None]
        if int(load.amax()) > FLOAT32_EXACT:
            return None
        bounds, acc = [0], torch.zeros(load.shape[0], dtype=torch.int64)
        for i in range(load.shape[1]):
            if int((acc + load[:, i]).amax()) > FLOAT32_EXACT:
                bounds.append(i)
                acc = torch.zeros_like(acc)
            acc += load[:, i]
        bounds.append(load.shape[1])
        return split_bits, bounds, load

    # ------------------------------------------------------------------ running
    def _settings(self):
        """``(transposed, stride, padding, output_padding)``. The stored float32 chunk plan
        (``chunks``, ``split_bits``, ``float64``) is kept in the state (it is part of a weights
        file's identity) but no longer used for running."""
        if self._config is None:
            t, s, p, op = (int(v) for v in self.meta[:4].tolist())
            self._config = (bool(t), s, p, op)
        return self._config

    def _load_from_state_dict(self, *args, **kwargs):
        self._config = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._config = None
        return super()._apply(fn, *args, **kwargs)

    def _runtime(self):
        """Per-device working copies, cached until a buffer changes: the packed int16 weights of the
        native kernel (CPU, where :func:`dualres_ext.ops.int_conv.int16_fits` takes the layer), else
        the int8 GEMM plan (CPU, :func:`gemm_plan`; None where a precondition fails), float64
        weights (the fallback), and the per-channel vectors shaped (1, C, 1, 1): input bound
        (float32 and float64), bias, multiplier, output bounds (float64)."""
        transposed, stride, padding, output_padding = self._settings()
        device = self.weight.device

        def build():
            view = (1, -1, 1, 1)
            native = None
            # made whatever float64_convolutions() says: the calls choose
            if device.type == "cpu" and _int16.int16_fits(self.weight, self.bias, self.in_bound, transposed, stride):
                native = _int16.pack(self.weight, stride, padding, transposed)
            # A 1x1 layer is a plain GEMM with a small depth: one float64 GEMM (as exact) costs less
            # than splitting and recombining digits (measured on CPU, 1 and 2 threads).
            pointwise = not transposed and stride == 1 and padding == 0 and self.weight.shape[-2:] == (1, 1)
            gemm = None
            if native is None and _int8_capable(device) and not pointwise:
                gemm = gemm_plan(self.weight, self.bias, self.in_bound, transposed, stride, padding, output_padding)
            w64 = self.weight.to(device, torch.float64)
            return {
                "native": native,
                "kernel": int(self.weight.shape[-1]),
                # the output range, for tables indexed by it (Python integers, read once)
                "out_range": (int(self.out_low.min()), int(self.out_high.max())),
                "gemm": gemm,
                "w64": w64,
                "w64_2d": w64.flatten(1) if pointwise else None,
                "bias_col": self.bias.to(device, torch.float64)[:, None],
                "bound32": self.in_bound.to(device, torch.float32).view(view),
                "bound64": self.in_bound.to(device, torch.float64).view(view),
                "bias_flat": self.bias.to(device, torch.float64),
                "mult": self.multiplier.to(device, torch.float64).view(view),
                "low": self.out_low.to(device, torch.float64).view(view),
                "high": self.out_high.to(device, torch.float64).view(view),
                "uniform": (
                    (float(self.out_low[0]), float(self.out_high[0]))
                    if bool((self.out_low == self.out_low[0]).all() and (self.out_high == self.out_high[0]).all())
                    else None
                ),
            }

        return _runtime_cache.get(self, [getattr(self, n) for n in _BUFFERS], build)

    def _native(self, rt: dict, inputs: Sequence[Tensor]) -> bool:
        """Whether this call runs the native int16 kernel."""
        return rt["native"] is not None and all(int16_conv_ok(x.device) for x in inputs)

    def _int16(
        self, rt: dict, inputs: Sequence[Tensor], requantise: bool, table: Optional[Tensor], channels_last: bool
    ):
        transposed, stride, padding, output_padding = self._settings()
        inputs = [x if x.dtype == torch.float32 else x.float() for x in inputs]
        extra = (self.multiplier, self.out_low, self.out_high, table) if requantise else (None, None, None, None)
        return _int16.int_conv(
            inputs,
            rt["native"],
            self.bias,
            self.in_bound,
            *extra,
            kernel_size=rt["kernel"],
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            transposed=transposed,
            channels_last=channels_last,
        )

    def accumulate(self, a: Tensor, bounded: bool = False) -> Tensor:
        """The exact integer accumulator ``bias + conv(clamp(a), weight)`` as float64.
        ``bounded``: the caller guarantees ``|a_i| <= in_bound[i]`` (the clamp may be skipped)."""
        rt = self._runtime()
        if self._native(rt, [a]):
            return self._int16(rt, [a], False, None, False).double()
        return self._accumulate(a, bounded, rt).double()

    def _accumulate(self, a: Tensor, bounded: bool, rt: dict) -> Tensor:
        """:meth:`accumulate` by the int8 GEMMs or the float64 convolutions: int32 where the int8
        GEMM plan bounds it below 2^31, else float64."""
        transposed, stride, padding, output_padding = self._settings()
        gemm = rt["gemm"]
        if gemm is not None and int8_gemm_ok(a.device):
            a = a.float()  # exact: integers (clamped) below 2^24
            if not bounded:
                a = torch.clamp(a, -rt["bound32"], rt["bound32"])
            return gemm_accumulate(gemm, a)
        # float64, im2col + GEMM (no cuDNN): exact below 2^53, the same integers.
        a = a.double()
        if not bounded:
            a = torch.clamp(a, -rt["bound64"], rt["bound64"])
        if rt["w64_2d"] is not None and a.size(0) == 1:  # 1x1: bias + W @ a, one GEMM
            b, c, h, w = a.shape
            return torch.addmm(rt["bias_col"], rt["w64_2d"], a.reshape(c, h * w)).view(1, -1, h, w)
        w = rt["w64"]
        k = list(w.shape[-2:])
        if transposed:
            return torch._C._nn.slow_conv_transpose2d(
                a, w, k, rt["bias_flat"], [stride] * 2, [padding] * 2, [output_padding] * 2, [1, 1]
            )
        return torch._C._nn.thnn_conv2d(a, w, k, rt["bias_flat"], [stride] * 2, [padding] * 2)

    def forward(
        self,
        a,
        bounded: bool = False,
        index_offset: Optional[int] = None,
        table: Optional["IntLUT"] = None,
        channels_last: bool = False,
    ) -> Tensor:
        """Requantised output ``clamp(round_half_even(acc * m), low, high)`` as float32 integers of
        the input ``a`` (a tensor, or a sequence of tensors concatenated along the channels);
        ``bounded``: the caller guarantees the input bounds (the clamp may be skipped). With
        ``index_offset``, the output plus the offset as int32 (the index of an :class:`IntLUT`);
        with ``table`` (an :class:`IntLUT` whose range holds the output's), ``table`` of the output.
        ``channels_last``: the output's memory layout where the native kernel runs (elsewhere
        NCHW); the values do not depend on it."""
        inputs = [a] if isinstance(a, Tensor) else list(a)
        if index_offset is not None and table is not None:
            raise ValueError("IntConv: index_offset or table, not both")
        rt = self._runtime()
        if self._native(rt, inputs):
            low, high = rt["out_range"]
            if table is not None and -table.bound <= low and high <= table.bound:
                return self._int16(rt, inputs, True, table.values(), channels_last)
            out = self._int16(rt, inputs, True, None, channels_last)
            if table is not None:
                return table(out)
            if index_offset is not None:
                return out.add_(float(index_offset)).to(torch.int32)
            return out
        a = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        acc = self._accumulate(a, bounded, rt)
        # One IEEE float64 multiply of the exact accumulator (int32 converted exactly, in the kernel).
        acc = acc.mul_(rt["mult"]) if acc.dtype == torch.float64 else torch.mul(acc, rt["mult"])
        acc = acc.round_()
        if rt["uniform"] is not None:  # one clamp range for every channel: the scalar kernel
            acc = acc.clamp_(*rt["uniform"])
        else:
            acc = torch.clamp(acc, rt["low"], rt["high"])
        if table is not None:
            return table(acc)
        if index_offset is not None:
            return acc.add_(float(index_offset)).to(torch.int32)
        return acc.float()


_BUFFERS = ("weight", "bias", "multiplier", "in_bound", "out_low", "out_high", "chunks", "meta")
_runtime_cache: TensorCache[dict] = TensorCache()


# ---------------------------------------------------------------------------- the int8 GEMM
def digit_count(bound: int) -> int:
    """How many balanced base-128 digits (each in ``[-64, 63]``) represent every integer of
    magnitude at most ``bound``: ``n`` digits cover ``[-64 R, 63 R]`` with ``R = sum_j 128^j``."""
    n, reach = 1, 1
    while 63 * reach < bound:
        n, reach = n + 1, reach * DIGIT_BASE + 1
    return n


def split_digits(x: Tensor, n: int) -> list:
    """``x`` (integers, float32 below 2^24 or any integer dtype) as ``n`` balanced base-128 digits
    ``d_0 .. d_{n-1}``, ``x = sum_j d_j 128^j``, each in ``[-64, 63]`` if ``x`` is within
    :func:`digit_count`'s range (the top digit takes the rest). In ``x``'s dtype; float32 is exact:
    a shift by 64, a power-of-two scaling and a floor of integers below 2^24."""
    digits, rest = [], x
    for _ in range(n - 1):
        if rest.is_floating_point():  # (rest + 64) / 128 = 0.5 + rest / 128: one exact kernel, a floor
            hi = torch.add(_half(rest), rest, alpha=1.0 / DIGIT_BASE).floor_()
        else:
            hi = torch.div(rest + DIGIT_HALF, DIGIT_BASE, rounding_mode="floor")
        digits.append(torch.sub(rest, hi, alpha=DIGIT_BASE))
        rest = hi
    digits.append(rest)
    return digits


def _half(like: Tensor) -> Tensor:
    return torch.tensor(DIGIT_HALF / DIGIT_BASE, dtype=like.dtype, device=like.device)


def gemm_plan(
    weight: Tensor,
    bias: Tensor,
    in_bound: Tensor,
    transposed: bool,
    stride: int,
    padding: int,
    output_padding: int,
) -> Optional[dict]:
    """The int8 GEMM form of one layer (CPU), or None where a precondition of its exactness fails.

    A convolution is ``acc[m, p] = bias[m] + sum_k W[m, k] X[k, p]`` with ``X`` the im2col
    matrix of the input (``k`` = input channel and tap, ``p`` = output pixel). A transposed
    convolution is turned into ``stride^2`` ordinary ones, one per output phase ``(ry, rx)``
    (its taps are the kernel positions congruent to the phase) on one shared window of the input:
    each phase multiplies the window's columns of its own taps, and the phases' outputs are
    interleaved. Weights and activations are split into balanced base-128 digits in ``[-64, 63]``;
    the weight digits are stacked along the rows, the activation digits along the columns, so one
    ``torch._int_mm`` gives every block ``W_i X_j``; they are recombined with powers of 128."""
    w = weight.to(torch.int64).cpu()
    if transposed:
        w = w.transpose(0, 1)  # (C_out, C_in, k, k)
    c_out, c_in, kh, kw = w.shape
    if kh != kw:
        return None
    k = kh
    adigits = digit_count(int(in_bound.max()))
    bias_rows = bias.to(torch.int64).cpu()
    if transposed:
        phases = range(stride)
        shift = {r: [(r + padding - t) // stride for t in range(k) if (r + padding - t) % stride == 0] for r in phases}
        ds = [d for r in phases for d in shift[r]]
        d_min, d_max = min(ds), max(ds)
        window = d_max - d_min + 1
        blocks = []
        for ry in phases:
            for rx in phases:
                wm = torch.zeros(c_out, c_in, window, window, dtype=torch.int64)
                taps = torch.zeros(window, window, dtype=torch.bool)
                for ty in range(k):
                    for tx in range(k):
                        if (ry + padding - ty) % stride or (rx + padding - tx) % stride:
                            continue
                        dy, dx = (ry + padding - ty) // stride - d_min, (rx + padding - tx) // stride - d_min
                        wm[:, :, dy, dx] = w[:, :, ty, tx]
                        taps[dy, dx] = True
                columns = taps.expand(c_in, window, window).flatten().nonzero().flatten()
                blocks.append(_block_plan(wm.flatten(1)[:, columns], columns, bias_rows, in_bound, window, adigits))
    else:
        d_min, window = 0, k
        blocks = [_block_plan(w.flatten(1), torch.arange(c_in * k * k), bias_rows, in_bound, k, adigits)]
    if any(b is None for b in blocks):
        return None
    return {
        "blocks": blocks,  # one per output phase (one for an ordinary convolution), :func:`_block_plan`
        "wdigits": max(b["wdigits"] for b in blocks),
        "adigits": adigits,
        "transposed": transposed,
        "stride": stride,
        "padding": padding,
        "output_padding": output_padding,
        "kernel": k,
        "window": window,
        "d_min": d_min,
        "c_out": c_out,
    }


def _block_plan(
    wm: Tensor, columns: Tensor, bias_rows: Tensor, in_bound: Tensor, window: int, adigits: int
) -> Optional[dict]:
    """The GEMMs of the weight matrix ``wm`` (rows, len(columns)) on the im2col ``columns`` (input
    channel and tap of a ``window`` x ``window`` window), or None if a bound fails."""
    if columns.numel() == 0:  # a phase without taps (kernel smaller than the stride): zeros
        wm, columns = torch.zeros(wm.size(0), 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    rows, depth = wm.shape
    wdigits = digit_count(int(wm.abs().max()))
    # One block W_i X_j: int8 operands in [-64, 63], whatever the instruction set (non-VNNI
    # oneDNN multiplies u8 = s8 + 128 by s8 and adds pairs in int16: 2 * 191 * 64 < 2^15); every
    # partial sum, with that shift and its compensation, below 2^31 in magnitude.
    if depth * 192 * 64 >= 1 << 31:
        return None
    wd = split_digits(wm, wdigits)
    bound_k = in_bound.to(torch.int64).cpu().repeat_interleave(window * window)[columns]  # A of each column
    reach = sum(DIGIT_BASE**j for j in range(adigits - 1))
    a_ext = bound_k + 2 * DIGIT_HALF * reach  # >= sum_j 128^j |a_j| for |a| <= A
    # The blocks are recombined by Horner's rule, first over the activation digits (per weight
    # digit i: Q_i = sum_j 128^j W_i X_j), then over the weight digits, plus the bias; in int32
    # as far as the bounds allow (every partial sum of a stage is bounded by the stage's result
    # bound), the rest in float64 (exact below 2^53).
    q_bound = torch.stack([(d.abs() * a_ext[None]).sum(1) for d in wd])  # (wdigits, rows)
    total = sum(q_bound[i] * DIGIT_BASE**i for i in range(wdigits)) + bias_rows.abs()
    if int(total.amax()) >= FLOAT64_EXACT:
        return None
    int32_stages = 2 if int(total.amax()) < (1 << 31) else 1 if int(q_bound.amax()) < (1 << 31) else 0
    # One GEMM for the weight digits stacked; but a higher digit that is zero in most columns (few
    # weights above 63 in magnitude there) gets a GEMM of its own on the other columns only.
    every = columns.numel() == in_bound.numel() * window * window
    dense, gemms = [], []
    for i, d in enumerate(wd):
        used = (d != 0).any(0).nonzero().flatten()
        if i and used.numel() <= _SPARSE_DIGIT * depth:
            used = used if used.numel() else torch.zeros(1, dtype=torch.int64)
            gemms.append((d[:, used].to(torch.int8).contiguous(), columns[used], [i]))
        else:
            dense.append(i)
    stacked = torch.cat([wd[i] for i in dense]).to(torch.int8).contiguous()
    gemms.insert(0, (stacked, None if every else columns, dense))
    return {
        "gemms": gemms,  # (int8 weight digits stacked (len(digits) * rows, columns), im2col rows or None, digits)
        "bias": bias_rows.to(torch.int32 if int32_stages == 2 else torch.float64)[:, None],
        "wdigits": wdigits,
        "int32_stages": int32_stages,
        "rows": rows,
    }


def gemm_accumulate(plan: dict, a: Tensor) -> Tensor:
    """``bias + conv(a)`` (NCHW; int32 where the plan's bounds allow, else float64) by
    :func:`gemm_plan`'s plan; ``a``: float32 integers within the layer's input bounds."""
    b, c, h, w = a.shape
    s, t = plan["stride"], plan["window"]
    n = plan["adigits"]
    if plan["transposed"]:
        k, p, op = plan["kernel"], plan["padding"], plan["output_padding"]
        ho, wo = (h - 1) * s - 2 * p + k + op, (w - 1) * s - 2 * p + k + op
        qh, qw = -(-ho // s), -(-wo // s)  # outputs per phase (the last ones cropped)
        d_min = plan["d_min"]
        top, left = max(0, -d_min), max(0, -d_min)
        bottom, right = max(0, qh - 1 + d_min + t - h), max(0, qw - 1 + d_min + t - w)
        step, origin = 1, d_min
        gh, gw = qh, qw
    else:
        p = plan["padding"]
        top = left = bottom = right = p
        gh, gw = (h + 2 * p - t) // s + 1, (w + 2 * p - t) // s + 1
        step, origin = s, -p
    hp, wp = h + top + bottom, w + left + right
    # The activation digits, channel first: (C, digit, B, H, W), padded with zeros.
    if top or bottom or left or right:
        buf = torch.zeros((c, n, b, hp, wp), dtype=torch.int8)
    else:
        buf = torch.empty((c, n, b, hp, wp), dtype=torch.int8)
    for j, d in enumerate(split_digits(a, n)):
        buf[:, j, :, top : top + h, left : left + w].copy_(d.transpose(0, 1))  # exact: small integers
    if t == 1 and step == 1 and gh == hp and gw == wp:
        cols = buf.view(c, n * b * hp * wp)
    else:
        y0, x0 = origin + top, origin + left
        cols = buf.as_strided(
            (c, t, t, n, b, gh, gw),
            (n * b * hp * wp, wp, 1, b * hp * wp, hp * wp, step * wp, step),
            y0 * wp + x0,
        ).reshape(c * t * t, n * b * gh * gw)
    accs = [_block_accumulate(block, cols, n, b * gh * gw) for block in plan["blocks"]]
    if plan["transposed"]:
        co = plan["c_out"]
        if len({x.dtype for x in accs}) > 1:
            accs = [x.double() for x in accs]
        acc = torch.stack(accs).view(s, s, co, b, gh, gw).permute(3, 2, 4, 0, 5, 1).reshape(b, co, gh * s, gw * s)
        return acc[:, :, :ho, :wo]
    (acc,) = accs
    rows = acc.size(0)
    if b == 1:
        return acc.view(1, rows, gh, gw)
    return acc.view(rows, b, gh, gw).transpose(0, 1).contiguous()


def _block_accumulate(block: dict, cols: Tensor, n: int, pixels: int) -> Tensor:
    """``bias + W X`` (rows, pixels) of one :func:`_block_plan` on the im2col matrix ``cols``."""
    rows, stages = block["rows"], block["int32_stages"]
    q = [None] * block["wdigits"]
    for w8, used, digits in block["gemms"]:
        x = cols if used is None else cols.index_select(0, used)
        prod = torch._int_mm(w8, x)  # (len(digits) * rows, adigits * pixels), exact int32
        blocks = prod.view(len(digits), rows, n, pixels)
        if stages == 0:
            blocks = blocks.double()
        qs = _horner([blocks[:, :, j] for j in range(n)])  # (len(digits), rows, pixels)
        for i, qi in zip(digits, qs.double() if stages == 1 else qs):
            q[i] = qi
    return _horner(q).add_(block["bias"])


def _horner(digits: list) -> Tensor:
    """``sum_j 128^j digits[j]`` (integers; int32 where the caller's bounds allow, else float64)."""
    out = digits[-1]
    for d in reversed(digits[:-1]):
        out = torch.add(d, out, alpha=DIGIT_BASE)
    return out


class IntLUT(nn.Module):
    """A nonlinearity as a table: ``out = table[clamp(q, -bound, bound) + bound]`` on integers
    (buffer ``table``, int16 or int32, of ``2 * bound + 1`` entries, computed once by :meth:`tabulate`)."""

    def __init__(self, table: Tensor):
        super().__init__()
        if table.dim() != 1 or table.numel() % 2 != 1:
            raise ValueError("IntLUT: a 1-D table of odd length")
        small = table.numel() == 0 or int(table.abs().max()) < (1 << 15)
        self.register_buffer("table", table.to(torch.int16 if small else torch.int32))

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "IntLUT":
        return cls(state[prefix + "table"])

    @classmethod
    def tabulate(cls, fn, in_scale: float, bound: int, out_scale: float, out_bound: Optional[int] = None) -> "IntLUT":
        """``round_half_even(fn(q * in_scale) / out_scale)`` for ``q`` in ``[-bound, bound]``,
        clamped to ``±out_bound``; ``fn`` is evaluated here only (float64), never when coding."""
        q = torch.arange(-bound, bound + 1, dtype=torch.float64)
        out = torch.round(fn(q * in_scale) / out_scale)
        if out_bound is not None:
            out = out.clamp(-out_bound, out_bound)
        assert float(out.abs().max()) < FLOAT32_EXACT
        return cls(out.to(torch.int32))

    @property
    def bound(self) -> int:
        return (self.table.numel() - 1) // 2

    def values(self) -> Tensor:
        """The table as float32 (made once per change of ``table``)."""
        return _runtime_cache.get(self, [self.table], lambda: {"t": self.table.float()})["t"]

    def forward(self, q: Tensor) -> Tensor:
        """``q``: float integers (clamped here), or int32/int64 indexes ``q + bound`` already in range
        (what :meth:`IntConv.forward` gives with ``index_offset=bound``). float32 out, channels-last
        where ``q`` is (what the next :class:`IntConv` reads fastest on CPU)."""
        table = self.values()
        if q.is_floating_point():
            bound = self.bound
            q = q.clamp(-bound, bound).add_(bound).to(torch.int32)
        if q.dim() == 4 and not q.is_contiguous() and q.is_contiguous(memory_format=torch.channels_last):
            nhwc = q.permute(0, 2, 3, 1)  # contiguous: looked up in memory order
            return table.index_select(0, nhwc.reshape(-1)).view(nhwc.shape).permute(0, 3, 1, 2)
        return table.index_select(0, q.reshape(-1)).view(q.shape)


def gelu(x: Tensor) -> Tensor:
    """The exact GELU (erf form, ``nn.GELU()``'s default) in float64, for tables."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def half_tanh(x: Tensor) -> Tensor:
    return 0.5 * torch.tanh(x)


def state_prefixes(state: dict, prefix: str) -> Sequence[str]:
    """The distinct sub-prefixes ``prefix + name + '.'`` present in ``state``, in numeric order."""
    names = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return [prefix + n + "." for n in sorted(names, key=lambda n: (len(n), n))]
