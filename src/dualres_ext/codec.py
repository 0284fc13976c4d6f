"""Image codec on the DualRes model: ``encode(image) -> bytes`` and ``decode(bytes) -> image``.

The bitstream container is described in docs/BITSTREAM.md. In short (little-endian)::

    magic "\\x89DRX" | version u8 | config id u8 | flags u8 | reserved u8 | quality f32 |
    weights id u32 | width u32 | height u32 | section count u16 | section lengths u32 ... |
    sections (z, y_H slices, y_L slices) | CRC-32 of everything before it (u32)

Anything malformed raises :class:`BitstreamError` (a ``ValueError``).

Weights: ``weights=None`` loads the package's trained checkpoint
(``dualres_ext/weights/dualres_compact.pt``); a path loads another checkpoint written by
:func:`save_weights`; a ``DualRes`` model object is used as it is (after ``update()``).
Random weights are never used silently.
"""
from __future__ import annotations

import math
import os
import struct
import threading
import warnings
import weakref
import zlib
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import ops

MAGIC = b"\x89DRX"
# 3: compact header and embedded rANS sections (docs/BITSTREAM.md): ~80 bytes less per photo.
# 2: the entropy parameters are computed in float64 (docs/BITSTREAM.md, "Determinism"); still read.
# Version 1 streams used float32 there; a float64 decoder would desynchronise on some of them, so
# they are refused.
VERSION = 3
_READ_VERSIONS = (2, 3)
# Configuration ids written in the header (0: any other configuration, identified by weights id).
CONFIG_IDS = {"custom": 0, "compact": 1, "paper": 2}
_CONFIG_NAMES = {v: k for k, v in CONFIG_IDS.items()}

FLAG_GREY = 0x01     # the input was greyscale: decode returns one channel
FLAG_CUDA = 0x02     # encoded on a CUDA device (decode on the same kind of device)
FLAG_COMPAT = 0x04   # (version 3) sections are CompressAI single-lane strings (a lanes=None model)
_KNOWN_FLAGS = {2: FLAG_GREY | FLAG_CUDA, 3: FLAG_GREY | FLAG_CUDA | FLAG_COMPAT}

_HEAD_V2 = struct.Struct("<4sBBBBfIIIH")   # magic version config flags reserved quality wid width height n
_HEAD = struct.Struct("<4sBBBfIHHB")       # magic version config flags quality wid width-1 height-1 n
_CRC = struct.Struct("<I")
_PRECISION = 16                            # of every coder table the model builds (CompressAI's)
MAX_SIDE = 1 << 16                     # largest width/height the container accepts
# Decompression-bomb guard: decode refuses a header whose width x height exceeds this many pixels
# before any model work or allocation (a forged 65536 x 65536 header would otherwise ask for
# hundreds of GiB). Measured: a 4000x3000 (12 Mpx) decode with the compact model peaks at
# 2.3 GiB RSS, i.e. ~150 bytes per pixel over ~0.55 GiB of torch + model; 2^26 px (67 Mpx,
# e.g. 8192x8192) is then ~10 GiB, while Pillow's 179 Mpx (Image.MAX_IMAGE_PIXELS) would need
# ~26 GiB. Override per call with decode(..., max_pixels=N), process-wide with the environment
# variable DUALRES_MAX_PIXELS or by assigning codec.MAX_PIXELS.
MAX_PIXELS = 1 << 26
MAX_PIXELS_ENV = "DUALRES_MAX_PIXELS"

WEIGHTS_FORMAT = "dualres-weights"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "dualres_compact.pt"


class BitstreamError(ValueError):
    """A DualRes bitstream is malformed: wrong magic, unknown version, truncated, corrupted."""


class ImageTooLargeError(BitstreamError):
    """More pixels than the limit (``max_pixels``): declared by a bitstream's header (decode), or
    in the image given to encode (whose stream the default decoder would refuse)."""


class WeightsNotFoundError(FileNotFoundError):
    """No trained weights are available (the package was built without them)."""


