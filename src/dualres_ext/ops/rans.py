"""rANS entropy coding (csrc/rans).

Tables use CompressAI's layout: cdfs int32 [T, W] (row t holds a CDF from 0 to 1 << precision in
its first cdf_lengths[t] entries), cdf_lengths int32 [T], offsets int32 [T]; symbol s with table t
codes value s - offsets[t], values outside the table are escaped (bypass coded), so any int32
symbol round-trips.

The wrappers convert their arguments (lists and numpy arrays to int32 tensors, bytes to uint8
tensors) and check what the kernels are never reached with (devices, Python types, lane counts).
The kernels check dtypes, table and symbol/index shapes, index ranges and every stream byte, and
raise TypeError/ValueError naming the argument (csrc/rans/cpu/rans_ops.cpp, csrc/rans/cuda).

Tracing (torch.library fake kernels, below): decoders give int32 tensors shaped like their
indexes; encoders and the embedding conversions give a CPU byte tensor whose length depends on
the data (an unbacked size, ``new_dynamic_size``). ``rans_stream_info`` has no fake kernel: it
returns Python integers read from the stream's header (metadata, not a tensor), which a trace
cannot know; call it outside compiled code. Coding is an inference-time, host-side step in any
case (the wrappers return ``bytes``), so these fakes serve export and opcheck rather than speed.
"""

from __future__ import annotations

import torch

from ..cache import TensorCache
from .args import int32_tensor, int_arg, stream_tensor

__all__ = [
    "rans_encode",
    "rans_decode",
    "rans_stream_info",
    "rans_encode_batch",
    "rans_decode_batch",
    "rans_embed",
    "rans_restore",
    "stream_kind",
    "rans_encode_compat",
    "rans_decode_compat",
    "rans_decode_compat_stream",
]

_ops = torch.ops.dualres_ext


# ---- torch.library fake kernels --------------------------------------------------------------


def _stream_fake():
    """A native or CompressAI stream: CPU bytes (CUDA encoders copy theirs back), length unknown."""
    return torch.empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


def _symbols_fake(indexes):
    """Decoded symbols: int32, shaped like the indexes, on their device."""
    return indexes.new_empty(indexes.shape, dtype=torch.int32)


@torch.library.register_fake("dualres_ext::rans_encode")
def _rans_encode_fake(symbols, indexes, cdfs, cdf_lengths, offsets, lanes):
    return _stream_fake()


@torch.library.register_fake("dualres_ext::rans_decode")
def _rans_decode_fake(data, indexes, cdfs, cdf_lengths, offsets):
    return _symbols_fake(indexes)


@torch.library.register_fake("dualres_ext::rans_embed")
def _rans_embed_fake(data, symbols, precision):
    return _stream_fake()


@torch.library.register_fake("dualres_ext::rans_restore")
def _rans_restore_fake(data, symbols, precision):
    return _stream_fake()


@torch.library.register_fake("dualres_ext::rans_encode_compat")
def _rans_encode_compat_fake(symbols, indexes, cdfs, cdf_lengths, offsets):
    return _stream_fake()


@torch.library.register_fake("dualres_ext::rans_decode_compat")
def _rans_decode_compat_fake(data, indexes, cdfs, cdf_lengths, offsets):
    return _symbols_fake(indexes)


@torch.library.register_fake("dualres_ext::rans_decode_compat_stream")
def _rans_decode_compat_stream_fake(data, state, indexes, cdfs, cdf_lengths, offsets):
    return _symbols_fake(indexes)  # `state` is updated in place (the schema's Tensor(a!))


@torch.library.register_fake("dualres_ext::rans_encode_batch")
def _rans_encode_batch_fake(symbols, indexes, cdfs, cdf_lengths, offsets, lanes):
    return [_stream_fake() for _ in symbols]


@torch.library.register_fake("dualres_ext::rans_decode_batch")
def _rans_decode_batch_fake(data, indexes, cdfs, cdf_lengths, offsets):
    return [_symbols_fake(i) for i in indexes]


