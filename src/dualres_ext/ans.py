"""Drop-in replacements for ``compressai.ans`` (CompressAI 1.2.8), backed by dualres_ext's C++ coder.

``RansEncoder``, ``RansDecoder`` and ``BufferedRansEncoder`` take the same positional arguments as
CompressAI's classes and produce the same bytes: ``encode_with_indexes`` is byte-identical, and the
decoders read CompressAI's streams. Differences, all on the side of doing more:

* Arguments may be Python lists (as in CompressAI), numpy arrays or tensors. Decoders return a
  list when ``indexes`` is a list or tuple, otherwise an int32 tensor (numpy array for numpy input).
* 0 and 1 symbols work (CompressAI aborts the process there).
* Malformed or corrupt streams raise ``ValueError`` instead of crashing or returning garbage
  (a whole-stream decode checks that the coder ends in its initial state).
* Each coder object keeps the conversion of the last tables it was given, recognised by the
  identity of the list (or tensor) objects, so a serial context model calling ``decode_stream``
  per position with the same lists converts them once. Do not mutate a table list in place
  between calls (pass a new list instead); tensors written in place are noticed (version counter).
"""

from __future__ import annotations

import numpy as np
import torch

from . import ops
from .ops.args import int32_tensor, stream_tensor

__all__ = ["RansEncoder", "RansDecoder", "BufferedRansEncoder"]


def _int32_1d(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got numpy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64 if x.dtype == np.uint64 else None))
    else:
        try:
            arr = np.asarray(x, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"{name} must be a list of integers: {e}") from None
        t = torch.from_numpy(arr)
    return int32_tensor(t, name).reshape(-1)


def _convert_tables(cdfs, cdf_sizes, offsets):
    sizes = _int32_1d(cdf_sizes, "cdf_sizes")
    offs = _int32_1d(offsets, "offsets")
    if isinstance(cdfs, (torch.Tensor, np.ndarray)):
        table = int32_tensor(torch.as_tensor(cdfs), "cdfs")
        if table.dim() != 2:
            raise ValueError(f"cdfs must be 2-D, got shape {tuple(table.shape)}")
    else:
        rows = list(cdfs)
        try:
            arr = np.asarray(rows, dtype=np.int64)
            if arr.ndim != 2:
                raise ValueError
        except (ValueError, TypeError):
            # Ragged rows: pad to the widest (only the first cdf_sizes[t] entries are read).
            width = max((len(r) for r in rows), default=0)
            arr = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                arr[i, : len(r)] = r
        if len(rows) == 0:
            arr = np.zeros((0, 1), dtype=np.int64)
        table = int32_tensor(torch.from_numpy(arr), "cdfs")
    if sizes.numel() != table.shape[0] or offs.numel() != table.shape[0]:
        raise ValueError(
            f"cdfs has {table.shape[0]} rows but cdf_sizes has {sizes.numel()} and offsets {offs.numel()} entries"
        )
    return table.contiguous(), sizes, offs


def _fingerprint(obj):
    """What must not change for a kept conversion of obj to stay valid: a tensor's version
    counter (in-place writes), a list's length (the documented-as-unsupported in-place growth)."""
    if isinstance(obj, torch.Tensor):
        return obj._version
    return len(obj) if isinstance(obj, (list, tuple)) else None


class _Tables:
    """The converted (cdfs, cdf_lengths, offsets) tensors of the last tables a coder was given:
    serial context models pass the same table lists at every position, and converting them is
    the bulk of a call. Lists and tensors only (numpy arrays are converted every time: they
    have no version counter).

    Holding the objects keeps their ids from being reused, so equal ids mean the same objects."""

    __slots__ = ("_last",)

    def __init__(self):
        self._last = None

    def __call__(self, cdfs, cdf_sizes, offsets):
        if not all(isinstance(t, (list, tuple, torch.Tensor)) for t in (cdfs, cdf_sizes, offsets)):
            return _convert_tables(cdfs, cdf_sizes, offsets)
        prints = tuple(_fingerprint(t) for t in (cdfs, cdf_sizes, offsets))
        last = self._last
        if last is not None and last[0] is cdfs and last[1] is cdf_sizes and last[2] is offsets and last[3] == prints:
            return last[4]
        converted = _convert_tables(cdfs, cdf_sizes, offsets)
        self._last = (cdfs, cdf_sizes, offsets, prints, converted)
        return converted


def _as_result(values: torch.Tensor, like):
    if isinstance(like, (list, tuple)):
        return values.reshape(-1).tolist()
    if isinstance(like, np.ndarray):
        return values.numpy().reshape(np.shape(like))
    return values


