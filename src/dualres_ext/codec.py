"""Image codec on the DualRes model: ``encode(image) -> bytes`` and ``decode(bytes) -> image``.

The stream is the container of :mod:`dualres_ext.container` (docs/BITSTREAM.md) around the
model's coded sections; native rANS sections (interleaved streams in version 5, multi-lane ones
in versions 3 and 4) are stored in their embedded form (the container's checksum and the model's
symbol counts replace their own header fields).

Weights: ``weights=None`` uses the package's trained weights; a path loads a weights file
written by :func:`~dualres_ext.models.zoo.save_weights`; a ``DualRes`` model object is used as
it is (in eval mode, after ``update()``). Random weights are never used silently.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import torch

from . import ops
from .container import (
    CONFIG_IDS,
    FLAG_COMPAT,
    FLAG_CUDA,
    FLAG_GREY,
    MAGIC,
    MAX_SIDE,
    VERSION,
    BitstreamError,
    ImageTooLargeError,
    pack,
    pack_metadata,
    parse_header,
)
from .imageio import from_tensor, pad, to_tensor
from .models.refine import check_refinement, refine_latents
from .models.zoo import WeightsNotFoundError, load_weights, resolve_model, save_weights, weights_id
from .ops import rans_interleaved

_PRECISION = 16  # of every coder table the model builds (CompressAI's)
# Decompression-bomb guard: decode refuses a header whose width x height exceeds this many pixels
# before any model work or allocation (a forged 65536 x 65536 header would otherwise ask for
# hundreds of GiB). Measured: a 4000x3000 (12 Mpx) decode with the compact model peaks at
# 2.3 GiB RSS, i.e. ~150 bytes per pixel over ~0.55 GiB of torch + model; 2^26 px (67 Mpx,
# e.g. 8192x8192) is then ~10 GiB, while Pillow's 179 Mpx (Image.MAX_IMAGE_PIXELS) would need
# ~26 GiB. Override per call with decode(..., max_pixels=N), process-wide with the environment
# variable DUALRES_MAX_PIXELS or by assigning codec.MAX_PIXELS.
MAX_PIXELS = 1 << 26
MAX_PIXELS_ENV = "DUALRES_MAX_PIXELS"


def _section_lanes(model, version: int):
    """The ``lanes`` the model's entropy models write a ``version`` stream with: None (CompressAI
    strings) for a ``lanes=None`` model, else the interleaved stream in version 5 and the
    multi-lane stream (the model's lane count, if it sets one) in versions 3 and 4."""
    lanes = {model.gaussian_conditional.lanes is None, model.entropy_bottleneck.lanes is None}
    if lanes == {True}:
        return None
    if len(lanes) > 1:
        raise ValueError(
            "the model's entropy models disagree on lanes (one writes CompressAI strings, "
            "the other native streams): give both the same setting"
        )
    if version >= 5:
        return "auto"
    own = model.gaussian_conditional.lanes
    return own if isinstance(own, int) else "multilane"


# How each version stores a native section without its own header fields (FORMAT.md).
def _embedder(version: int):
    return rans_interleaved.embed if version >= 5 else ops.rans_embed


def _restorer(version: int):
    return rans_interleaved.restore if version >= 5 else ops.rans_restore


def _embed_sections(model, strings, shape, version: int, lanes) -> Tuple[int, list]:
    """(flags, sections): the model's strings as the container stores them, native rANS streams
    in their embedded form (the container's checksum and the model's symbol counts replace their
    own header fields), CompressAI strings as they are."""
    if lanes is None:
        return FLAG_COMPAT, list(strings)
    counts = model.symbol_counts(shape)
    embed = _embedder(version)
    return 0, [embed(s, n, _PRECISION) for s, n in zip(strings, counts)]


def _restore_sections(model, head, shape) -> list:
    """The strings ``model.decompress`` takes, from a parsed header's sections."""
    if head["version"] == 2:
        return list(head["sections"])  # full rANS streams or CompressAI strings, as written
    native = model.gaussian_conditional.lanes is not None
    if head["flags"] & FLAG_COMPAT:
        if native:
            raise BitstreamError(
                "the bitstream holds CompressAI single-lane sections, and the decoding "
                "model codes native streams: decode with a model built with lanes=None"
            )
        return list(head["sections"])
    counts = model.symbol_counts(shape)
    if len(counts) != len(head["sections"]):
        raise BitstreamError(f"the bitstream has {len(head['sections'])} sections, the model codes {len(counts)}")
    restore = _restorer(head["version"])
    try:
        return [restore(s, n, _PRECISION) for s, n in zip(head["sections"], counts)]
    except ValueError as exc:
        raise BitstreamError(f"corrupted bitstream: {exc}") from exc


# ---------------------------------------------------------------------------- API
def _check_quality(model, quality) -> float:
    if isinstance(quality, bool) or not isinstance(quality, (int, float, np.integer, np.floating)):
        raise TypeError(f"quality must be a number, got {type(quality).__name__}")
    q = float(np.float32(quality))  # what the header stores: encoder and decoder agree exactly
    if not math.isfinite(q) or q < 0 or q > model.num_qualities - 1:
        raise ValueError(f"quality must lie in [0, {model.num_qualities - 1}], got {quality!r}")
    return q


def encode(
    image,
    quality: Optional[Union[int, float]] = None,
    device=None,
    weights=None,
    max_pixels: Optional[int] = None,
    max_bytes: Optional[int] = None,
    refine_steps: int = 0,
    refine_rounds: Optional[int] = None,
    metadata: Optional[dict] = None,
    version: Optional[int] = None,
):
    """Compress an image into a DualRes bitstream (``bytes``), or a list of images into a list
    of bitstreams.

    ``image``: a PIL image, an HxWx3 (or HxW grey, HxWx4 RGBA) uint8 numpy array, or a float
    tensor (3, H, W) / (1, 3, H, W) / (1, H, W) in [0, 1]; or a list (tuple) of them, whose
    images of equal size go through the analysis as one batch (each image is still coded on its
    own, so every stream is the one a single ``encode`` writes, up to the float32 analysis'
    rounding). Any size up to ``max_pixels``
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
    ``device``: where the model runs (default CPU).
    ``refine_steps``: optimise the latents for this image with that many gradient steps, then
    up to ``refine_rounds`` (default three) discrete rounds that move single latents by one bin,
    before coding them (:mod:`dualres_ext.models.refine`): smaller files at the same quality for a
    slower encoder (each step costs about an encode, each round about four), the same decoder.
    ``refine_rounds`` alone (``refine_steps=0``) runs the rounds without the gradient steps. Both 0
    (the default) = off, and the stream is bit-identical on every machine; a refined stream may
    differ between machines. With ``max_bytes`` every encode of the search is refined.
    ``metadata``: ``{"exif": bytes, "icc_profile": bytes, "xmp": bytes}`` (any subset) stored in
    the stream and given back by :func:`decode` (a PIL image's ``info``) and :func:`read_metadata`;
    for a list of images, one dict for all or a list with one per image.
    ``version``: the bitstream version to write: 5 (the default for weights with exact integer
    entropy-parameter networks, the shipped ones included: decodes bit-exactly on every machine;
    sections in the interleaved rANS layout), 4 (the same networks, multi-lane rANS sections:
    what earlier writers wrote) or 3 (float64 entropy parameters, multi-lane sections; the
    default for weights without integer networks, and for refined encodes: the refinement
    optimises the loss of the float64 path, whose means and scales its discrete rounds compare
    against).
    """
    refine_steps, refine_rounds = check_refinement(refine_steps, refine_rounds)
    limit = _pixel_limit(max_pixels)
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
            raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes}")
    model, _ = resolve_model(weights, device)
    if version is None and (refine_steps or refine_rounds):
        version = 3  # the refinement optimises the float64 coding path's loss (models/refine.py)
    version = _check_version(model, version)
    exact = version >= 4
    lanes = _section_lanes(model, version)
    wid = weights_id(model, float_only=not exact)
    if quality is None:
        quality = model.num_qualities - 1 if max_bytes is not None else 3
    q = _check_quality(model, quality)
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    if many and (metadata is None or isinstance(metadata, dict)):
        metadatas = [metadata] * len(images)
    elif many:
        metadatas = list(metadata)
        if len(metadatas) != len(images):
            raise ValueError(f"metadata: {len(metadatas)} entries for {len(images)} images")
    else:
        metadatas = [metadata]
    for entry in metadatas:
        pack_metadata(entry or {})  # checked before any model work
    pictures = [_picture(img, model, limit) for img in images]
    dev = next(model.parameters()).device
    config_id = CONFIG_IDS.get(getattr(model, "name", "custom"), 0)
    batchable = max_bytes is None and not (refine_steps or refine_rounds)
    coded = _batched_coding(model, pictures, q, exact, lanes) if batchable else [None] * len(pictures)
    streams = []
    for picture, done, meta in zip(pictures, coded, metadatas):
        x, grey, height, width = picture
        flags = (FLAG_GREY if grey else 0) | (FLAG_CUDA if dev.type == "cuda" else 0)

        def encode_at(quality: float, x=x, done=done, height=height, width=width, flags=flags, meta=meta) -> bytes:
            if done is None or quality != q:
                with torch.no_grad():
                    y_h, y_l = model.analysis(x, quality)
                    latents = (y_h, y_l, model.hyper_analysis(y_h, y_l))
                if refine_steps or refine_rounds:  # the refining encoder's stage between analysis and coding
                    with torch.enable_grad():
                        latents = refine_latents(
                            model, x, quality, latents, refine_steps, size=(height, width), flip_rounds=refine_rounds
                        )
                out = model.compress_latents(*latents, exact=exact, lanes=lanes)
                done = ([s[0] for s in out["strings"]], out["shape"])
            coding, sections = _embed_sections(model, *done, version, lanes)
            return pack(config_id, flags | coding, quality, wid, width, height, sections, meta, version=version)

        streams.append(encode_at(q) if max_bytes is None else _fit_size(encode_at, q, int(max_bytes)))
    return streams if many else streams[0]


