"""Whole folders through the codec: ``dualres compress DIR OUTDIR`` and ``dualres decompress DIR OUTDIR``.

The folder's tree is mirrored (``a/b.png`` → ``OUTDIR/a/b.drx``); a file that fails is reported
and skipped, and the others go on. A tqdm bar shows progress on a terminal; the summary line
(files, bytes, bits per pixel, time) is printed either way.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

from PIL import Image
from tqdm import tqdm

from ..codec import decode, encode
from ..pillow import EXTENSIONS as DRX_EXTENSIONS
from .evaluation import IMAGE_EXTENSIONS


@dataclass
class FolderSummary:
    """What a folder run did: files coded, bytes written, pixels, seconds, and the failures."""

    files: int = 0
    bytes: int = 0
    pixels: int = 0
    seconds: float = 0.0
    failures: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def bpp(self) -> float:
        return 8.0 * self.bytes / self.pixels if self.pixels else 0.0

    def line(self, verb: str) -> str:
        failed = f", {len(self.failures)} failed" if self.failures else ""
        return (
            f"{verb} {self.files} files: {self.bytes} bytes, {self.bpp:.4f} bpp, {self.pixels / 1e6:.2f} Mpx, "
            f"{self.seconds:.1f} s{failed}"
        )


def _files(folder: Path, extensions: Iterable[str]) -> List[Path]:
    extensions = tuple(e.lower() for e in extensions)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def _run(
    sources: List[Path],
    folder: Path,
    out_dir: Path,
    suffix: str,
    code: Callable[[Path, Path], Tuple[int, int]],
    unit: str,
) -> FolderSummary:
    summary = FolderSummary()
    start = time.perf_counter()
    bar = tqdm(sources, unit=unit, disable=not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True)
    for source in bar:
        target = out_dir / source.relative_to(folder).with_suffix(suffix)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            written, pixels = code(source, target)
        except (OSError, ValueError, TypeError) as exc:
            summary.failures.append((str(source), str(exc)))
            bar.write(f"dualres: {source}: {exc}", file=sys.stderr)
            continue
        summary.files += 1
        summary.bytes += written
        summary.pixels += pixels
        bar.set_postfix_str(f"{summary.bpp:.3f} bpp")
    summary.seconds = time.perf_counter() - start
    return summary


def compress_folder(
    folder, out_dir, quality: Optional[float] = None, max_bpp: Optional[float] = None, **encode_options
) -> FolderSummary:
    """Every image under ``folder`` (PNG, JPEG, ... by extension) to ``out_dir`` as ``.drx``;
    ``max_bpp`` is rate control per image, the other options are :func:`dualres_ext.encode`'s."""
    folder, out_dir = Path(folder), Path(out_dir)

    def code(source: Path, target: Path) -> Tuple[int, int]:
        with Image.open(source) as image:
            image.load()
            pixels = image.width * image.height
            max_bytes = None if max_bpp is None else max(1, int(max_bpp * pixels / 8))
            data = encode(image, quality=quality, max_bytes=max_bytes, **encode_options)
        target.write_bytes(data)
        return len(data), pixels

    return _run(_files(folder, IMAGE_EXTENSIONS), folder, out_dir, DRX_EXTENSIONS[0], code, "image")


def decompress_folder(folder, out_dir, image_format: str = "png", **decode_options) -> FolderSummary:
    """Every ``.drx`` file under ``folder`` to ``out_dir`` as ``image_format`` (an extension Pillow
    writes: png, webp, tiff, ...); ``bytes`` in the summary counts the streams read."""
    folder, out_dir = Path(folder), Path(out_dir)

    def code(source: Path, target: Path) -> Tuple[int, int]:
        data = source.read_bytes()
        image = decode(data, **decode_options)
        image.save(target)
        return len(data), image.width * image.height

    return _run(_files(folder, DRX_EXTENSIONS), folder, out_dir, "." + image_format.lstrip("."), code, "file")


__all__ = ["FolderSummary", "compress_folder", "decompress_folder"]