# ---------------------------------------------------------------------------- weights
def save_weights(model, path, metadata: Optional[dict] = None, half: bool = True) -> None:
    """Write ``model`` as a checkpoint ``encode``/``decode`` can load (``weights=path``).

    Parameters are stored in float16 when ``half`` (half the size); buffers stay as they are:
    they are tiny and some are below float16's range (the 1e-9 likelihood bound, GDN's 1e-12
    pedestal would become 0). The entropy
    coder tables are rebuilt from the stored (rounded) parameters and saved with them, so every
    decoder uses the very tables of the encoder, whatever its floating point quirks.
    ``metadata`` (training command, data, steps, ...) is stored as it is.
    """
    from .models import DualRes

    params = {k: v.detach().cpu() for k, v in model.state_dict().items() if not _is_table(k)}
    if half:
        trained = {name for name, _ in model.named_parameters()}
        params = {k: v.half() if v.is_floating_point() and k in trained else v for k, v in params.items()}
    # The model as a decoder will see it: stored parameters, tables built from them.
    ref = DualRes(name=model.name, **model.config)
    _load_params(ref, {k: v.float() if v.is_floating_point() else v for k, v in params.items()}, str(path))
    ref.update(force=True)
    # The factorized prior's tables come from its learnt density (float maths that may round
    # differently elsewhere): store them. The Gaussian tables follow from the scale table alone
    # by a fixed computation (and are ~1 MB): rebuilt at load.
    tables = {k: v.detach().cpu().clone() for k, v in ref.state_dict().items()
              if _is_table(k) and not (k.startswith("gaussian_conditional.") and k != "gaussian_conditional.scale_table")}
    torch.save({"format": WEIGHTS_FORMAT, "format_version": 1, "name": model.name,
                "config": dict(model.config), "state_dict": {**params, **tables},
                "metadata": dict(metadata or {})}, str(path))


def _is_table(key: str) -> bool:
    """Coder tables and scale table: derived from the parameters by ``update()``."""
    return key.rsplit(".", 1)[-1] in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def _load_params(model, state: dict, source: str) -> None:
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_table(k)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the configuration "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_weights(path, device=None):
    """A ready-to-code ``DualRes`` model (eval mode, coder tables loaded) from a checkpoint file
    written by :func:`save_weights`."""
    from .models import DualRes

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        # torch's own message is a page about weights_only; the chained exception keeps it.
        raise ValueError(f"{path}: not a readable DualRes weights file ({type(exc).__name__} "
                         "while unpickling: not a torch file, truncated, or not written by save_weights)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a DualRes weights file (write one with codec.save_weights)")
    model = DualRes(name=ckpt.get("name", "custom"), **ckpt["config"])
    _load_params(model, ckpt["state_dict"], str(path))
    model.metadata = ckpt.get("metadata", {})
    model = model.to(device if device is not None else "cpu").eval()
    model.update(force=False)  # builds only what the file lacks
    return model


_cache_lock = threading.RLock()  # re-entered: loading computes the weights id
_cache: dict = {}


def _resolve_model(weights, device):
    """(model, weights id) for ``weights`` (None, a path or a model) on ``device``."""
    from .models import DualRes

    if isinstance(weights, DualRes):
        model = weights
        where = next(model.parameters()).device
        if device is not None and torch.device(device) != where:
            raise ValueError(f"device={device!r} but the model given as weights is on {where}; "
                             "move the model (model.to(device)) or leave device out")
        if model.training:
            raise ValueError("weights: the model is in training mode; call model.eval() first")
        if not _has_tables(model):
            raise ValueError("weights: the model's entropy models have no CDF tables; "
                             "call model.update(force=True) first")
        return model, weights_id(model)
    if weights is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise WeightsNotFoundError(
                f"no trained DualRes weights in this installation ({DEFAULT_WEIGHTS} is missing); "
                "pass weights=PATH (a checkpoint from codec.save_weights) or weights=MODEL")
        weights = DEFAULT_WEIGHTS
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, a path or a DualRes model, got {type(weights).__name__}")
    dev = torch.device(device if device is not None else "cpu")
    key = (str(Path(weights).resolve()), str(dev))
    with _cache_lock:
        if key not in _cache:
            model = load_weights(weights, dev)
            _cache[key] = (model, weights_id(model))
        return _cache[key]


resolve_model = _resolve_model  # public name for the tools (demo, eval)


def _has_tables(model) -> bool:
    gc = model.gaussian_conditional
    return gc._offset.numel() > 0 and model.entropy_bottleneck._offset.numel() > 0


