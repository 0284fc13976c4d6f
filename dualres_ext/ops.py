"""Thin, checked wrappers around ``torch.ops.dualres_ext``.

Every public function validates its arguments here (dtype, device, shape, ranges) and raises
``TypeError``/``ValueError`` naming the argument, so that the C++ kernels only ever see
well-formed tensors. The C++ side still checks what it cannot trust (bitstream bytes).
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401

_ops = torch.ops.dualres_ext


def build_info() -> str:
    """The raw build description string of the native library."""
    return _ops.build_info()


# --- rans ---
# rANS entropy coding (csrc/rans). Tables use CompressAI's layout: cdfs int32 [T, W] (row t holds
# a CDF from 0 to 1 << precision in its first cdf_lengths[t] entries), cdf_lengths int32 [T],
# offsets int32 [T]; symbol s with table t codes value s - offsets[t], values outside the table
# are escaped (bypass coded), so any int32 symbol round-trips.

def _int32_tensor(x, name: str) -> torch.Tensor:
    """An int32 CPU tensor from a tensor, numpy array or (nested) list of integers."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except OverflowError:
            raise ValueError(f"{name} has values outside the int32 range") from None
        except (TypeError, ValueError, RuntimeError) as e:
            if "overflow" in str(e).lower():
                raise ValueError(f"{name} has values outside the int32 range") from None
            raise TypeError(f"{name} must be a tensor, array or list of integers: {e}") from None
        if x.numel() == 0:
            x = x.to(torch.int32)
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (CUDA rANS is not built yet), got {x.device}")
    if x.dtype == torch.int32:
        return x
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    if x.numel() and (int(x.min()) < -(2**31) or int(x.max()) >= 2**31):
        raise ValueError(f"{name} has values outside the int32 range")
    return x.to(torch.int32)


def _tables(cdfs, cdf_lengths, offsets):
    cdfs = _int32_tensor(cdfs, "cdfs")
    cdf_lengths = _int32_tensor(cdf_lengths, "cdf_lengths")
    offsets = _int32_tensor(offsets, "offsets")
    if cdfs.dim() != 2:
        raise ValueError(f"cdfs must be 2-D [tables, max_length], got shape {tuple(cdfs.shape)}")
    if cdf_lengths.shape != (cdfs.shape[0],):
        raise ValueError(f"cdf_lengths must have shape ({cdfs.shape[0]},), got {tuple(cdf_lengths.shape)}")
    if offsets.shape != (cdfs.shape[0],):
        raise ValueError(f"offsets must have shape ({cdfs.shape[0]},), got {tuple(offsets.shape)}")
    return cdfs, cdf_lengths, offsets


def _stream_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"data must be a uint8 tensor or bytes-like, got a {data.dtype} tensor")
        if data.device.type != "cpu":
            raise ValueError(f"data must be on the CPU, got {data.device}")
        return data.reshape(-1).contiguous()
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            return torch.empty(0, dtype=torch.uint8)
        # A private writable copy: frombuffer on read-only bytes warns, and callers may reuse buffers.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raise TypeError(f"data must be bytes, bytearray, memoryview or a uint8 tensor, got {type(data).__name__}")


def _symbols_indexes(symbols, indexes):
    symbols = _int32_tensor(symbols, "symbols")
    indexes = _int32_tensor(indexes, "indexes")
    if symbols.shape != indexes.shape:
        raise ValueError(f"symbols and indexes must have the same shape, got {tuple(symbols.shape)} "
                         f"and {tuple(indexes.shape)}")
    return symbols, indexes


def rans_encode(symbols, indexes, cdfs, cdf_lengths, offsets, lanes=None) -> bytes:
    """Encode int32 ``symbols`` with tables ``cdfs[indexes]`` into the native multi-lane stream.

    ``lanes=None`` lets the encoder choose (about one lane per 16k symbols, at most 64, fewer when
    the payload is small); an explicit count is capped at the symbol count and at 65536. The
    decoder handles any lane count with any number of threads.
    """
    symbols, indexes = _symbols_indexes(symbols, indexes)
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    if lanes is None:
        lanes = 0
    elif not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
        raise ValueError(f"lanes must be None or a positive int, got {lanes!r}")
    out = _ops.rans_encode(symbols, indexes, cdfs, cdf_lengths, offsets, lanes)
    return out.numpy().tobytes()


def rans_decode(data, indexes, cdfs, cdf_lengths, offsets) -> torch.Tensor:
    """Decode a native stream; returns int32 symbols shaped like ``indexes``.

    Raises ValueError when the stream is malformed, truncated, corrupt or made for other indexes.
    """
    data = _stream_tensor(data)
    indexes = _int32_tensor(indexes, "indexes")
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    return _ops.rans_decode(data, indexes, cdfs, cdf_lengths, offsets)


def rans_encode_compat(symbols, indexes, cdfs, cdf_lengths, offsets) -> bytes:
    """Encode exactly as CompressAI 1.2.8's ``RansEncoder.encode_with_indexes`` (16-bit tables)."""
    symbols, indexes = _symbols_indexes(symbols, indexes)
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    return _ops.rans_encode_compat(symbols.reshape(-1), indexes.reshape(-1), cdfs, cdf_lengths,
                                   offsets).numpy().tobytes()


def rans_decode_compat(data, indexes, cdfs, cdf_lengths, offsets) -> torch.Tensor:
    """Decode a CompressAI stream (whole stream); int32 symbols shaped like ``indexes``."""
    data = _stream_tensor(data)
    indexes = _int32_tensor(indexes, "indexes")
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    return _ops.rans_decode_compat(data, indexes, cdfs, cdf_lengths, offsets)


def rans_decode_compat_stream(data: torch.Tensor, state: torch.Tensor, indexes, cdfs, cdf_lengths,
                              offsets) -> torch.Tensor:
    """Decode the next ``indexes.numel()`` symbols of a CompressAI stream.

    ``state`` is an int64 tensor [2] = (byte position, rANS state), updated in place; start with
    zeros. ``data`` must be a uint8 tensor (kept by the caller between calls).
    """
    indexes = _int32_tensor(indexes, "indexes")
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    return _ops.rans_decode_compat_stream(data, state, indexes, cdfs, cdf_lengths, offsets)
