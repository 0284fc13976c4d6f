"""Interleaved rANS stream, version 2 (csrc/rans/FORMAT.md, "Interleaved stream, version 2").

Thin, checked wrappers over ``torch.ops.dualres_ext.rans_iv_*``. W (1, 2, 4, 8, 16 or 32) rANS
states share one stream of 16-bit words, laid out for SIMD registers and CUDA warps (16 and 32;
the narrower widths keep short streams short, each state costing 4 bytes); ``groups`` cuts the
symbols into independently decodable groups (threads), ``chained=True`` makes them split points
of one encoder chain instead of separately encoded groups (same bytes per group).

Tables use CompressAI's layout (cdfs int32 [T, W], cdf_lengths [T], offsets [T]); values outside
a table are escaped, so every int32 symbol round-trips. Tables are prepared once
(:func:`prepare_tables`, an opaque handle) and cached by identity when passed as tensors.
"""

from __future__ import annotations

import torch

from ..cache import TensorCache
from .args import int32_tensor, int_arg, stream_tensor

_ops = torch.ops.dualres_ext

WIDTHS = (1, 2, 4, 8, 16, 32)
# width="auto": the widest W whose start states (4 bytes per state and group) cost at most this
# fraction of the stream's words -- the same budget as the multi-lane stream's automatic lane count.
AUTO_STATE_BUDGET = 0.0025

ISAS = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2, "warp": 3}
_ISA_NAMES = {v: k for k, v in ISAS.items()}


def _isa(isa) -> int:
    if isinstance(isa, str):
        if isa not in ISAS:
            raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
        return ISAS[isa]
    raise TypeError(f"isa must be a string, got {type(isa).__name__}")


def _bounded(value, name: str, lo: int, hi: int) -> int:
    value = int_arg(value, name)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


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
    cdfs = int32_tensor(cdfs, "cdfs", True).cpu()
    cdf_lengths = int32_tensor(cdf_lengths, "cdf_lengths", True).reshape(-1).cpu()
    offsets = int32_tensor(offsets, "offsets", True).reshape(-1).cpu()
    return Tables(_ops.rans_iv_prepare(cdfs, cdf_lengths, offsets))


# Prepared tables per cdfs tensor, following the three table tensors: preparing costs more than
# coding a small latent, and callers pass the same tables for every slice.
_prepared: TensorCache[Tables] = TensorCache()


def _tables(cdfs, cdf_lengths, offsets, tables) -> Tables:
    if tables is not None:
        if not isinstance(tables, Tables):
            raise TypeError(f"tables must come from prepare_tables, got {type(tables).__name__}")
        if cdfs is not None or cdf_lengths is not None or offsets is not None:
            raise ValueError("pass either tables= or cdfs, cdf_lengths and offsets, not both")
        return tables
    if cdfs is None or cdf_lengths is None or offsets is None:
        raise ValueError("cdfs, cdf_lengths and offsets (or tables=) are required")
    sources = (cdfs, cdf_lengths, offsets)
    if not all(isinstance(t, torch.Tensor) and not t.is_inference() for t in sources):
        return prepare_tables(cdfs, cdf_lengths, offsets)  # lists, or tensors without a version counter
    return _prepared.get(cdfs, (cdf_lengths, offsets), lambda: prepare_tables(cdfs, cdf_lengths, offsets))


def encode(
    symbols,
    indexes,
    cdfs=None,
    cdf_lengths=None,
    offsets=None,
    *,
    tables=None,
    width=32,
    groups: int = 1,
    chained: bool = False,
    isa: str = "auto",
) -> bytes:
    """Encode int32 ``symbols`` with tables ``cdfs[indexes]`` into an interleaved stream.

    ``width``: interleaved states, 1, 2, 4, 8, 16 or 32 (32 = one CUDA warp; 16 and 32 run on the
    CPU's vector units), or "auto": the widest whose start states cost at most 0.25% of the coded
    words (:data:`AUTO_STATE_BUDGET`), found by coding with 32 and, for a short stream, once more
    narrower; a rule of the bytes alone, so every device writes the same stream. ``groups``:
    independently decodable groups (capped at the number of W-symbol steps); each costs
    4*width bytes of states and a few bytes of length. Groups are encoded in parallel unless
    ``chained``, where they are split points of one encoder chain (Recoil-style: saved states
    and word offsets). ``isa``: "auto", "scalar", "avx2", "avx512" or "warp" (the CUDA warp
    body emulated on the host); all write the same bytes. CUDA symbols/indexes (CUDA builds)
    are coded by the warp kernel (one warp per group) into the same bytes; the stream comes
    back to the host.
    """
    symbols, indexes = int32_tensor(symbols, "symbols", True), int32_tensor(indexes, "indexes", True)
    if symbols.device != indexes.device:
        raise ValueError(f"symbols ({symbols.device}) and indexes ({indexes.device}) must be on one device")
    if symbols.shape != indexes.shape:
        raise ValueError(
            f"symbols and indexes must have the same shape, got {tuple(symbols.shape)} and {tuple(indexes.shape)}"
        )
    auto = isinstance(width, str)
    if auto and width != "auto":
        raise ValueError(f'width must be "auto" or one of {WIDTHS}, got {width!r}')
    if not auto:
        width = _bounded(width, "width", 1, 32)
        if width not in WIDTHS:
            raise ValueError(f"width must be one of {WIDTHS} or 'auto', got {width}")
    groups = _bounded(groups, "groups", 1, 1 << 16)
    tb = _tables(cdfs, cdf_lengths, offsets, tables)

    def run(w: int) -> torch.Tensor:
        return _ops.rans_iv_encode(symbols, indexes, tb.handle, w, groups, bool(chained), _isa(isa))

    out = run(32 if auto else width)
    if auto:
        info = _ops.rans_iv_stream_info(out)
        word_bytes, states = 2 * sum(info[5:]), info[4]
        fit = [w for w in WIDTHS if 4 * w * states <= AUTO_STATE_BUDGET * word_bytes]
        narrow = fit[-1] if fit else 1
        if narrow != 32:
            out = run(narrow)
    return out.numpy().tobytes()