_id_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_id(model) -> int:
    """CRC-32 fingerprint of a model's parameters and coder tables (written in the header,
    checked on decode: a stream decoded with other weights would silently be garbage)."""
    state = model.state_dict()
    # Cached while no tensor was replaced or modified in place (tensor versions count writes).
    key = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    with _cache_lock:
        cached = _id_cache.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
    crc = 0
    for key_name, value in sorted(state.items()):
        crc = zlib.crc32(key_name.encode(), crc)
        crc = zlib.crc32(value.detach().to("cpu", torch.float32 if value.is_floating_point()
                                           else value.dtype).contiguous().numpy().tobytes(), crc)
    crc &= 0xFFFFFFFF
    with _cache_lock:
        _id_cache[model] = (key, crc)
    return crc


# ---------------------------------------------------------------------------- images in/out
def _to_tensor(image) -> Tuple[torch.Tensor, bool]:
    """(1, 3, H, W) float32 in [0, 1], and whether the input was greyscale."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        mode = image.mode
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"image: PIL mode {mode!r} (high bit depth) is not supported; "
                             "convert to 8-bit 'L' or 'RGB' first")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
            warnings.warn(f"image: PIL mode {mode!r} has an alpha channel; it is dropped "
                          "(only colour is coded)", stacklevel=3)
        grey = mode in ("1", "L", "LA", "La")
        image = np.asarray(image.convert("L" if grey else "RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            t = torch.from_numpy(np.array(arr, dtype=np.float32)) / 255.0
        elif arr.dtype in (np.float32, np.float64, np.float16):
            t = torch.from_numpy(np.array(arr, dtype=np.float32))
        else:
            raise TypeError(f"image: numpy arrays must be uint8 (or float in [0, 1]), got {arr.dtype}")
        if t.dim() == 2:
            t = t[:, :, None]
        if t.dim() != 3:
            raise ValueError(f"image: expected an HxW or HxWxC array, got shape {arr.shape}")
        t = t.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4:
            if t.size(0) != 1:
                raise ValueError(f"image: one image at a time, got a batch of {t.size(0)}")
            t = t[0]
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3:
            raise ValueError(f"image: expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif not t.is_floating_point():
            raise TypeError(f"image: tensors must be float in [0, 1] or uint8, got {t.dtype}")
        t = t.to("cpu", torch.float32)
    else:
        raise TypeError("image must be a PIL image, a numpy array or a torch tensor, "
                        f"got {type(image).__name__}")
    channels = t.size(0)
    if channels == 4 or channels == 2:
        warnings.warn(f"image: {channels} channels; the last (alpha) channel is dropped", stacklevel=3)
        t = t[:-1]
        channels -= 1
    if channels not in (1, 3):
        raise ValueError(f"image: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels}")
    if t.size(1) < 1 or t.size(2) < 1:
        raise ValueError(f"image: empty image of size {t.size(2)}x{t.size(1)}")
    if t.size(1) > MAX_SIDE or t.size(2) > MAX_SIDE:
        raise ValueError(f"image: sides up to {MAX_SIDE} pixels are supported, got {t.size(2)}x{t.size(1)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("image contains NaN or Inf")
    if float(t.min()) < 0.0 or float(t.max()) > 1.0:
        raise ValueError(f"image: float values must lie in [0, 1], got [{float(t.min()):.4g}, {float(t.max()):.4g}]")
    grey = channels == 1
    if grey:
        t = t.expand(3, -1, -1)
    return t[None].contiguous(), grey


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``multiple`` by replicating the border (any size, 1x1
    too: a flat continuation costs almost no bits). Gathers with clamped indices, which unlike
    ``F.pad(mode="replicate")`` has no limit on the pad width."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    rows = torch.arange(h + ph, device=x.device).clamp_(max=h - 1)
    cols = torch.arange(w + pw, device=x.device).clamp_(max=w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def _from_tensor(x: torch.Tensor, grey: bool, output: str):
    x = x.clamp(0.0, 1.0)
    if grey:
        x = x.mean(dim=0, keepdim=True)
    if output == "tensor":
        return x
    arr = (x.mul(255.0).round().to(torch.uint8)).permute(1, 2, 0).cpu().numpy()
    if grey:
        arr = arr[:, :, 0]
    if output == "numpy":
        return arr
    from PIL import Image

    return Image.fromarray(arr, mode="L" if grey else "RGB")


# ---------------------------------------------------------------------------- container
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


def _pack(config_id: int, flags: int, quality: float, wid: int, width: int, height: int,
          sections) -> bytes:
    """A version-3 stream of already embedded sections (or CompressAI strings, FLAG_COMPAT)."""
    if len(sections) > 255:  # the header's count is a byte (the models have 6 or 8)
        raise ValueError(f"a DualRes bitstream holds at most 255 sections, got {len(sections)}")
    out = bytearray(_HEAD.pack(MAGIC, VERSION, config_id, flags, quality, wid, width - 1, height - 1,
                               len(sections)))
    for section in sections:
        _put_varint(out, len(section))
    for section in sections:
        out += section
    return bytes(out) + _CRC.pack(zlib.crc32(out) & 0xFFFFFFFF)


def _embed_sections(model, strings, shape) -> Tuple[int, list]:
    """(flags, sections): the model's strings as the container stores them, native rANS streams
    in their embedded form (the container's checksum and the model's symbol counts replace their
    own header fields), CompressAI strings as they are."""
    lanes = {model.gaussian_conditional.lanes is None, model.entropy_bottleneck.lanes is None}
    if lanes == {True}:
        return FLAG_COMPAT, list(strings)
    if len(lanes) > 1:
        raise ValueError("the model's entropy models disagree on lanes (one writes CompressAI strings, "
                         "the other native streams): give both the same setting")
    counts = model.symbol_counts(shape)
    return 0, [ops.rans_embed(s, n, _PRECISION) for s, n in zip(strings, counts)]


def _restore_sections(model, head, shape) -> list:
    """The strings ``model.decompress`` takes, from a parsed header's sections."""
    if head["version"] == 2:
        return list(head["sections"])  # full rANS streams or CompressAI strings, as written
    native = model.gaussian_conditional.lanes is not None
    if head["flags"] & FLAG_COMPAT:
        if native:
            raise BitstreamError("the bitstream holds CompressAI single-lane sections, and the decoding "
                                 "model codes native streams: decode with a model built with lanes=None")
        return list(head["sections"])
    counts = model.symbol_counts(shape)
    if len(counts) != len(head["sections"]):
        raise BitstreamError(f"the bitstream has {len(head['sections'])} sections, the model codes "
                             f"{len(counts)}")
    try:
        return [ops.rans_restore(s, n, _PRECISION) for s, n in zip(head["sections"], counts)]
    except ValueError as exc:
        raise BitstreamError(f"corrupted bitstream: {exc}") from exc


