"""Entropy coding of quantised tensors with an entropy model's tables: the one coding path of
:mod:`dualres_ext.entropy_models` and of the CompressAI models :mod:`dualres_ext.compat` accelerates.

``lanes`` picks the bitstream an encoder writes:
  * ``None``: CompressAI 1.2.8's single-lane rANS stream, byte-identical to CompressAI;
  * ``"auto"``: the native stream, the interleaved layout (csrc/rans/FORMAT.md, "Interleaved
    stream, version 2") with its width chosen by the stream's size;
  * ``"multilane"`` or an int >= 1: the earlier native multi-lane stream (FORMAT.md, version 1)
    with an automatic or the given lane count.
The layout and its widths or lanes are written in the stream, so decoders need not know them:
the C++ header checks (:func:`dualres_ext.ops.stream_kind`) tell the native streams from a
CompressAI one.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .cache import TensorCache
from .ops import rans_interleaved
from .ops.args import stream_tensor

__all__ = ["check_lanes", "coder_tables", "scale_table", "encode", "decode", "encode_batch", "decode_batch"]

Lanes = Union[None, str, int]
CoderTables = Tuple[Tensor, Tensor, Tensor]

# Each entropy model's coder tables as CPU int32: every compress/decompress reads them, and the
# buffers may live on a GPU. Values keep their source tensors, so a source's address is never reused.
_CODER_TABLES: TensorCache[tuple] = TensorCache()
# Each Gaussian conditional's validated scale table: serial context models build indexes once per
# position, and checking the table every time would cost more than the kernel.
_SCALE_TABLES: TensorCache[ops.ScaleTable] = TensorCache()


def check_lanes(lanes: Lanes) -> Lanes:
    """The ``lanes`` argument of the entropy models (and of compat's): None (CompressAI's
    single-stream format), "auto" (the native interleaved stream), "multilane" or a count >= 1
    (the multi-lane stream). Another string or a count below 1 is a ValueError, another type a
    TypeError (as in :mod:`dualres_ext.ops`)."""
    if lanes is None or lanes in ("auto", "multilane"):
        return lanes
    what = 'lanes must be None (CompressAI stream), "auto" (native stream), "multilane" or an int >= 1'
    if isinstance(lanes, str):
        raise ValueError(f"{what}, got {lanes!r}")
    if isinstance(lanes, bool) or not isinstance(lanes, int):
        raise TypeError(f"{what}, got a {type(lanes).__name__}")
    if lanes < 1:
        raise ValueError(f"{what}, got {lanes!r}")
    return lanes


def coder_tables(model: object, quantized_cdf: Tensor, cdf_length: Tensor, offset: Tensor) -> CoderTables:
    """CPU, contiguous int32 ``(cdf [T, W], cdf_length [T], offset [T])`` of ``model``'s coder
    tables, converted again only when one of the three tensors was replaced or written."""
    sources = (quantized_cdf, cdf_length, offset)

    def build():
        return sources, (
            quantized_cdf.detach().to("cpu", torch.int32).contiguous(),
            cdf_length.detach().reshape(-1).to("cpu", torch.int32).contiguous(),
            offset.detach().reshape(-1).to("cpu", torch.int32).contiguous(),
        )

    return _CODER_TABLES.get(model, sources, build)[1]


def scale_table(model: object, table: Tensor, bound: Tensor) -> ops.ScaleTable:
    """``ops.ScaleTable(table, bound)`` of ``model`` (a Gaussian conditional), validated again only
    when ``table`` or ``bound`` was replaced or written (the ScaleTable keeps both)."""
    return _SCALE_TABLES.get(model, (table, bound), lambda: ops.ScaleTable(table, bound))


def encode(symbols: Tensor, indexes: Tensor, tables: CoderTables, lanes: Lanes) -> bytes:
    """One string: ``symbols`` coded with ``tables[indexes]`` (CPU int32, same shape) in the stream
    ``lanes`` selects (checked by :func:`check_lanes`)."""
    if lanes is None:
        return ops.rans_encode_compat(symbols, indexes, *tables)
    if lanes == "auto":
        return rans_interleaved.encode(symbols, indexes, *tables, width="auto")
    return ops.rans_encode(symbols, indexes, *tables, lanes=None if lanes == "multilane" else lanes)


def decode(
    data,
    indexes: Tensor,
    tables: CoderTables,
    native_only: bool = False,
    means: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """int32 symbols shaped like ``indexes`` from one string of :func:`encode`, any ``lanes``.

    A string that passes a native header check (interleaved, then multi-lane) is decoded as that
    stream and, should that fail, as a CompressAI one (which passes a check only by accident); if
    both fail, the native decoder's error is raised. Any other string is decoded as a CompressAI
    stream, unless ``native_only``: then only native streams are accepted (no CompressAI fallback).

    With ``means`` or ``dtype`` (float32/float64, CPU means of the indexes' shape) the dequantised
    values come back instead, ``ops.dequantize(symbols, means, dtype)``: a CompressAI stream's are
    written by its decoder in the same pass (:func:`dualres_ext.ops.rans_decode_compat`)."""
    dequantized = means is not None or dtype is not None
    data = stream_tensor(data)
    native = _NATIVE_DECODERS.get(ops.stream_kind(data))
    if native is not None:
        try:
            symbols = native(data, indexes, *tables)
        except ValueError as native_error:
            if native_only:
                raise
            try:
                return ops.rans_decode_compat(data, indexes, *tables, means=means, dtype=dtype)
            except ValueError:
                raise native_error from None
        return ops.dequantize(symbols, means, dtype) if dequantized else symbols
    if native_only:
        return ops.rans_decode(data, indexes, *tables)  # refused with the multi-lane header's error
    return ops.rans_decode_compat(data, indexes, *tables, means=means, dtype=dtype)


_NATIVE_DECODERS = {"interleaved": rans_interleaved.decode, "multilane": ops.rans_decode}


def encode_batch(symbols: Tensor, indexes: Tensor, tables: CoderTables, lanes: Lanes) -> List[bytes]:
    """One string per row of ``symbols`` and ``indexes`` (CPU int32, [N, L])."""
    return [encode(symbols[i], indexes[i], tables, lanes) for i in range(symbols.size(0))]


def decode_batch(
    strings: Sequence,
    indexes: Tensor,
    tables: CoderTables,
    native_only: bool = False,
    deferred: Optional[list] = None,
    means: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """int32 [N, L] on the indexes' device: row i decoded from ``strings[i]`` with ``indexes[i]``
    (int32, [N, L]). With ``means`` ([N, L]) or ``dtype``, the dequantised values instead
    (:func:`decode`; CPU indexes, not with ``deferred``).

    ``deferred`` (a list, with ``native_only``): interleaved streams are decoded where the indexes
    are (:func:`~dualres_ext.ops.rans_interleaved.decode_deferred`: on a GPU without waiting for
    it) and their statuses appended to ``deferred``, for the caller to check once with
    :func:`~dualres_ext.ops.rans_interleaved.check_statuses` after many calls. Any other string
    is decoded on the host."""
    if deferred is not None and native_only:
        rows = []
        for i, s in enumerate(strings):
            data = stream_tensor(s)
            if ops.stream_kind(data) == "interleaved":
                symbols, status = rans_interleaved.decode_deferred(data, indexes[i], *tables)
                deferred.append(status)
            else:
                symbols = decode(data, indexes[i].cpu(), tables, native_only).to(indexes.device)
            rows.append(symbols)
        return torch.stack(rows)
    host = indexes.cpu()
    if means is not None or dtype is not None:
        rows = [
            decode(s, host[i], tables, native_only, None if means is None else means[i], dtype)
            for i, s in enumerate(strings)
        ]
    else:
        rows = [decode(s, host[i], tables, native_only) for i, s in enumerate(strings)]
    return (rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)).to(indexes.device)