def _stream(encoded):
    if isinstance(encoded, str):
        # pybind11 passes CompressAI's str arguments as UTF-8; bytes is what users really hold.
        encoded = encoded.encode("utf-8")
    return stream_tensor(encoded)


class RansEncoder:
    """``compressai.ans.RansEncoder``: ``encode_with_indexes(symbols, indexes, cdfs, cdf_sizes, offsets) -> bytes``."""

    def __init__(self):
        self._tables = _Tables()

    def encode_with_indexes(self, symbols, indexes, cdfs, cdf_sizes, offsets) -> bytes:
        sym = _int32_1d(symbols, "symbols")
        idx = _int32_1d(indexes, "indexes")
        if sym.numel() != idx.numel():
            raise ValueError(f"symbols ({sym.numel()}) and indexes ({idx.numel()}) differ in length")
        return ops.rans_encode_compat(sym, idx, *self._tables(cdfs, cdf_sizes, offsets))


class BufferedRansEncoder:
    """``compressai.ans.BufferedRansEncoder``: collect with ``encode_with_indexes``, then ``flush() -> bytes``.

    Calls may use different tables; the stream equals CompressAI's for the same sequence of calls.
    """

    def __init__(self):
        self._chunks = []  # (symbols, indexes, tables) per call
        self._tables = _Tables()

    def encode_with_indexes(self, symbols, indexes, cdfs, cdf_sizes, offsets) -> None:
        sym = _int32_1d(symbols, "symbols")
        idx = _int32_1d(indexes, "indexes")
        if sym.numel() != idx.numel():
            raise ValueError(f"symbols ({sym.numel()}) and indexes ({idx.numel()}) differ in length")
        # Copies: the caller may reuse its buffers before flush().
        self._chunks.append((sym.clone(), idx.clone(), self._tables(cdfs, cdf_sizes, offsets)))

    def flush(self) -> bytes:
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return ops.rans_encode_compat(
                torch.empty(0, dtype=torch.int32),
                torch.empty(0, dtype=torch.int32),
                torch.zeros(1, 2, dtype=torch.int32),
                torch.full((1,), 2, dtype=torch.int32),
                torch.zeros(1, dtype=torch.int32),
            )
        # Union of the distinct table sets, indexes shifted into it. The chunks hold their tables,
        # so equal storage pointers mean the same (converted once or caller-owned) tensors.
        sets, base, shifted = [], {}, []
        for sym, idx, tabs in chunks:
            k = tuple((t.data_ptr(), tuple(t.shape)) for t in tabs)  # same storage = same tables
            if k not in base:
                base[k] = sum(t[0].shape[0] for t in sets)
                sets.append(tabs)
            shifted.append(idx + base[k] if base[k] else idx)
        if len(sets) == 1:
            cdfs, sizes, offs = sets[0]
        else:
            width = max(t[0].shape[1] for t in sets)
            cdfs = torch.cat([torch.nn.functional.pad(t[0], (0, width - t[0].shape[1])) for t in sets])
            sizes = torch.cat([t[1] for t in sets])
            offs = torch.cat([t[2] for t in sets])
        return ops.rans_encode_compat(torch.cat([c[0] for c in chunks]), torch.cat(shifted), cdfs, sizes, offs)


class RansDecoder:
    """``compressai.ans.RansDecoder``: ``decode_with_indexes``, ``set_stream`` + ``decode_stream``."""

    def __init__(self):
        self._data = None
        self._state = None
        self._tables = _Tables()

    def decode_with_indexes(self, encoded, indexes, cdfs, cdf_sizes, offsets):
        idx = _int32_1d(indexes, "indexes")
        out = ops.rans_decode_compat(_stream(encoded), idx, *self._tables(cdfs, cdf_sizes, offsets))
        return _as_result(out, indexes)

    def set_stream(self, encoded) -> None:
        self._data = _stream(encoded)
        self._state = torch.zeros(2, dtype=torch.int64)

    def decode_stream(self, indexes, cdfs, cdf_sizes, offsets):
        if self._data is None:
            raise ValueError("decode_stream called before set_stream")
        idx = _int32_1d(indexes, "indexes")
        if idx.numel() == 0:
            return _as_result(torch.empty(0, dtype=torch.int32), indexes)
        out = ops.rans_decode_compat_stream(self._data, self._state, idx, *self._tables(cdfs, cdf_sizes, offsets))
        return _as_result(out, indexes)