def _check_version(model, version) -> int:
    """The version ``encode`` writes: 5 when the model has exact networks, else 3, unless given."""
    if version is None:
        return VERSION if getattr(model, "exact", None) is not None else 3
    if isinstance(version, bool) or version not in (3, 4, 5):
        raise ValueError(f"version must be 3, 4 or 5, got {version!r}")
    if version >= 4 and getattr(model, "exact", None) is None:
        raise ValueError(
            f"version={version} needs weights with exact integer entropy-parameter networks "
            "(python/convert_exact.py adds them); these weights write version 3"
        )
    return int(version)


def _picture(image, model, limit: int):
    """``(x, grey, height, width)``: the image as the model's padded input on its device."""
    x, grey = to_tensor(image)
    height, width = (int(v) for v in x.shape[-2:])
    if height * width > limit:
        raise ImageTooLargeError(
            f"the image is {width}x{height} ({width * height} pixels), more than the limit of {limit} "
            f"(raise it with encode(..., max_pixels=N) or ${MAX_PIXELS_ENV}; decoding needs the same)"
        )
    return pad(x, model.stride).to(next(model.parameters()).device), grey, height, width


@torch.no_grad()
def _batched_coding(model, pictures, quality: float, exact: bool, lanes) -> list:
    """Each picture's coded ``(strings, z shape)``, pictures of equal padded size in one batch
    through the analysis and, with the exact networks, through the entropy parameters and the
    coder too (integer arithmetic: each picture's strings are the ones it gets alone; on a GPU
    the whole slice loop runs there, and the symbols come to the host once). The float64
    networks of version 3 code each picture on its own."""
    groups: dict = {}
    for i, (x, *_) in enumerate(pictures):
        groups.setdefault(tuple(x.shape), []).append(i)
    coded = [None] * len(pictures)
    for members in groups.values():
        x = torch.cat([pictures[i][0] for i in members])
        y_h, y_l = model.analysis(x, quality)
        z = model.hyper_analysis(y_h, y_l)
        parts = (
            [(y_h, y_l, z)] if exact else [(y_h[b : b + 1], y_l[b : b + 1], z[b : b + 1]) for b in range(len(members))]
        )
        outs = [model.compress_latents(*part, exact=exact, lanes=lanes) for part in parts]
        for b, i in enumerate(members):
            out, k = (outs[0], b) if exact else (outs[b], 0)
            coded[i] = ([s[k] for s in out["strings"]], out["shape"])
    return coded


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
        raise ValueError(f"max_bytes={max_bytes}: even the lowest quality needs {len(fits)} bytes for this image")
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
    """Decompress a DualRes bitstream, or a list of them (a list of pictures; streams of the same
    size go through the synthesis as one batch). ``output``: ``"pil"`` (default; the stream's
    metadata, if any, in the image's ``info``: ``"exif"``, ``"icc_profile"``, ``"xmp"``),
    ``"numpy"`` (HxWx3 or HxW uint8) or ``"tensor"`` ((3 or 1, H, W) float in [0, 1], not
    rounded to 8 bits).

    ``max_pixels``: refuse (:class:`ImageTooLargeError`, a ``BitstreamError``) a stream whose
    header declares more than this many pixels, before any model work; default
    ``$DUALRES_MAX_PIXELS`` or :data:`MAX_PIXELS` (2^26 = 67 Mpx: ~10 GiB peak with the
    compact model on CPU).

    The decoded latents are exact; the pictures come from a float32 synthesis, whose last bit
    may differ between thread counts, machines and batch compositions (about one pixel value in
    10^5 by 1).
    """
    if output not in ("pil", "numpy", "tensor"):
        raise ValueError(f"output must be 'pil', 'numpy' or 'tensor', got {output!r}")
    limit = _pixel_limit(max_pixels)
    many = isinstance(data, (list, tuple))
    heads = [_checked_header(d, limit) for d in (data if many else [data])]
    model, wid = resolve_model(weights, device)
    latents = _decode_all_latents(model, wid, heads)
    groups: dict = {}
    for i, (y_h_hat, _) in enumerate(latents):
        groups.setdefault(tuple(y_h_hat.shape), []).append(i)
    pictures = [None] * len(heads)
    for members in groups.values():
        y_h_hat = torch.cat([latents[i][0] for i in members])
        y_l_hat = torch.cat([latents[i][1] for i in members])
        qualities = torch.tensor([heads[i]["quality"] for i in members], dtype=torch.float64)
        with torch.no_grad():
            x_hat = model.synthesis(y_h_hat, y_l_hat, qualities if len(members) > 1 else heads[members[0]]["quality"])
        for b, i in enumerate(members):
            head = heads[i]
            pictures[i] = from_tensor(
                x_hat[b, :, : head["height"], : head["width"]], head["grey"], output, head["metadata"]
            )
    return pictures if many else pictures[0]


