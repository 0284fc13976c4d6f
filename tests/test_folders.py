"""``dualres compress DIR OUTDIR`` / ``decompress``: trees mirrored, failures reported and skipped,
a summary line, the same bytes as one file at a time."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dualres_ext import codec
from dualres_ext.tools.cli import EXIT_ERROR, main
from dualres_ext.tools.folders import compress_folder


def _picture(seed: int, h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 2, yy * 3, xx + yy], -1) % 256 + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_folders_round_trip(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _picture(0, 40, 60).save(src / "a.png")
    _picture(1, 30, 50).save(src / "sub" / "b.JPG", quality=95)
    _picture(2, 20, 20).convert("L").save(src / "sub" / "c.tiff")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    assert main(["compress", str(src), str(tmp_path / "drx"), "-q", "2"]) == EXIT_ERROR  # broken.png
    out = capsys.readouterr()
    assert "compressed 3 files" in out.out and "1 failed" in out.out and "bpp" in out.out
    assert "broken.png" in out.err
    written = sorted(p.relative_to(tmp_path / "drx").as_posix() for p in (tmp_path / "drx").rglob("*.drx"))
    assert written == ["a.drx", "sub/b.drx", "sub/c.drx"]
    with Image.open(src / "a.png") as img:
        assert (tmp_path / "drx" / "a.drx").read_bytes() == codec.encode(img, quality=2)

    assert main(["decompress", str(tmp_path / "drx"), str(tmp_path / "png")]) == 0
    assert "decompressed 3 files" in capsys.readouterr().out
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "png").rglob("*.png")}
    assert sizes == {"a.png": (60, 40), "b.png": (50, 30), "c.png": (20, 20)}
    assert Image.open(tmp_path / "png" / "sub" / "c.png").mode == "L"


def test_folder_rate_control_is_per_image(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _picture(3, 64, 64).save(src / "x.png")
    _picture(4, 32, 96).save(src / "y.png")
    summary = compress_folder(src, tmp_path / "out", max_bpp=1.0)
    assert summary.files == 2 and not summary.failures
    for name, pixels in (("x", 64 * 64), ("y", 32 * 96)):
        assert len((tmp_path / "out" / f"{name}.drx").read_bytes()) <= pixels // 8
    assert summary.bytes == sum(len(p.read_bytes()) for p in (tmp_path / "out").glob("*.drx"))
    assert abs(summary.bpp - 8 * summary.bytes / (64 * 64 + 32 * 96)) < 1e-12


def test_folder_refuses_max_bytes(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["compress", str(tmp_path / "in"), str(tmp_path / "out"), "--max-bytes", "100"]) == EXIT_ERROR
    assert "--max-bpp" in capsys.readouterr().err
