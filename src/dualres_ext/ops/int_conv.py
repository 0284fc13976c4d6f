"""Integer convolutions on CPU (csrc/integer): the layers of :class:`dualres_ext.integer.IntConv`.

int16 activations times int16 weights, summed in int32: exact on every CPU, kernel set and thread
count, for layers whose sums cannot leave the int32 range (:func:`int16_fits`; the kernel checks it
again on every call and refuses the others). The weights are packed once (:func:`pack`); a call
takes any number of float32 inputs (integers, concatenated along the channels and clamped to the
layer's input bounds), and gives the requantised outputs, optionally through a lookup table, or the
int32 accumulators. CPU only: other devices use the float64 convolutions of ``integer.py``.

The kernels check their arguments themselves (RuntimeError for types and shapes, ValueError for
values); the wrappers add nothing but Python conveniences.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["pack", "int_conv", "int16_fits", "output_size", "INT16_LIMIT", "INT32_LIMIT"]

_ops = torch.ops.dualres_ext

INT16_LIMIT = (1 << 15) - 1  # the largest input bound: clamped inputs are int16
INT32_LIMIT = 1 << 31  # every accumulator bound strictly below


def int16_fits(weight: Tensor, bias: Tensor, in_bound: Tensor, transposed: bool, stride: int) -> bool:
    """Whether :func:`int_conv` takes this layer (the kernel's own check, made here once): weights
    that fit int16, input bounds in ``[0, 32767]``, and for every output channel ``|bias| +`` the
    largest sum of ``|w| * in_bound`` over the taps of one output phase below 2^31 (then every
    partial sum of the int32 accumulation is too, whatever its order)."""
    w = weight.detach().to("cpu", torch.int64)
    a = in_bound.detach().to("cpu", torch.int64)
    if w.numel() == 0 or int(w.min()) < -(1 << 15) or int(w.max()) > INT16_LIMIT:
        return False
    if a.numel() == 0 or int(a.min()) < 0 or int(a.max()) > INT16_LIMIT:
        return False
    if transposed:
        w = w.transpose(0, 1)  # (C_out, C_in, k, k)
    load = w.abs() * a[None, :, None, None]
    if transposed:  # one output phase: the taps of one residue class (mod stride) per axis
        k = w.shape[-1]
        sums = torch.stack(
            [
                load[:, :, ry::stride, rx::stride].sum((1, 2, 3))
                for ry in range(min(stride, k))
                for rx in range(min(stride, k))
            ]
        ).amax(0)
    else:
        sums = load.sum((1, 2, 3))
    return int((sums + bias.detach().to("cpu", torch.int64).abs()).max()) < INT32_LIMIT


def pack(weight: Tensor, stride: int, padding: int, transposed: bool) -> Tensor:
    """The int16 weight pairs :func:`int_conv` reads, from a ``(C_out, C_in, k, k)`` weight
    (``(C_in, C_out, k, k)`` if ``transposed``) of integers that fit int16."""
    return _ops.int_conv_pack(weight, stride, padding, transposed)


def int_conv(
    inputs: Sequence[Tensor],
    packed: Tensor,
    bias: Tensor,
    in_bound: Tensor,
    multiplier: Optional[Tensor] = None,
    low: Optional[Tensor] = None,
    high: Optional[Tensor] = None,
    table: Optional[Tensor] = None,
    *,
    kernel_size: int,
    stride: int,
    padding: int,
    output_padding: int = 0,
    transposed: bool = False,
    channels_last: bool = False,
    isa: int = -1,
) -> Tensor:
    """``bias + conv(clamp(cat(inputs, 1), ±in_bound))`` in exact int32 sums (``bias``, ``in_bound``:
    int64; ``inputs``: float32 integers, NaN or fractions raise ValueError). With ``multiplier``
    (float32, used in float64), ``low`` and ``high`` (int64): ``clamp(round_half_even(acc *
    multiplier), low, high)`` as float32, or ``table[that + table.numel() // 2]`` with a float32
    ``table``; without: the int32 accumulators. ``channels_last``: the output's memory layout.
    ``isa``: -1 the kernel set in use (``dualres_ext.cpu_kernels``), 0 scalar, 1 AVX2, 2 AVX-512
    VNNI; the results are the same."""
    return _ops.int_conv(
        list(inputs),
        packed,
        bias,
        in_bound,
        multiplier,
        low,
        high,
        table,
        kernel_size,
        stride,
        padding,
        output_padding,
        transposed,
        channels_last,
        isa,
    )


def output_size(size: int, kernel_size: int, stride: int, padding: int, output_padding: int, transposed: bool) -> int:
    """The output height (or width) of an input of ``size``."""
    if transposed:
        return (size - 1) * stride - 2 * padding + kernel_size + output_padding
    return (size + 2 * padding - kernel_size) // stride + 1


# ---- torch.library registrations: fake kernels (tracing, torch.compile, export) ----


@torch.library.register_fake("dualres_ext::int_conv_pack")
def _int_conv_pack_fake(weight, stride, padding, transposed):
    c_out, c_in = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
    k = weight.shape[-1]
    return weight.new_empty((k * k, (c_in + 1) // 2, (c_out + 15) // 16 * 16, 2), dtype=torch.int16)


@torch.library.register_fake("dualres_ext::int_conv")
def _int_conv_fake(
    inputs,
    packed,
    bias,
    in_bound,
    multiplier,
    low,
    high,
    table,
    kernel_size,
    stride,
    padding,
    output_padding,
    transposed,
    channels_last,
    isa,
):
    n, _, h, w = inputs[0].shape
    shape = (
        n,
        bias.shape[0],
        output_size(h, kernel_size, stride, padding, output_padding, transposed),
        output_size(w, kernel_size, stride, padding, output_padding, transposed),
    )
    dtype = torch.float32 if multiplier is not None else torch.int32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return inputs[0].new_empty(shape, dtype=dtype).contiguous(memory_format=fmt)