def _tables(cdfs, cdf_lengths, offsets, allow_cuda: bool = False):
    return (
        int32_tensor(cdfs, "cdfs", allow_cuda),
        int32_tensor(cdf_lengths, "cdf_lengths", allow_cuda),
        int32_tensor(offsets, "offsets", allow_cuda),
    )


def _same_device(device, **tensors):
    # A kernel is chosen by the device of its tensors; mixing devices is refused before dispatch.
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but the symbols/indexes are on {device}: all tensors must be on one device"
            )


def _lanes_arg(lanes) -> int:
    """None (the coder chooses: 0 for the kernels) or an explicit count >= 1; a non-int is a
    TypeError and a count below 1 a ValueError (the kernels read 0 as "choose")."""
    if lanes is None:
        return 0
    lanes = int_arg(lanes, "lanes")
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    return lanes


def rans_encode(symbols, indexes, cdfs, cdf_lengths, offsets, lanes=None) -> bytes:
    """Encode int32 ``symbols`` with tables ``cdfs[indexes]`` into the native multi-lane stream.

    ``lanes=None`` lets the encoder choose (about one lane per 16k symbols, at most 64, fewer when
    the payload is small); an explicit count is capped at the symbol count and at 65536. The
    decoder handles any lane count with any number of threads.

    CUDA tensors (all on one device; CUDA builds) are encoded on the GPU into the very same bytes
    as the CPU coder would write for the same lane count; the stream comes back to the host.
    """
    symbols = int32_tensor(symbols, "symbols", allow_cuda=True)
    indexes = int32_tensor(indexes, "indexes", allow_cuda=True)
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    _same_device(symbols.device, indexes=indexes, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    lanes = _lanes_arg(lanes)
    return _ops.rans_encode(symbols, indexes, cdfs, cdf_lengths, offsets, lanes).numpy().tobytes()


def rans_decode(data, indexes, cdfs, cdf_lengths, offsets) -> torch.Tensor:
    """Decode a native stream; returns int32 symbols shaped like ``indexes``.

    Raises ValueError when the stream is malformed, truncated, corrupt or made for other indexes.
    With ``indexes`` on a CUDA device (CUDA builds; tables on the same device) the symbols are
    decoded on the GPU and returned there; ``data`` may stay on the host.
    """
    data = stream_tensor(data, allow_cuda=True)
    indexes = int32_tensor(indexes, "indexes", allow_cuda=True)
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    _same_device(indexes.device, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    if data.device.type != "cpu":
        _same_device(indexes.device, data=data)
    return _ops.rans_decode(data, indexes, cdfs, cdf_lengths, offsets)


def rans_stream_info(data) -> dict:
    """The header of a native stream (csrc/rans/FORMAT.md), validated like the decoder does it
    (magic, version, field ranges, lane lengths against the size, CRC-32C); ValueError otherwise.

    Returns ``{"precision", "states_per_lane", "symbols", "lanes", "lane_bytes"}`` (``lane_bytes``:
    each lane's payload size). Useful to check what an encoder chose without decoding, and to
    tell a native stream from a CompressAI one (:func:`is_native_stream`).
    """
    info = _ops.rans_stream_info(stream_tensor(data))
    return {
        "precision": info[0],
        "states_per_lane": info[1],
        "symbols": info[2],
        "lanes": info[3],
        "lane_bytes": list(info[4:]),
    }


_STREAM_KINDS = {0: None, 1: "multilane", 2: "interleaved"}


def stream_kind(data):
    """Which native stream ``data`` is, by the decoders' header and CRC-32C checks (the formats are
    defined in C++ only, csrc/rans): ``"multilane"`` (:func:`rans_encode`'s), ``"interleaved"``
    (:mod:`.rans_interleaved`'s) or None (anything else, e.g. a CompressAI stream, which passes
    a check only by accident: magic and version 2^-24, then the fields and a CRC-32C)."""
    return _STREAM_KINDS[_ops.rans_stream_kind(stream_tensor(data))]


def is_native_stream(data) -> bool:
    """Whether ``data`` is a well-formed native multi-lane stream: its header and CRC-32C pass the
    checks of :func:`rans_stream_info` (the format is defined in C++ only: csrc/rans/rans_stream.h).

    A CompressAI stream starts with its final rANS state, so it passes only by accident (magic
    and version: 2^-24, then the header fields and a CRC-32C over the rest)."""
    return _ops.rans_stream_kind(stream_tensor(data)) == 1


def rans_encode_batch(symbols, indexes, cdfs, cdf_lengths, offsets, lanes=None) -> list:
    """:func:`rans_encode` of several tensors sharing one set of tables: ``symbols[k]`` with
    ``indexes[k]`` gives stream k (bytes). On CUDA all streams are coded in the same kernel
    launches (one synchronisation for the whole batch); on the CPU it is a loop."""
    symbols, indexes = list(symbols), list(indexes)
    if len(symbols) != len(indexes):
        raise ValueError(f"symbols and indexes must be lists of the same length, got {len(symbols)} and {len(indexes)}")
    if not symbols:
        return []
    pairs = [
        (int32_tensor(s, "symbols", allow_cuda=True), int32_tensor(i, "indexes", allow_cuda=True))
        for s, i in zip(symbols, indexes)
    ]
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    device = pairs[0][0].device
    for k, (s, i) in enumerate(pairs):
        _same_device(device, **{f"symbols[{k}]": s, f"indexes[{k}]": i})
    _same_device(device, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    lanes = _lanes_arg(lanes)
    if device.type == "cpu":
        outs = [_ops.rans_encode(s, i, cdfs, cdf_lengths, offsets, lanes) for s, i in pairs]
    else:
        outs = _ops.rans_encode_batch([s for s, _ in pairs], [i for _, i in pairs], cdfs, cdf_lengths, offsets, lanes)
    return [o.numpy().tobytes() for o in outs]


def rans_decode_batch(data, indexes, cdfs, cdf_lengths, offsets) -> list:
    """:func:`rans_decode` of several streams sharing one set of tables; a list of int32 tensors
    shaped like ``indexes[k]``. On CUDA one launch decodes every lane of every stream."""
    data, indexes = list(data), list(indexes)
    if len(data) != len(indexes):
        raise ValueError(f"data and indexes must be lists of the same length, got {len(data)} and {len(indexes)}")
    if not data:
        return []
    data = [stream_tensor(d, allow_cuda=True) for d in data]
    indexes = [int32_tensor(i, "indexes", allow_cuda=True) for i in indexes]
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    device = indexes[0].device
    for k, i in enumerate(indexes):
        _same_device(device, **{f"indexes[{k}]": i})
        if data[k].device.type != "cpu":
            _same_device(device, **{f"data[{k}]": data[k]})
    _same_device(device, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    if device.type == "cpu":
        return [_ops.rans_decode(d, i, cdfs, cdf_lengths, offsets) for d, i in zip(data, indexes)]
    return list(_ops.rans_decode_batch(data, indexes, cdfs, cdf_lengths, offsets))


def rans_embed(data, symbols: int, precision: int = 16) -> bytes:
    """The embedded form of a native stream (csrc/rans/FORMAT.md, "Embedded streams"): without
    the bytes a container that checksums its contents and knows the stream's symbol count and
    precision can supply itself (magic, version, precision, CRC-32C, symbol count; 8 to 17 bytes).

    The stream is validated as a decoder would (ValueError), and must hold ``symbols`` symbols
    coded at ``precision``: :func:`rans_restore` rebuilds it, byte for byte, from those two.
    """
    data = stream_tensor(data)
    return _ops.rans_embed(data, int_arg(symbols, "symbols"), int_arg(precision, "precision")).numpy().tobytes()


def rans_restore(data, symbols: int, precision: int = 16) -> bytes:
    """The native stream an embedded one (:func:`rans_embed`) came from, ready for
    :func:`rans_decode`. Untrusted input is fine: a malformed embedded stream raises ValueError
    (as the decoder would), and a corrupt payload is left for the decoder to find; the CRC-32C
    written here protects nothing, the container's checksum has to."""
    data = stream_tensor(data)
    return _ops.rans_restore(data, int_arg(symbols, "symbols"), int_arg(precision, "precision")).numpy().tobytes()


def rans_encode_compat(symbols, indexes, cdfs, cdf_lengths, offsets) -> bytes:
    """Encode exactly as CompressAI 1.2.8's ``RansEncoder.encode_with_indexes`` (16-bit tables)."""
    symbols = int32_tensor(symbols, "symbols")
    indexes = int32_tensor(indexes, "indexes")
    return _ops.rans_encode_compat(symbols, indexes, *_tables(cdfs, cdf_lengths, offsets)).numpy().tobytes()


# The compat decoder's prepared tables per cdfs tensor, following the three table tensors (as the
# interleaved coder's): building the lookup cost 5% of decoding the benchmark's 768x512 latent,
# and callers pass the same tables for every latent.
_compat_prepared: TensorCache[torch.ScriptObject] = TensorCache()


def _compat_tables(cdfs, cdf_lengths, offsets) -> torch.ScriptObject:
    """The prepared-table handle of the compat decoder (RansCompatTables): cached by the identity
    and version of table tensors, built for this call from anything else (lists, arrays,
    inference tensors, which have no version counter)."""

    def prepare():
        return _ops.rans_compat_prepare(*_tables(cdfs, cdf_lengths, offsets))

    sources = (cdfs, cdf_lengths, offsets)
    if not all(isinstance(t, torch.Tensor) and not t.is_inference() for t in sources):
        return prepare()
    return _compat_prepared.get(cdfs, (cdf_lengths, offsets), prepare)


_DEQUANTIZED = (torch.float32, torch.float64)


def rans_decode_compat(data, indexes, cdfs, cdf_lengths, offsets, *, means=None, dtype=None) -> torch.Tensor:
    """Decode a CompressAI stream (whole stream); int32 symbols shaped like ``indexes``.

    With ``means`` (float32/float64, CPU, as many elements as ``indexes``) or ``dtype``
    (float32/float64), the decoder writes CompressAI's dequantised values instead, in the same
    pass: ``symbols.to(means.dtype) + means`` (the means' dtype wins) or ``symbols.to(dtype)``.
    Tables given as tensors are prepared once (cached while the tensors are neither replaced nor
    written in place; a write the version counter misses, through ``.data`` or numpy, leaves the
    earlier tables in use) for every call with at least as many symbols as table entries or with
    ``means``/``dtype``; other calls prepare only the rows they use, which costs them less than
    preparing every row would."""
    data = stream_tensor(data)
    indexes = int32_tensor(indexes, "indexes")
    if means is not None:
        if not isinstance(means, torch.Tensor) or means.dtype not in _DEQUANTIZED:
            what = means.dtype if isinstance(means, torch.Tensor) else type(means).__name__
            raise TypeError(f"means must be a float32 or float64 tensor, got {what}")
    elif dtype is not None:
        if dtype not in _DEQUANTIZED:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    elif not isinstance(cdfs, torch.Tensor) or indexes.numel() < cdfs.numel():
        return _ops.rans_decode_compat(data, indexes, *_tables(cdfs, cdf_lengths, offsets))
    return _ops.rans_decode_compat_prepared(data, indexes, _compat_tables(cdfs, cdf_lengths, offsets), means, dtype)


def rans_decode_compat_stream(
    data: torch.Tensor, state: torch.Tensor, indexes, cdfs, cdf_lengths, offsets
) -> torch.Tensor:
    """Decode the next ``indexes.numel()`` symbols of a CompressAI stream.

    ``state`` is an int64 tensor [2] = (byte position, rANS state), updated in place; start with
    zeros. ``data`` must be a uint8 tensor (kept by the caller between calls).
    """
    # The op's schema would answer a non-tensor with a RuntimeError; dtype and size are the kernel's.
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a uint8 tensor (kept between calls), got {type(data).__name__}")
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be an int64 tensor [2], got {type(state).__name__}")
    indexes = int32_tensor(indexes, "indexes")
    return _ops.rans_decode_compat_stream(data, state, indexes, *_tables(cdfs, cdf_lengths, offsets))
