"""Interleaved rANS stream, version 2 (csrc/rans/FORMAT.md, "Interleaved stream, version 2").

Thin, checked wrappers over ``torch.ops.dualres_ext.rans_iv_*``. W (16 or 32) rANS states share
one stream of 16-bit words, laid out for SIMD registers and CUDA warps; ``groups`` cuts the
symbols into independently decodable groups (threads), ``chained=True`` makes them split points
of one encoder chain instead of separately encoded groups (same bytes per group).

Tables use CompressAI's layout (cdfs int32 [T, W], cdf_lengths [T], offsets [T]); values outside
a table are escaped, so every int32 symbol round-trips. Tables are prepared once
(:func:`prepare_tables`, an opaque handle) and cached by identity when passed as tensors.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from . import _C  # noqa: F401

_ops = torch.ops.dualres_ext

ISAS = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2, "warp": 3}
_ISA_NAMES = {v: k for k, v in ISAS.items()}


def _cuda_built() -> bool:
    return "cuda=1" in _ops.build_info()


def _int32(x, name: str, allow_cuda: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise TypeError(f"{name} must be a tensor, array or list of integers: {e}") from None
        if x.numel() == 0:
            x = x.to(torch.int32)
    if x.device.type != "cpu" and not (allow_cuda and x.device.type == "cuda" and _cuda_built()):
        raise ValueError(f"{name} must be on the CPU{' or a CUDA device' if allow_cuda else ''} (this build: "
                         f"{'with' if _cuda_built() else 'without'} CUDA), got {x.device}")
    if x.dtype == torch.int32:
        return x
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    if x.numel() and (int(x.min()) < -(2**31) or int(x.max()) >= 2**31):
        raise ValueError(f"{name} has values outside the int32 range")
    return x.to(torch.int32)


def _stream(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"data must be a uint8 tensor or bytes-like, got a {data.dtype} tensor")
        if data.device.type != "cpu":
            raise ValueError(f"data must be on the CPU, got {data.device}")
        return data.reshape(-1).contiguous()
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raise TypeError(f"data must be bytes, bytearray, memoryview or a uint8 tensor, got {type(data).__name__}")


def _isa(isa) -> int:
    if isinstance(isa, str):
        if isa not in ISAS:
            raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
        return ISAS[isa]
    raise TypeError(f"isa must be a string, got {type(isa).__name__}")


def _int_arg(v, name, lo, hi=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


class Tables:
    """Prepared tables (an opaque native handle): pass as ``tables=`` to :func:`encode`/:func:`decode`."""

    __slots__ = ("handle", "num_tables", "precision")

    def __init__(self, handle):
        self.handle = handle
        self.num_tables = int(handle.num_tables())
        self.precision = int(handle.precision())

    def __repr__(self):
        return f"Tables(num_tables={self.num_tables}, precision={self.precision})"


def prepare_tables(cdfs, cdf_lengths, offsets) -> Tables:
    """Validates and prepares CompressAI-layout tables once (frequencies, starts, a 256-bucket
    symbol lookup per row). Rows that are not valid CDFs are only an error when an index uses them."""
    cdfs = _int32(cdfs, "cdfs", True).cpu()
    cdf_lengths = _int32(cdf_lengths, "cdf_lengths", True).reshape(-1).cpu()
    offsets = _int32(offsets, "offsets", True).reshape(-1).cpu()
    return Tables(_ops.rans_iv_prepare(cdfs, cdf_lengths, offsets))


_cache_lock = threading.Lock()
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 8


def _key(t):
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None
    return (id(t), version, t.data_ptr(), tuple(t.shape), t.dtype)


def _tables(cdfs, cdf_lengths, offsets, tables) -> Tables:
    if tables is not None:
        if not isinstance(tables, Tables):
            raise TypeError(f"tables must come from prepare_tables, got {type(tables).__name__}")
        if cdfs is not None or cdf_lengths is not None or offsets is not None:
            raise ValueError("pass either tables= or cdfs, cdf_lengths and offsets, not both")
        return tables
    if cdfs is None or cdf_lengths is None or offsets is None:
        raise ValueError("cdfs, cdf_lengths and offsets (or tables=) are required")
    keys = [_key(t) if isinstance(t, torch.Tensor) else None for t in (cdfs, cdf_lengths, offsets)]
    if any(k is None for k in keys):
        return prepare_tables(cdfs, cdf_lengths, offsets)
    key = tuple(keys)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit[1]
    prepared = prepare_tables(cdfs, cdf_lengths, offsets)
    with _cache_lock:
        # The tensors are kept alive with their handle, so their ids cannot be reused meanwhile;
        # an in-place change bumps the version counter and misses.
        _cache[key] = ((cdfs, cdf_lengths, offsets), prepared)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return prepared


def encode(symbols, indexes, cdfs=None, cdf_lengths=None, offsets=None, *, tables=None, width: int = 32,
           groups: int = 1, chained: bool = False, isa: str = "auto") -> bytes:
    """Encode int32 ``symbols`` with tables ``cdfs[indexes]`` into an interleaved stream.

    ``width``: interleaved states (16 or 32; 32 = one CUDA warp). ``groups``: independently
    decodable groups (capped at the number of W-symbol steps); each costs 4*width bytes of states
    and a few bytes of length. Groups are encoded in parallel unless ``chained``, where they are
    split points of one encoder chain (Recoil-style: saved states and word offsets). ``isa``:
    "auto", "scalar", "avx2", "avx512" or "warp" (the CUDA warp body emulated on the host); all
    write the same bytes. CUDA symbols/indexes (CUDA builds) are coded by the warp kernel
    (one warp per group) into the same bytes; the stream comes back to the host.
    """
    symbols, indexes = _int32(symbols, "symbols", True), _int32(indexes, "indexes", True)
    if symbols.device != indexes.device:
        raise ValueError(f"symbols ({symbols.device}) and indexes ({indexes.device}) must be on one device")
    if symbols.shape != indexes.shape:
        raise ValueError(f"symbols and indexes must have the same shape, got {tuple(symbols.shape)} "
                         f"and {tuple(indexes.shape)}")
    width = _int_arg(width, "width", 16, 32)
    if width not in (16, 32):
        raise ValueError(f"width must be 16 or 32, got {width}")
    groups = _int_arg(groups, "groups", 1, 1 << 16)
    tb = _tables(cdfs, cdf_lengths, offsets, tables)
    out = _ops.rans_iv_encode(symbols, indexes, tb.handle, width, groups, bool(chained), _isa(isa))
    return out.numpy().tobytes()


def decode(data, indexes, cdfs=None, cdf_lengths=None, offsets=None, *, tables=None, isa: str = "auto") -> torch.Tensor:
    """Decode an interleaved stream; int32 symbols shaped like ``indexes``. Any malformed,
    truncated or corrupt stream (or one made for other indexes/tables) raises ValueError.
    With CUDA ``indexes`` (CUDA builds) one warp decodes each group and the symbols stay there."""
    data = _stream(data)
    indexes = _int32(indexes, "indexes", True)
    tb = _tables(cdfs, cdf_lengths, offsets, tables)
    return _ops.rans_iv_decode(data, indexes, tb.handle, _isa(isa))


def stream_info(data) -> dict:
    """The validated header of an interleaved stream (CRC included): precision, width, chained,
    symbols, groups and each group's word count."""
    info = _ops.rans_iv_stream_info(_stream(data))
    return {"precision": info[0], "width": info[1], "chained": bool(info[2]), "symbols": info[3],
            "groups": info[4], "group_words": list(info[5:])}


def isa() -> dict:
    """``{"active": the coder "auto" uses, "best": the best this CPU supports}`` (DUALRES_RANS_ISA
    = scalar/avx2/avx512 lowers "active")."""
    active, best = _ops.rans_iv_isa()
    return {"active": _ISA_NAMES[active], "best": _ISA_NAMES[best]}


def supported_isas() -> list:
    best = ISAS[isa()["best"]]
    return [name for name, v in ISAS.items() if name != "auto" and (v <= best or name == "warp")]
