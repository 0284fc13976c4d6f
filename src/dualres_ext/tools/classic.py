"""Classical image codecs behind one interface, for R-D comparisons and the demo.

Each codec maps (RGB uint8 array, quality) -> bytes and back. Pillow brings JPEG, WebP, AVIF
and JPEG 2000 (each where its Pillow build has the format); JPEG XL needs ``imagecodecs``
(``pip install dualres_ext[eval]``) and is skipped without it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, features


@dataclass(frozen=True)
class Codec:
    name: str
    qualities: Sequence[int]  # the sweep used for R-D curves, low to high rate
    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes], np.ndarray]
    higher_is_bigger: bool = True  # does a larger quality value give a larger file?


def _pil_encode(fmt: str, **fixed) -> Callable[[np.ndarray, int], bytes]:
    def encode(rgb: np.ndarray, quality: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt, **fixed, **({"quality": quality} if fmt != "JPEG2000" else {}))
        return buf.getvalue()

    return encode


def _pil_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _j2k_encode(rgb: np.ndarray, ratio: int) -> bytes:
    # OpenJPEG's rate control: a compression ratio; 'quality' here is 1000/ratio so bigger = better.
    buf = io.BytesIO()
    Image.fromarray(rgb).save(
        buf, format="JPEG2000", quality_mode="rates", quality_layers=[1000.0 / ratio], irreversible=True
    )
    return buf.getvalue()


def available_codecs() -> Dict[str, Codec]:
    """The classical codecs installed here, by name."""
    codecs = {
        "jpeg420": Codec(
            "JPEG 4:2:0", list(range(5, 96, 5)), _pil_encode("JPEG", subsampling=2, optimize=True), _pil_decode
        ),
        "jpeg444": Codec(
            "JPEG 4:4:4", list(range(5, 96, 5)), _pil_encode("JPEG", subsampling=0, optimize=True), _pil_decode
        ),
    }
    if features.check("webp"):
        codecs["webp"] = Codec("WebP", list(range(0, 101, 5)), _pil_encode("WEBP", method=6), _pil_decode)
    if features.check("avif"):
        # speed 6 and a step of 10: at speed 4 with a step of 5, AVIF took 40 of the 60 coding
        # seconds per Kodak image of an evaluation (all codecs, on a 2-core CPU).
        codecs["avif"] = Codec(
            "AVIF", list(range(0, 101, 10)), _pil_encode("AVIF", speed=6, subsampling="4:4:4"), _pil_decode
        )
    if features.check("jpg_2000"):
        codecs["jpeg2000"] = Codec(
            "JPEG 2000", [5, 8, 12, 16, 20, 25, 30, 40, 50, 65, 80, 100, 130, 170, 220], _j2k_encode, _pil_decode
        )
    try:  # optional dependency (the ``eval`` extra), imported only where the codec table is built
        import imagecodecs

        if imagecodecs.JPEGXL.available:
            codecs["jpegxl"] = Codec(
                "JPEG XL",
                list(range(5, 96, 5)),
                lambda rgb, q: bytes(imagecodecs.jpegxl_encode(rgb, level=q, effort=7)),
                lambda data: np.asarray(imagecodecs.jpegxl_decode(data))[..., :3],
            )
    except ImportError:
        pass
    return codecs


def match_size(codec: Codec, rgb: np.ndarray, target_bytes: int) -> Optional[tuple]:
    """The codec's largest output not above ``target_bytes``: (quality, bytes), or None if even the
    lowest quality is larger. Binary search over the codec's quality range (file size is monotone
    in quality for these encoders, up to small wobbles the search tolerates)."""
    lo, hi = min(codec.qualities), max(codec.qualities)
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        data = codec.encode(rgb, mid)
        if len(data) <= target_bytes:
            best = (mid, data)
            lo = mid + 1
        else:
            hi = mid - 1
    return best


def sweep(codec: Codec, rgb: np.ndarray, qualities: Optional[List[int]] = None):
    """Yield (quality, bytes, decoded RGB) over the codec's quality sweep."""
    for q in qualities or codec.qualities:
        data = codec.encode(rgb, q)
        yield q, data, codec.decode(data)
