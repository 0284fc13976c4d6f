"""The DualRes container: a header, the coded sections and a checksum (docs/BITSTREAM.md).

Pure bytes: no torch, no model. ``pack`` writes a version-5 (or -4, -3) stream of already coded
sections, ``parse_header`` checks a stream (magic, version, lengths, checksum, fields) and splits
it; both are fuzzed on their own. In short (little-endian, versions 3 to 5, which differ only in
how the decoder computes the entropy parameters and in the rANS layout of the sections)::

    magic "\\x89DRX" | version u8 | config id u8 | flags u8 | quality f32 | weights id u32 |
    width-1 u16 | height-1 u16 | section count u8 | section lengths (LEB128) |
    sections (z, y_H slices, y_L slices) | CRC-32 of everything before it (u32)

Anything malformed raises :class:`BitstreamError` (a ``ValueError``).
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Optional

MAGIC = b"\x89DRX"
# 5: as 4, with the sections in the interleaved rANS layout (csrc/rans/FORMAT.md): the same
#    symbols and entropy parameters, read with SIMD units or GPU warps.
# 4: the entropy parameters are computed by integer networks (models/exact.py): exact on every
#    machine. Same layout as 3; the weights id covers the integer networks.
# 3: compact header and embedded rANS sections (docs/BITSTREAM.md): ~80 bytes less per photo.
# 2: the entropy parameters are computed in float64 (docs/BITSTREAM.md, "Determinism"); still read.
# Version 1 streams used float32 there; a float64 decoder would desynchronise on some of them, so
# they are refused.
VERSION = 5
_READ_VERSIONS = (2, 3, 4, 5)
_WRITE_VERSIONS = (3, 4, 5)
# Configuration ids written in the header (0: any other configuration, identified by weights id).
CONFIG_IDS = {"custom": 0, "compact": 1, "paper": 2}
_CONFIG_NAMES = {v: k for k, v in CONFIG_IDS.items()}

FLAG_GREY = 0x01  # the input was greyscale: decode returns one channel
FLAG_CUDA = 0x02  # encoded on a CUDA device (decode on the same kind of device)
FLAG_COMPAT = 0x04  # (versions 3-5) sections are CompressAI single-lane strings (a lanes=None model)
FLAG_METADATA = 0x08  # (versions 3-5) the last section holds the picture's metadata (EXIF, ICC profile, XMP)
_KNOWN_FLAGS = {
    2: FLAG_GREY | FLAG_CUDA,
    3: FLAG_GREY | FLAG_CUDA | FLAG_COMPAT | FLAG_METADATA,
    4: FLAG_GREY | FLAG_CUDA | FLAG_COMPAT | FLAG_METADATA,
    5: FLAG_GREY | FLAG_CUDA | FLAG_COMPAT | FLAG_METADATA,
}

# Entries of the metadata section: tag byte, LEB128 length, bytes; each tag at most once.
# Readers skip tags they do not know, so new kinds of metadata need no new version.
METADATA_TAGS = {"exif": 1, "icc_profile": 2, "xmp": 3}
_METADATA_NAMES = {v: k for k, v in METADATA_TAGS.items()}

_HEAD_V2 = struct.Struct("<4sBBBBfIIIH")  # magic version config flags reserved quality wid width height n
_HEAD = struct.Struct("<4sBBBfIHHB")  # magic version config flags quality wid width-1 height-1 n
_CRC = struct.Struct("<I")
MAX_SIDE = 1 << 16  # largest width/height the container accepts


class BitstreamError(ValueError):
    """A DualRes bitstream is malformed: wrong magic, unknown version, truncated, corrupted."""


class ImageTooLargeError(BitstreamError):
    """More pixels than the limit (``max_pixels``): declared by a bitstream's header (decode), or
    in the image given to encode (whose stream the default decoder would refuse)."""


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(data: bytes, pos: int, end: int):
    """(value, next position) of the LEB128 varint at ``pos``: at most 5 bytes (a u32)."""
    value = 0
    for shift in range(0, 35, 7):
        if pos >= end:
            raise BitstreamError("truncated bitstream: section table incomplete")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 1 << 32:
                break
            return value, pos
    raise BitstreamError("malformed section table: a length wider than 32 bits")


def pack_metadata(metadata: dict) -> bytes:
    """The metadata section of ``{"exif": bytes, "icc_profile": bytes, "xmp": bytes}`` (any
    subset; empty values are left out)."""
    unknown = set(metadata) - set(METADATA_TAGS)
    if unknown:
        raise ValueError(f"metadata: unknown entries {sorted(unknown)} (known: {sorted(METADATA_TAGS)})")
    out = bytearray()
    for name, tag in METADATA_TAGS.items():
        value = metadata.get(name)
        if value is None:
            continue
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"metadata[{name!r}] must be bytes, got {type(value).__name__}")
        if len(value) == 0:
            continue
        out.append(tag)
        _put_varint(out, len(value))
        out += bytes(value)
    return bytes(out)


def parse_metadata(section: bytes) -> dict:
    """The entries of a metadata section (:func:`pack_metadata`); unknown tags are skipped."""
    entries, pos = {}, 0
    while pos < len(section):
        tag = section[pos]
        length, pos = _get_varint(section, pos + 1, len(section))
        if pos + length > len(section):
            raise BitstreamError("truncated metadata section")
        name = _METADATA_NAMES.get(tag)
        if name is not None:
            if name in entries:
                raise BitstreamError(f"malformed metadata section: {name} twice")
            entries[name] = section[pos : pos + length]
        pos += length
    return entries


def pack(
    config_id: int,
    flags: int,
    quality: float,
    wid: int,
    width: int,
    height: int,
    sections,
    metadata: Optional[dict] = None,
    version: int = VERSION,
) -> bytes:
    """A version-5 (or ``version=4``, ``3``) stream of already embedded sections (or CompressAI strings,
    FLAG_COMPAT), with a metadata section after them when ``metadata`` holds anything. The two
    versions share the layout; the version tells the decoder which entropy-parameter networks
    the sections were coded with (and ``wid`` must be the id of that version)."""
    if version not in _WRITE_VERSIONS:
        raise ValueError(f"pack writes versions {_WRITE_VERSIONS}, got {version!r}")
    extra = pack_metadata(metadata or {})
    if extra:
        sections, flags = list(sections) + [extra], flags | FLAG_METADATA
    if len(sections) > 255:  # the header's count is a byte (the models have 6 or 8)
        raise ValueError(f"a DualRes bitstream holds at most 255 sections, got {len(sections)}")
    out = bytearray(_HEAD.pack(MAGIC, version, config_id, flags, quality, wid, width - 1, height - 1, len(sections)))
    for section in sections:
        _put_varint(out, len(section))
    for section in sections:
        out += section
    return bytes(out) + _CRC.pack(zlib.crc32(out) & 0xFFFFFFFF)


def parse_header(data) -> dict:
    """Header fields of a DualRes bitstream (checks magic, version, lengths and checksum).

    Returns ``{"version", "config", "config_id", "flags", "grey", "cuda", "quality",
    "weights_id", "width", "height", "sections": [bytes, ...], "metadata": {...}}`` (versions 3-5:
    the coded sections as stored, i.e. embedded rANS streams unless ``flags & FLAG_COMPAT``;
    ``metadata`` the picture's EXIF / ICC profile / XMP bytes when the stream carries them).
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if len(data) < 4 or data[:4] != MAGIC:
        raise BitstreamError("not a DualRes bitstream (wrong magic bytes)")
    if len(data) < 5:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes is shorter than the header")
    version = data[4]
    if version == 1:
        raise BitstreamError(
            "DualRes bitstream version 1 (float32 entropy parameters, not portable "
            "across machines) is no longer read: re-encode the image"
        )
    if version not in _READ_VERSIONS:
        raise BitstreamError(
            f"unsupported DualRes bitstream version {version} (this library reads "
            f"{', '.join(map(str, _READ_VERSIONS))})"
        )
    head_struct = _HEAD_V2 if version == 2 else _HEAD
    if len(data) < head_struct.size + _CRC.size:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes is shorter than the header")
    crc_at = len(data) - _CRC.size
    if version == 2:
        magic, version, config_id, flags, reserved, quality, wid, width, height, n = head_struct.unpack_from(data)
        table_end = head_struct.size + 4 * n
        if len(data) < table_end + _CRC.size:
            raise BitstreamError("truncated bitstream: section table incomplete")
        lengths = struct.unpack_from(f"<{n}I", data, head_struct.size)
    else:
        magic, version, config_id, flags, quality, wid, width, height, n = head_struct.unpack_from(data)
        width, height, reserved = width + 1, height + 1, 0
        lengths, table_end = [], head_struct.size
        for _ in range(n):
            length, table_end = _get_varint(data, table_end, crc_at)
            lengths.append(length)
    end = table_end + sum(lengths)
    if len(data) < end + _CRC.size:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes, expected {end + _CRC.size}")
    if len(data) > end + _CRC.size:
        raise BitstreamError(f"trailing garbage: {len(data) - end - _CRC.size} bytes after the bitstream")
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(data[:end]) & 0xFFFFFFFF != crc:
        raise BitstreamError("corrupted bitstream: checksum mismatch")
    if reserved != 0 or flags & ~_KNOWN_FLAGS[version]:
        raise BitstreamError(f"unknown header flags 0x{flags:02x}/{reserved:02x} (newer writer?)")
    if config_id not in _CONFIG_NAMES:
        raise BitstreamError(f"unknown model configuration id {config_id}")
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise BitstreamError(f"invalid image size {width}x{height}")
    if not math.isfinite(quality) or quality < 0:
        raise BitstreamError(f"invalid quality {quality}")
    sections, pos = [], table_end
    for length in lengths:
        sections.append(data[pos : pos + length])
        pos += length
    metadata = {}
    if flags & FLAG_METADATA:
        if not sections:
            raise BitstreamError("the metadata flag is set but the bitstream has no sections")
        metadata = parse_metadata(sections.pop())
    return {
        "version": version,
        "config": _CONFIG_NAMES[config_id],
        "config_id": config_id,
        "flags": flags,
        "grey": bool(flags & FLAG_GREY),
        "cuda": bool(flags & FLAG_CUDA),
        "quality": quality,
        "weights_id": wid,
        "width": width,
        "height": height,
        "sections": sections,
        "metadata": metadata,
    }


__all__ = [
    "MAGIC",
    "VERSION",
    "CONFIG_IDS",
    "FLAG_GREY",
    "FLAG_CUDA",
    "FLAG_COMPAT",
    "MAX_SIDE",
    "FLAG_METADATA",
    "METADATA_TAGS",
    "BitstreamError",
    "ImageTooLargeError",
    "pack",
    "pack_metadata",
    "parse_header",
    "parse_metadata",
]
