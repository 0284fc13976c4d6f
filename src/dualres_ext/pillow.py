"""The DualRes format in Pillow: ``Image.open("photo.drx")`` and ``img.save("photo.drx", quality=3)``.

Importing :mod:`dualres_ext` registers it (as pillow-avif-plugin and pillow-heif do): the opener
recognises the container's magic bytes whatever the file is called, ``.drx`` maps to the format
for saving, and the MIME type is ``image/x-dualres``.

Opening reads the header only (size, mode, metadata in ``info``); the pixels are decoded on
``load()``. Saving takes the :func:`dualres_ext.encode` options as keywords: ``quality`` (0..5,
default 3), ``max_bytes``, ``refine_steps``, ``refine_rounds``, ``weights``; ``exif``,
``icc_profile`` and ``xmp`` (bytes, or an ``Image.Exif``) default to the image's own
``info``, so metadata survives ``Image.open(...).save(...)``; pass ``exif=b""`` to drop it.
"""

from __future__ import annotations

from PIL import Image, ImageFile

from .codec import decode, encode
from .container import MAGIC, BitstreamError, parse_header

FORMAT = "DRX"
EXTENSIONS = (".drx",)
MIME = "image/x-dualres"
_SAVE_OPTIONS = ("quality", "max_bytes", "refine_steps", "refine_rounds", "weights", "device")


def _accept(prefix: bytes) -> bool:
    return prefix[: len(MAGIC)] == MAGIC


class DrxImageFile(ImageFile.ImageFile):
    """A DualRes stream as a Pillow image: header on open, pixels on ``load()``."""

    format = FORMAT
    format_description = "DualRes learned image compression"

    def _open(self) -> None:
        data = self.fp.read()
        try:
            head = parse_header(data)
        except BitstreamError as exc:
            raise SyntaxError(f"not a valid DualRes file: {exc}") from exc
        self._data = data
        self._size = (head["width"], head["height"])
        self._mode = "L" if head["grey"] else "RGB"
        self.info.update(head["metadata"])
        self.info["quality"] = head["quality"]
        # One tile marks the pixels as not yet loaded; load() decodes them.
        self.tile = [ImageFile._Tile("drx", (0, 0) + self.size, 0, None)]

    def load(self):
        if self.tile:
            pixels = decode(self._data, output="numpy")
            self.load_prepare()
            self.frombytes(pixels.tobytes(), "raw", self.mode)
            self.tile = []
        return super().load()


def _metadata_bytes(value) -> bytes:
    if isinstance(value, Image.Exif):
        return value.tobytes()
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value or b"")


def _save(im: Image.Image, fp, filename) -> None:
    options = {k: im.encoderinfo[k] for k in _SAVE_OPTIONS if k in im.encoderinfo}
    metadata = {
        key: _metadata_bytes(im.encoderinfo.get(key, im.info.get(key))) for key in ("exif", "icc_profile", "xmp")
    }
    fp.write(encode(im, metadata=metadata, **options))


def register() -> None:
    """Make Pillow open and save DualRes files (done on ``import dualres_ext``)."""
    Image.register_open(FORMAT, DrxImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extensions(FORMAT, list(EXTENSIONS))
    Image.register_mime(FORMAT, MIME)


register()

__all__ = ["DrxImageFile", "FORMAT", "EXTENSIONS", "MIME", "register"]