def decode(data, indexes, cdfs=None, cdf_lengths=None, offsets=None, *, tables=None, isa: str = "auto") -> torch.Tensor:
    """Decode an interleaved stream; int32 symbols shaped like ``indexes``. Any malformed,
    truncated or corrupt stream (or one made for other indexes/tables) raises ValueError.
    With CUDA ``indexes`` (CUDA builds) one warp decodes each group and the symbols stay there."""
    data = stream_tensor(data)
    indexes = int32_tensor(indexes, "indexes", True)
    tb = _tables(cdfs, cdf_lengths, offsets, tables)
    return _ops.rans_iv_decode(data, indexes, tb.handle, _isa(isa))


def decode_deferred(data, indexes, cdfs=None, cdf_lengths=None, offsets=None, *, tables=None):
    """:func:`decode` that does not wait for a GPU: ``(symbols, status)``, with ``status`` one int32
    per group (0 = decoded) on the indexes' device. With CUDA ``indexes`` (CUDA builds) the header
    is checked on the host, the stream goes up in one non-blocking copy and one warp decodes each
    group; the symbols of a bad stream are then wrong until :func:`check_statuses` reads its
    status, which it does for many streams at once. On the CPU a bad stream raises at once."""
    data = stream_tensor(data)
    indexes = int32_tensor(indexes, "indexes", True)
    tb = _tables(cdfs, cdf_lengths, offsets, tables)
    return _ops.rans_iv_decode_deferred(data, indexes, tb.handle)


def check_statuses(statuses) -> None:
    """Raises ValueError if a status of :func:`decode_deferred` is not 0: one read from the device
    for all of them."""
    if not statuses:
        return
    codes = torch.cat([s.reshape(-1) for s in statuses]).cpu()
    bad = torch.nonzero(codes)
    if bad.numel():
        raise ValueError(
            f"rans_iv_decode: corrupt stream, or indexes or tables other than the encoder's "
            f"(status {int(codes[bad[0, 0]])} in {bad.numel()} of {codes.numel()} groups)"
        )


def stream_info(data) -> dict:
    """The validated header of an interleaved stream (CRC included): precision, width, chained,
    symbols, groups and each group's word count."""
    info = _ops.rans_iv_stream_info(stream_tensor(data))
    return {
        "precision": info[0],
        "width": info[1],
        "chained": bool(info[2]),
        "symbols": info[3],
        "groups": info[4],
        "group_words": list(info[5:]),
    }


def is_stream(data) -> bool:
    """Whether ``data`` is a well-formed interleaved stream: its header and CRC-32C pass the
    checks of :func:`stream_info` (the format is defined in C++ only)."""
    return _ops.rans_stream_kind(stream_tensor(data)) == 2


def embed(data, symbols: int, precision: int = 16) -> bytes:
    """The embedded form of an interleaved stream (FORMAT.md, "Embedded interleaved streams"): without
    its magic, version, precision, CRC-32C and symbol count, which a container that checksums its
    contents and knows ``symbols`` and ``precision`` supplies. Validates ``data`` like a decoder."""
    symbols, precision = int_arg(symbols, "symbols"), int_arg(precision, "precision")
    return _ops.rans_iv_embed(stream_tensor(data), symbols, precision).numpy().tobytes()


def restore(data, symbols: int, precision: int = 16) -> bytes:
    """The stream :func:`embed` was given, byte for byte, from its embedded form; untrusted
    input is refused with ValueError (header checks; the decoder checks the rest)."""
    symbols, precision = int_arg(symbols, "symbols"), int_arg(precision, "precision")
    return _ops.rans_iv_restore(stream_tensor(data), symbols, precision).numpy().tobytes()


@torch.library.register_fake("dualres_ext::rans_iv_embed")
def _embed_fake(data, symbols, precision):
    return torch.empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


@torch.library.register_fake("dualres_ext::rans_iv_restore")
def _restore_fake(data, symbols, precision):
    return torch.empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


def isa() -> dict:
    """``{"active": the coder "auto" uses, "best": the best this CPU supports}`` (DUALRES_RANS_ISA
    = scalar/avx2/avx512 lowers "active")."""
    active, best = _ops.rans_iv_isa()
    return {"active": _ISA_NAMES[active], "best": _ISA_NAMES[best]}


def supported_isas() -> list:
    best = ISAS[isa()["best"]]
    return [name for name, v in ISAS.items() if name != "auto" and (v <= best or name == "warp")]