def _checked_header(data, limit: int) -> dict:
    head = parse_header(data)
    if head["width"] * head["height"] > limit:
        raise ImageTooLargeError(
            f"the bitstream declares a {head['width']}x{head['height']} image "
            f"({head['width'] * head['height']} pixels), more than the limit of {limit} "
            f"(raise it with decode(..., max_pixels=N) or ${MAX_PIXELS_ENV} if the source is trusted)"
        )
    return head


def _decode_all_latents(model, wid: int, heads: list) -> list:
    """The decoded latents ``(ŷ_H, ŷ_L)`` of each parsed stream. Exact streams (versions 4, 5) of
    one latent size are decoded as one batch (integer arithmetic: each stream's latents are the
    ones it gets alone; on a GPU the slice loop runs there for all of them); streams of the
    float64 versions one by one."""
    latents = [None] * len(heads)
    groups: dict = {}
    for i, head in enumerate(heads):
        if head["version"] >= 4 and len(heads) > 1:
            groups.setdefault((-(-head["height"] // model.stride), -(-head["width"] // model.stride)), []).append(i)
        else:
            latents[i] = _decode_latents(model, wid, [head])
    for members in groups.values():
        batch = _decode_latents(model, wid, [heads[i] for i in members])
        for b, i in enumerate(members):
            latents[i] = (batch[0][b : b + 1], batch[1][b : b + 1])
    return latents


def _decode_latents(model, wid: int, heads: list):
    """The decoded latents ``(ŷ_H, ŷ_L)`` of parsed streams of one latent size, all exact
    (versions 4, 5) or a single one, as a batch, checked against the model (``wid``: the model's
    full weights id; versions 2 and 3 carry the id without the exact networks, which they do not
    use)."""
    stride = model.stride
    (exact,) = {_check_head(model, wid, head) for head in heads}
    shape = (-(-heads[0]["height"] // stride), -(-heads[0]["width"] // stride))
    per_stream = [_restore_sections(model, head, shape) for head in heads]
    strings = [list(sections) for sections in zip(*per_stream)]
    try:
        return model.decompress_latents(strings, shape, exact=exact)
    except (RuntimeError, ValueError) as exc:
        raise BitstreamError(f"corrupted bitstream: {exc}") from exc


def _check_head(model, wid: int, head: dict) -> bool:
    """Checks a parsed stream against the decoding model; whether it has exact entropy parameters."""
    exact = head["version"] >= 4
    if exact and getattr(model, "exact", None) is None:
        raise BitstreamError(
            f"the bitstream (version {head['version']}) was coded with exact integer entropy-parameter "
            "networks, which the decoding weights lack"
        )
    if not exact:
        wid = weights_id(model, float_only=True)
    if head["weights_id"] != wid:
        raise BitstreamError(
            f"the bitstream was written with other weights (id {head['weights_id']:08x}, "
            f"configuration {head['config']!r}) than the decoder's (id {wid:08x}, "
            f"{getattr(model, 'name', 'custom')!r})"
        )
    if head["quality"] > model.num_qualities - 1:
        raise BitstreamError(f"quality {head['quality']} out of the model's range")
    dev = next(model.parameters()).device
    if not exact and head["cuda"] != (dev.type == "cuda"):  # versions 4 and 5 are exact on every device
        warnings.warn(
            "the bitstream was encoded on a different kind of device "
            f"({'CUDA' if head['cuda'] else 'CPU'}); decoding may not reproduce it",
            stacklevel=5,
        )
    return exact


def read_metadata(data) -> dict:
    """The metadata a stream carries (``{"exif": bytes, "icc_profile": bytes, "xmp": bytes}``, any
    subset, empty without), read from its container alone: no model work."""
    return dict(parse_header(data)["metadata"])


__all__ = [
    "encode",
    "decode",
    "read_metadata",
    "BitstreamError",
    "ImageTooLargeError",
    "WeightsNotFoundError",
    "save_weights",
    "load_weights",
    "parse_header",
    "weights_id",
    "resolve_model",
    "MAGIC",
    "VERSION",
    "MAX_PIXELS",
    "MAX_SIDE",
]