def parse_header(data) -> dict:
    """Header fields of a DualRes bitstream (checks magic, version, lengths and checksum).

    Returns ``{"version", "config", "config_id", "flags", "grey", "cuda", "quality",
    "weights_id", "width", "height", "sections": [bytes, ...]}`` (version 3: the sections as
    stored, i.e. embedded rANS streams unless ``flags & FLAG_COMPAT``).
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
        raise BitstreamError("DualRes bitstream version 1 (float32 entropy parameters, not portable "
                             "across machines) is no longer read: re-encode the image")
    if version not in _READ_VERSIONS:
        raise BitstreamError(f"unsupported DualRes bitstream version {version} (this library reads "
                             f"{', '.join(map(str, _READ_VERSIONS))})")
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
        sections.append(data[pos:pos + length])
        pos += length
    return {"version": version, "config": _CONFIG_NAMES[config_id], "config_id": config_id,
            "flags": flags, "grey": bool(flags & FLAG_GREY), "cuda": bool(flags & FLAG_CUDA),
            "quality": quality, "weights_id": wid, "width": width, "height": height,
            "sections": sections}


# ---------------------------------------------------------------------------- API
def _check_quality(model, quality) -> float:
    if isinstance(quality, bool) or not isinstance(quality, (int, float, np.integer, np.floating)):
        raise TypeError(f"quality must be a number, got {type(quality).__name__}")
    q = float(np.float32(quality))  # what the header stores: encoder and decoder agree exactly
    if not math.isfinite(q) or q < 0 or q > model.num_qualities - 1:
        raise ValueError(f"quality must lie in [0, {model.num_qualities - 1}], got {quality!r}")
    return q


def encode(image, quality: Optional[Union[int, float]] = None, device=None, weights=None,
           max_pixels: Optional[int] = None, max_bytes: Optional[int] = None, refine_steps: int = 0,
           refine_rounds: Optional[int] = None) -> bytes:
    """Compress one image into a DualRes bitstream.

    ``image``: a PIL image, an HxWx3 (or HxW grey, HxWx4 RGBA) uint8 numpy array, or a float
    tensor (3, H, W) / (1, 3, H, W) / (1, H, W) in [0, 1]. Any size up to ``max_pixels``
    (default as in :func:`decode`: larger images raise :class:`ImageTooLargeError` before any model
    work, since the default decoder would refuse their stream). Grey images are coded as
    three equal channels and flagged (``decode`` returns grey); an alpha channel is dropped with
    a warning. ``quality``: 0 (smallest) .. ``num_qualities - 1`` (best), floats interpolate;
    default 3.
    ``max_bytes``: rate control. A stream of at most ``max_bytes`` bytes, container included,
    at the highest quality (at most ``quality``, default the top one) that a bracketing search
    finds: a fraction, within :data:`SIZE_SEARCH_TOLERANCE` of the limit in size or after
    :data:`SIZE_SEARCH_ENCODES` encodes. The header records the quality, so ``decode`` needs
    nothing more. Raises ``ValueError`` if even quality 0 does not fit, naming the size it needs.
    ``device``: where the model runs (default CPU); decode on the same kind of device.
    ``refine_steps``: optimise the latents for this image with that many gradient steps, then
    up to ``refine_rounds`` (default three) discrete rounds that move single latents by one bin,
    before coding them (:mod:`dualres_ext.models.refine`): smaller files at the same quality for a
    slower encoder (each step costs about an encode, each round about four), the same decoder.
    ``refine_rounds`` alone (``refine_steps=0``) runs the rounds without the gradient steps. Both 0
    (the default) = off, and the stream is bit-identical on every machine; a refined stream may
    differ between machines. With ``max_bytes`` every encode of the search is refined.
    """
    from .models.refine import check_refinement

    refine_steps, refine_rounds = check_refinement(refine_steps, refine_rounds)
    limit = _pixel_limit(max_pixels)
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
            raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes}")
    model, wid = _resolve_model(weights, device)
    if quality is None:
        quality = model.num_qualities - 1 if max_bytes is not None else 3
    q = _check_quality(model, quality)
    x, grey = _to_tensor(image)
    height, width = x.shape[-2:]
    if int(height) * int(width) > limit:
        raise ImageTooLargeError(
            f"the image is {width}x{height} ({int(width) * int(height)} pixels), more than the limit of {limit} "
            f"(raise it with encode(..., max_pixels=N) or ${MAX_PIXELS_ENV}; decoding needs the same)")
    dev = next(model.parameters()).device
    x = _pad(x, model.stride).to(dev)
    flags = (FLAG_GREY if grey else 0) | (FLAG_CUDA if dev.type == "cuda" else 0)
    config_id = CONFIG_IDS.get(getattr(model, "name", "custom"), 0)

    def encode_at(quality: float) -> bytes:
        out = model.compress(x, quality, refine_steps=refine_steps, refine_rounds=refine_rounds,
                             size=(int(height), int(width)))
        coding, sections = _embed_sections(model, [s[0] for s in out["strings"]], out["shape"])
        return _pack(config_id, flags | coding, quality, wid, int(width), int(height), sections)

    if max_bytes is None:
        return encode_at(q)
    return _fit_size(encode_at, q, int(max_bytes))


SIZE_SEARCH_ENCODES = 10
"""At most this many encodes for ``encode(..., max_bytes=N)`` (about 0.2 s each for a 768x512
image on 2 CPU cores); the search stops earlier once a stream is within
:data:`SIZE_SEARCH_TOLERANCE` of the limit."""
SIZE_SEARCH_TOLERANCE = 0.01


def _fit_size(encode_at, q_top: float, max_bytes: int) -> bytes:
    """The largest-quality stream in [0, q_top] of at most ``max_bytes`` bytes.

    The size grows with the quality, roughly exponentially, so the search interpolates the
    quality linearly in log-size between a quality that fits and one that does not (regula
    falsi), kept at least a tenth of the bracket from either end so that the bracket shrinks
    every step even where the size curve bends. Nothing assumes the size is monotonic: the
    bracket's lower end always fits, and it is what comes back.
    """
    top = encode_at(q_top)
    if len(top) <= max_bytes:
        return top
    lo, fits = 0.0, (encode_at(0.0) if q_top > 0 else top)
    if len(fits) > max_bytes:
        raise ValueError(f"max_bytes={max_bytes}: even the lowest quality needs {len(fits)} bytes "
                         "for this image")
    hi, hi_size = q_top, len(top)
    for _ in range(SIZE_SEARCH_ENCODES - 2):
        if len(fits) >= (1 - SIZE_SEARCH_TOLERANCE) * max_bytes:
            break
        t = (math.log(max_bytes) - math.log(len(fits))) / (math.log(hi_size) - math.log(len(fits)))
        q = float(np.float32(lo + min(max(t, 0.1), 0.9) * (hi - lo)))  # what the header stores
        if not lo < q < hi:  # the bracket is down to float32 resolution
            break
        data = encode_at(q)
        if len(data) <= max_bytes:
            lo, fits = q, data
        else:
            hi, hi_size = q, len(data)
    return fits


def _pixel_limit(max_pixels) -> int:
    """The pixel limit in force: the argument, else $DUALRES_MAX_PIXELS, else MAX_PIXELS."""
    source = "max_pixels"
    if max_pixels is None:
        env = os.environ.get(MAX_PIXELS_ENV)
        if env is None or env.strip() == "":
            max_pixels, source = MAX_PIXELS, "codec.MAX_PIXELS"
        else:
            try:
                max_pixels, source = int(env), MAX_PIXELS_ENV
            except ValueError:
                raise ValueError(f"{MAX_PIXELS_ENV} must be a positive integer, got {env!r}") from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)):
        raise TypeError(f"{source} must be an int, got {type(max_pixels).__name__}")
    if max_pixels < 1:
        raise ValueError(f"{source} must be a positive integer, got {max_pixels}")
    return int(max_pixels)


def decode(data, device=None, output: str = "pil", weights=None, max_pixels: Optional[int] = None):
    """Decompress a DualRes bitstream. ``output``: ``"pil"`` (default), ``"numpy"`` (HxWx3 or
    HxW uint8) or ``"tensor"`` ((3 or 1, H, W) float in [0, 1], not rounded to 8 bits).

    ``max_pixels``: refuse (:class:`ImageTooLargeError`, a ``BitstreamError``) a stream whose
    header declares more than this many pixels, before any model work; default
    ``$DUALRES_MAX_PIXELS`` or :data:`MAX_PIXELS` (2^26 = 67 Mpx: ~10 GiB peak with the
    compact model on CPU).
    """
    if output not in ("pil", "numpy", "tensor"):
        raise ValueError(f"output must be 'pil', 'numpy' or 'tensor', got {output!r}")
    limit = _pixel_limit(max_pixels)
    head = parse_header(data)
    if head["width"] * head["height"] > limit:
        raise ImageTooLargeError(
            f"the bitstream declares a {head['width']}x{head['height']} image "
            f"({head['width'] * head['height']} pixels), more than the limit of {limit} "
            f"(raise it with decode(..., max_pixels=N) or ${MAX_PIXELS_ENV} if the source is trusted)")
    model, wid = _resolve_model(weights, device)
    if head["weights_id"] != wid:
        raise BitstreamError(
            f"the bitstream was written with other weights (id {head['weights_id']:08x}, "
            f"configuration {head['config']!r}) than the decoder's (id {wid:08x}, "
            f"{getattr(model, 'name', 'custom')!r})")
    if head["quality"] > model.num_qualities - 1:
        raise BitstreamError(f"quality {head['quality']} out of the model's range")
    dev = next(model.parameters()).device
    if head["cuda"] != (dev.type == "cuda"):
        warnings.warn("the bitstream was encoded on a different kind of device "
                      f"({'CUDA' if head['cuda'] else 'CPU'}); decoding may not reproduce it",
                      stacklevel=2)
    stride = model.stride
    shape = (-(-head["height"] // stride), -(-head["width"] // stride))
    strings = [[s] for s in _restore_sections(model, head, shape)]
    try:
        x_hat = model.decompress(strings, shape, head["quality"])["x_hat"]
    except (RuntimeError, ValueError) as exc:
        raise BitstreamError(f"corrupted bitstream: {exc}") from exc
    x_hat = x_hat[0, :, :head["height"], :head["width"]]
    return _from_tensor(x_hat, head["grey"], output)


__all__ = ["encode", "decode", "BitstreamError", "ImageTooLargeError", "WeightsNotFoundError", "save_weights",
           "load_weights", "parse_header", "weights_id", "MAGIC", "VERSION", "MAX_PIXELS", "MAX_SIDE"]
