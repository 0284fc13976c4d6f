"""Exact entropy parameters for DualRes: the integer form of its entropy-parameter networks.

Everything between the decoded symbols and each slice's (scale index, mean) -- the hyper synthesis
``h_s`` / ``h_s_up_h``, ``down(ŷ_H)`` (``cond_down_h``), the slice coders (context, parameter and
LRP networks) and the scale-to-index step -- runs on :mod:`dualres_ext.integer` layers, so an
encoder and a decoder compute the same integers on any CPU, GPU and thread count (bitstream
versions 4 and 5, docs/BITSTREAM.md).

Grids (all fixed at conversion, stored in the weights file):

* ``ẑ`` and ``ŷ`` are integers in units of ``2^-latent_bits``: a decoded latent is
  ``symbol + μ`` with ``μ = μ_int * 2^-latent_bits``, so ``ŷ_int = symbol * 2^latent_bits + μ_int``
  (and ``ẑ``, whose medians are float32 values, is ``round(ẑ * 2^latent_bits)``: exact for
  every representable ẑ). The LRP adds ``0.5 tanh`` from a table onto the same grid.
* every hidden activation has one grid per tensor (``act_bits``-bit integers), chosen from
  calibration ranges with a margin; GELU is a table on that grid.
* the scale is an integer in units of ``2^-scale_bits``, and its table index is the number of
  stored thresholds ``T_j = floor(table_j * 2^scale_bits)`` (j < 63) strictly below it.

The float model's weights are unchanged: conversion only adds these buffers
(:func:`convert`), and :class:`ExactCoder` mirrors ``DualRes.decode_latents``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..cache import TensorCache
from ..integer import IntConv, IntLUT, gelu, half_tanh, state_prefixes
from .quantize import quantize_latent

# What the slice loop of the exact path does with one slice: ``step(i, indexes, means)`` gets
# the slice's int32 scale-table indexes and its float64 means (exact multiples of
# 2^-latent_bits) and returns the slice's decoded values ``symbol + mean`` as float64.
ExactStep = Callable[[int, Tensor, Tensor], Tensor]

DEFAULTS = dict(weight_bits=10, act_bits=11, latent_bits=6, scale_bits=12, margin=1.5)
_SLICE_PARTS = ("ctx", "ctx_act", "p1", "p1_act", "p2", "l1", "l1_act", "l2", "l2_act")


class ExactSlices(nn.Module):
    """The integer slice coder of one latent (``_SliceCoder``'s networks, slice by slice)."""

    def __init__(self, slices: Sequence[nn.ModuleDict]):
        super().__init__()
        self.slices = nn.ModuleList(slices)

    @property
    def latent_bound(self) -> int:
        """The bound every layer that reads ŷ clamps it to (ŷ in grid units); read from the
        buffer once (on a GPU every read would wait for the device)."""
        source = self.slices[0]["l1"].in_bound
        return _scalars.get(self, [source], lambda: int(source[-1]))

    def run(
        self,
        features: Tensor,
        extra: Optional[Tensor],
        step: ExactStep,
        table: Tensor,
        latent_bits: int,
        scale_bits: int,
    ) -> Tensor:
        """The slice loop on integers; returns ŷ (float64, exact multiples of 2^-latent_bits).

        Every layer input here is within that layer's bounds by construction (``bounded=True``
        lets the layers skip their own clamps): table outputs and requantised outputs are clamped
        to the grid bound the next layer was converted for, and ŷ is clamped to
        :attr:`latent_bound` (what every reader of ŷ was converted for) where it is made. A layer
        takes its concatenated input as a list and runs its table itself; the hidden activations
        are channels-last (what the CPU kernel reads and writes fastest), the outputs that leave
        the networks (scales, means, the LRP term) NCHW."""
        unit = float(2**latent_bits)
        bound = float(self.latent_bound)
        prepared = _prepared_table(table)
        decoded: List[Tensor] = []  # ŷ of each slice, float64
        decoded_int: List[Tensor] = []  # the same in grid units, clamped, float32 integers
        base = [features] if extra is None else [features, extra]
        for i, nets in enumerate(self.slices):
            h = nets["ctx"](base + decoded_int, True, table=nets["ctx_act"], channels_last=True)
            p = nets["p2"](nets["p1"](h, True, table=nets["p1_act"], channels_last=True), True)
            s = p.size(1) // 2
            indexes = scale_indexes(p[:, :s], prepared, scale_bits)
            means = p[:, s:].double() / unit
            y = step(i, indexes, means).double()
            y_int = torch.round(y * unit)  # exact: symbol * 2^k + μ_int
            lrp_in = [h, y_int.clamp(-bound, bound).float()]
            r = nets["l2"](
                nets["l1"](lrp_in, True, table=nets["l1_act"], channels_last=True), True, table=nets["l2_act"]
            ).double()
            decoded.append(y + r / unit)
            decoded_int.append(y_int.add_(r).clamp_(-bound, bound).float())
        return torch.cat(decoded, 1)


# Python numbers read once from buffers (on a GPU each read waits for the device), keyed on the
# buffers so that a changed buffer is read again.
_scalars: TensorCache = TensorCache()


def _prepared_table(table: Tensor) -> ops.ScaleTable:
    """``table`` validated once, with its first entry as the lower bound."""
    return _scalars.get(table, [table], lambda: ops.ScaleTable(table, float(table[0])))


def scale_indexes(sigma: Tensor, table, scale_bits: int) -> Tensor:
    """The scale table index of integer scales ``sigma`` (float32 integers, grid 2^-scale_bits,
    ``0 <= sigma < 2^24``): the number of thresholds ``T_j = floor(table_j * 2^scale_bits)``,
    ``j < 63``, strictly below ``sigma``. Computed by the native ``build_indexes`` on the exact
    float32 values ``sigma * 2^-scale_bits``: for an integer ``n``, ``table_j < n * 2^-b`` iff
    ``floor(table_j * 2^b) < n``, and float comparisons are exact (the test checks every value).
    ``table``: the float32 scale table, or an ``ops.ScaleTable`` of it prepared once."""
    prepared = table if isinstance(table, ops.ScaleTable) else _prepared_table(table)
    # sigma is a clamped requantised integer: finite and >= 0 by construction, nothing to check.
    return prepared.build_indexes((sigma * (2.0**-scale_bits)).contiguous(), strict=True, checked=False)


def _chain(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    """A Sequential of IntConv / IntLUT layers; a convolution followed by a table runs it itself.
    Inputs after the first are within bounds by construction. Channels-last outputs."""
    layers = list(layers)
    i = 0
    while i < len(layers):
        layer = layers[i]
        follower = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, IntConv) and isinstance(follower, IntLUT):
            x = layer(x, True, table=follower, channels_last=True)
            i += 2
        else:
            x = layer(x, True, channels_last=True) if isinstance(layer, IntConv) else layer(x)
            i += 1
    return x


class ExactCoder(nn.Module):
    """The integer entropy-parameter networks of a DualRes model (made by :func:`convert`, or
    rebuilt from a weights file's state by :meth:`from_state`). ``meta``: int64
    ``[latent_bits, scale_bits, z_bound, weight_bits, act_bits]``; ``thresholds``: int64 (63),
    the scale thresholds; ``index_table``: the float32 scale table they come from."""

    def __init__(
        self,
        meta: Tensor,
        thresholds: Tensor,
        scale_table: Tensor,
        h_s: Sequence[nn.Module],
        h_s_up_h: Sequence[nn.Module],
        cond_down_h: IntConv,
        coder_h: ExactSlices,
        coder_l: ExactSlices,
    ):
        super().__init__()
        self.register_buffer("meta", meta.to(torch.int64))
        self.register_buffer("thresholds", thresholds.to(torch.int64))
        self.register_buffer("index_table", scale_table.to(torch.float32))
        self.h_s = nn.ModuleList(h_s)
        self.h_s_up_h = nn.ModuleList(h_s_up_h)
        self.cond_down_h = cond_down_h
        self.coder_h = coder_h
        self.coder_l = coder_l
        self._check_bounds()

    def _check_bounds(self) -> None:
        """What the layers skip their input clamps for: each layer's input bounds equal the
        clamps of what feeds it (tables: their largest output; convolutions: their clamps)."""

        def out_bound(m) -> torch.Tensor:
            if isinstance(m, IntLUT):
                return m.table.abs().max().to(torch.int64).expand(1)
            return torch.maximum(m.out_low.abs(), m.out_high.abs())

        def check(
            producer_bounds: torch.Tensor, consumer: IntConv, start: int = 0, count: Optional[int] = None
        ) -> None:
            if count is None:
                count = producer_bounds.numel() if producer_bounds.numel() > 1 else consumer.in_bound.numel() - start
            have = consumer.in_bound[start : start + count]
            if not bool((producer_bounds.expand_as(have) <= have).all()):
                raise ValueError("exact networks: a layer's input may exceed its bounds")

        layers = list(self.h_s) + list(self.h_s_up_h)
        for a, b in zip(layers[:-1], layers[1:]):
            if isinstance(b, IntConv):
                check(out_bound(a), b)
        if int(self.cond_down_h.in_bound.max()) != self.coder_h.latent_bound:
            raise ValueError("exact networks: cond_down_h and coder_h disagree on ŷ_H's bound")
        for coder in (self.coder_h, self.coder_l):
            for nets in coder.slices:
                check(out_bound(nets["ctx_act"]), nets["p1"])
                check(out_bound(nets["p1_act"]), nets["p2"])
                check(out_bound(nets["ctx_act"]), nets["l1"], 0, nets["p1"].in_bound.numel())
                check(out_bound(nets["l1_act"]), nets["l2"])
                if int(nets["l1"].in_bound[-1]) != coder.latent_bound:
                    raise ValueError("exact networks: slices disagree on ŷ's bound")
        f_l, f_h = out_bound(self.h_s[-1]), out_bound(self.h_s_up_h[-1])
        for nets in self.coder_h.slices:
            check(f_h, nets["ctx"])
        extra = out_bound(self.cond_down_h)
        for nets in self.coder_l.slices:
            check(f_l, nets["ctx"])
            check(extra, nets["ctx"], f_l.numel())

    def _meta(self) -> List[int]:
        """``meta`` as Python integers, read once (see :data:`_scalars`)."""
        return _scalars.get(self, [self.meta], lambda: [int(v) for v in self.meta.tolist()])

    @property
    def latent_bits(self) -> int:
        return self._meta()[0]

    @classmethod
    def from_state(cls, state: Dict[str, Tensor], prefix: str = "") -> "ExactCoder":
        def layer(p: str) -> nn.Module:
            return IntLUT.from_state(state, p) if p + "table" in state else IntConv.from_state(state, p)

        def slices(p: str) -> ExactSlices:
            return ExactSlices(
                [
                    nn.ModuleDict({n: layer(s + n + ".") for n in _SLICE_PARTS})
                    for s in state_prefixes(state, p + "slices.")
                ]
            )

        return cls(
            state[prefix + "meta"],
            state[prefix + "thresholds"],
            state[prefix + "index_table"],
            [layer(p) for p in state_prefixes(state, prefix + "h_s.")],
            [layer(p) for p in state_prefixes(state, prefix + "h_s_up_h.")],
            IntConv.from_state(state, prefix + "cond_down_h."),
            slices(prefix + "coder_h."),
            slices(prefix + "coder_l."),
        )

    def hyper(self, z_hat: Tensor):
        """Integer hyper features ``(f_h, f_l)`` of the decoded ``ẑ`` (each layer's input within
        its bounds: ẑ clamped here, the rest by the layers before, as in the slice loop)."""
        z_bound = float(self._meta()[2])
        x = torch.round(z_hat.double() * float(2**self.latent_bits)).clamp_(-z_bound, z_bound).float()
        f_l = _chain(self.h_s, x)
        return _chain(self.h_s_up_h, f_l), f_l

    def decode_latents(self, z_hat: Tensor, step_h: ExactStep, step_l: ExactStep):
        """``(ŷ_H, ŷ_L)`` as float64 (exact), as ``DualRes.decode_latents`` but on integers."""
        k = self.latent_bits
        f_h, f_l = self.hyper(z_hat)
        table, b = self.index_table, self._meta()[1]
        y_h = self.coder_h.run(f_h, None, step_h, table, k, b)
        bound = float(self.coder_h.latent_bound)  # = cond_down_h's input bound (checked at construction)
        extra = self.cond_down_h(torch.round(y_h * float(2**k)).clamp_(-bound, bound).float(), True, channels_last=True)
        y_l = self.coder_l.run(f_l, extra, step_l, table, k, b)
        return y_h, y_l


# ---------------------------------------------------------------------------- conversion
@torch.no_grad()
def calibrate(model, images: Sequence[Tensor], qualities: Sequence[float]) -> Dict[str, float]:
    """Largest magnitudes on the entropy-parameter path of ``model`` (its float64 coding
    networks) over ``images`` (each (1, 3, H, W), H and W multiples of 64) at ``qualities``:
    ``{module path: max |output|}`` and ``{module path + ".in": max |input|}`` of every
    convolution, plus ``"y_hat_h"`` and ``"y_hat_l"`` (the decoded latents)."""
    nets = model.coding_nets()
    gc = model.gaussian_conditional
    stats: Dict[str, float] = {}

    def note(key: str, t: Tensor) -> None:
        stats[key] = max(stats.get(key, 0.0), float(t.detach().abs().max()))

    def recorder(y: Tensor, coder, key: str):
        pieces = coder.split(y)

        def step(i, scales, means):
            y_hat = quantize_latent(pieces[i], means, False, gc)
            note(key, y_hat)
            return y_hat

        return step

    def hook(name: str):
        def record(module, inputs, output) -> None:
            note(name, output)
            note(name + ".in", inputs[0])

        return record

    hooks = [
        m.register_forward_hook(hook(name))
        for name, m in nets.named_modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    try:
        for x in images:
            for q in qualities:
                y_h, y_l = model.analysis(x, q)
                z = model.hyper_analysis(y_h, y_l)
                z_hat = quantize_latent(z, model.z_offset(), False, model.entropy_bottleneck).double()
                model.decode_latents(
                    z_hat,
                    recorder(y_h.double(), nets.coder_h, "y_hat_h"),
                    recorder(y_l.double(), nets.coder_l, "y_hat_l"),
                    nets,
                )
    finally:
        for h in hooks:
            h.remove()
    return stats


class LayerGrid(NamedTuple):
    """The integer grids of one converted layer. ``kind``: "conv" (input channel ``i`` in units
    of ``in_scale[i]``), "table" (a GELU table; ``in_scale`` None) or "lrp" (a slice coder's
    ``0.5 tanh`` correction, a table onto the latent grid; ``in_scale`` None). The output,
    channel ``c`` in units of ``out_scale[c]`` (one entry: every channel), is clamped to
    ``[out_low[c], out_high[c]]``."""

    kind: str
    in_scale: Optional[Tensor]
    out_scale: Tensor
    out_low: Tensor
    out_high: Tensor


def _scale_of(peak: float, bits: int, margin: float) -> float:
    """Grid step of a tensor of largest magnitude ``peak``: ``bits``-bit integers cover
    ``margin * peak``."""
    return max(peak, 1e-3) * margin / ((1 << bits) - 1)


@torch.no_grad()
def convert(
    model,
    stats: Dict[str, float],
    scale_table: Tensor,
    weight_bits: int = DEFAULTS["weight_bits"],
    act_bits: int = DEFAULTS["act_bits"],
    latent_bits: int = DEFAULTS["latent_bits"],
    scale_bits: int = DEFAULTS["scale_bits"],
    margin: float = DEFAULTS["margin"],
    grids: Optional[Dict[str, LayerGrid]] = None,
) -> ExactCoder:
    """The :class:`ExactCoder` of a DualRes ``model`` from calibration ``stats`` (:func:`calibrate`).

    ``grids``: if given, filled with the :class:`LayerGrid` of every converted convolution and
    every table nonlinearity, keyed by module path in ``model.coding_nets()`` (what
    :mod:`.fake_quant` rounds to while training)."""
    nets = model.coding_nets()
    record: Dict[str, LayerGrid] = {} if grids is None else grids

    def int_conv(layer, name, in_scale, in_bound, out_scale, low, high) -> IntConv:
        record[name] = LayerGrid("conv", in_scale.clone(), out_scale.clone(), low.clone(), high.clone())
        return IntConv.convert(layer, in_scale, in_bound, out_scale, low, high, weight_bits)

    def gelu_table(name: str, scale: float) -> IntLUT:
        """GELU as a table on one grid (what it reads is what it writes)."""
        record[name] = LayerGrid("table", None, vec(scale, 1), ivec(-q_act, 1), ivec(q_act, 1))
        return IntLUT.tabulate(gelu, scale, q_act, scale, q_act)

    q_act = (1 << act_bits) - 1
    lat = 2.0**-latent_bits

    def lat_bound(key: str) -> int:
        return int(round(stats[key] * margin / lat)) + 1

    def vec(value, n):
        return torch.full((n,), value, dtype=torch.float64)

    def ivec(value, n):
        return torch.full((n,), int(value), dtype=torch.int64)

    def hidden(layer, name, in_scale, in_bound):
        """A conv whose output is a hidden activation: returns (conv, its grid)."""
        s = _scale_of(stats[name], act_bits, margin)
        n = layer.out_channels
        conv = int_conv(layer, name, in_scale, in_bound, vec(s, n), ivec(-q_act, n), ivec(q_act, n))
        return conv, s

    # ẑ on the latent grid.
    z_bound = lat_bound("h_s.0.in")
    z_ch = nets.h_s[0].in_channels
    h_s = []
    scale, bound = vec(lat, z_ch), ivec(z_bound, z_ch)
    for idx in (0, 2):
        conv, s = hidden(nets.h_s[idx], f"h_s.{idx}", scale, bound)
        h_s += [conv, gelu_table(f"h_s.{idx + 1}", s)]
        scale, bound = vec(s, conv.out_low.numel()), ivec(q_act, conv.out_low.numel())
    # f_l: no nonlinearity on the features; h_s_up_h starts with a GELU on them.
    conv, s_fl = hidden(nets.h_s[4], "h_s.4", scale, bound)
    h_s.append(conv)
    m_l = nets.h_s[4].out_channels
    fl_scale, fl_bound = vec(s_fl, m_l), ivec(q_act, m_l)
    up, s_fh = hidden(nets.h_s_up_h[1], "h_s_up_h.1", fl_scale, fl_bound)
    h_s_up_h = [gelu_table("h_s_up_h.0", s_fl), up]
    m_h = nets.h_s_up_h[1].out_channels
    fh_scale, fh_bound = vec(s_fh, m_h), ivec(q_act, m_h)

    yh_bound = lat_bound("y_hat_h")
    cond, s_x = hidden(nets.cond_down_h, "cond_down_h", vec(lat, m_h), ivec(yh_bound, m_h))
    x_scale, x_bound = vec(s_x, m_h), ivec(q_act, m_h)

    table = scale_table.double().cpu()
    thresholds = torch.floor(table[:-1] * 2.0**scale_bits).to(torch.int64)
    sigma_high = int(thresholds[-1]) + 1  # anything above the last threshold is the top index

    def slices(coder, name, base_scale, base_bound, y_bound):
        out = []
        done = 0
        for i, size in enumerate(coder.slices):
            scale = torch.cat([base_scale, vec(lat, done)])
            bound = torch.cat([base_bound, ivec(y_bound, done)])
            ctx, s_h = hidden(coder.context_nets[i][0], f"{name}.context_nets.{i}.0", scale, bound)
            hid = coder.context_nets[i][0].out_channels
            h_scale, h_bound = vec(s_h, hid), ivec(q_act, hid)
            p1, s_p = hidden(coder.param_nets[i][0], f"{name}.param_nets.{i}.0", h_scale, h_bound)
            p_layer = coder.param_nets[i][2]
            mu_bound = lat_bound(f"{name}.param_nets.{i}.2")
            out_scale = torch.cat([vec(2.0**-scale_bits, size), vec(lat, size)])
            low = torch.cat([ivec(0, size), ivec(-mu_bound, size)])
            high = torch.cat([ivec(sigma_high, size), ivec(mu_bound, size)])
            p2 = int_conv(
                p_layer,
                f"{name}.param_nets.{i}.2",
                vec(s_p, p_layer.in_channels),
                ivec(q_act, p_layer.in_channels),
                out_scale,
                low,
                high,
            )
            l_layer = coder.lrp_nets[i][0]
            l1, s_l = hidden(
                l_layer,
                f"{name}.lrp_nets.{i}.0",
                torch.cat([h_scale, vec(lat, size)]),
                torch.cat([h_bound, ivec(y_bound, size)]),
            )
            l2_layer = coder.lrp_nets[i][2]
            l2, s_t = hidden(
                l2_layer, f"{name}.lrp_nets.{i}.2", vec(s_l, l2_layer.in_channels), ivec(q_act, l2_layer.in_channels)
            )
            half = 1 << (latent_bits - 1)
            record[name] = LayerGrid("lrp", None, vec(lat, 1), ivec(-half, 1), ivec(half, 1))
            out.append(
                nn.ModuleDict(
                    {
                        "ctx": ctx,
                        "ctx_act": gelu_table(f"{name}.context_nets.{i}.1", s_h),
                        "p1": p1,
                        "p1_act": gelu_table(f"{name}.param_nets.{i}.1", s_p),
                        "p2": p2,
                        "l1": l1,
                        "l1_act": gelu_table(f"{name}.lrp_nets.{i}.1", s_l),
                        "l2": l2,
                        "l2_act": IntLUT.tabulate(half_tanh, s_t, q_act, lat, half),
                    }
                )
            )
            done += size
        return ExactSlices(out)

    coder_h = slices(nets.coder_h, "coder_h", fh_scale, fh_bound, yh_bound)
    # y_L's coder sees f_l, down(ŷ_H) and ŷ_L[<j].
    coder_l = slices(
        nets.coder_l, "coder_l", torch.cat([fl_scale, x_scale]), torch.cat([fl_bound, x_bound]), lat_bound("y_hat_l")
    )
    meta = torch.tensor([latent_bits, scale_bits, z_bound, weight_bits, act_bits])
    return ExactCoder(meta, thresholds, scale_table.float().cpu(), h_s, h_s_up_h, cond, coder_h, coder_l).eval()
