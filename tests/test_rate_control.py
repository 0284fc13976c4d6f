"""Rate control: ``encode(..., max_bytes=N)`` and the CLI's ``--max-bytes`` / ``--max-bpp``.

With the shipped weights, so that the size really grows with the quality (random weights code
every quality at about the same size)."""

import numpy as np
import pytest
from PIL import Image

from dualres_ext import codec
from dualres_ext.tools.demo import BUNDLED_PHOTO
from dualres_ext.tools.metrics import psnr


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.open(BUNDLED_PHOTO).convert("RGB"))[64:192, 32:224]  # 128 x 192


@pytest.fixture(scope="module")
def sizes(photo):
    """Stream sizes of the photo at the integer qualities."""
    return [len(codec.encode(photo, quality=q)) for q in range(6)]


def test_sizes_grow_with_the_quality(sizes):
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes  # what the search relies on, mostly


def test_max_bytes_gives_a_stream_that_fits_close_to_the_limit(photo, sizes):
    previous_quality, previous_psnr = -1.0, 0.0
    for target in np.geomspace(sizes[0] * 1.05, sizes[5] * 0.95, 4).astype(int):
        data = codec.encode(photo, max_bytes=int(target))
        head = codec.parse_header(data)
        assert len(data) <= target
        assert len(data) >= 0.97 * target, (len(data), target, head["quality"])
        assert 0 < head["quality"] < 5
        # The header's (fractional) quality is all the stream depends on: encoding at it again
        # gives the same bytes, and decoding needs no more than the stream.
        assert codec.encode(photo, quality=head["quality"]) == data
        rec = codec.decode(data, output="numpy")
        quality = psnr(photo, rec)
        assert head["quality"] > previous_quality and quality > previous_psnr
        previous_quality, previous_psnr = head["quality"], quality


def test_max_bytes_above_the_top_size_gives_the_quality_asked_for(photo, sizes):
    assert codec.encode(photo, max_bytes=sizes[5]) == codec.encode(photo, quality=5)
    assert codec.encode(photo, max_bytes=10 * sizes[5], quality=2) == codec.encode(photo, quality=2)


def test_quality_is_the_ceiling_of_the_search(photo, sizes):
    data = codec.encode(photo, quality=2.5, max_bytes=(sizes[2] + sizes[5]) // 2)
    assert codec.encode(photo, quality=2.5) == data  # 2.5 fits, so nothing higher is tried
    target = (sizes[1] + sizes[2]) // 2
    data = codec.encode(photo, quality=2.5, max_bytes=target)
    assert 1 < codec.parse_header(data)["quality"] < 2 and len(data) <= target


def test_max_bytes_below_the_lowest_quality_names_the_size_needed(photo, sizes):
    with pytest.raises(ValueError, match=f"max_bytes={sizes[0] - 1}: even the lowest quality needs {sizes[0]} bytes"):
        codec.encode(photo, max_bytes=sizes[0] - 1)
    assert codec.encode(photo, max_bytes=sizes[0]) == codec.encode(photo, quality=0)


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError), ("1000", TypeError)]
)
def test_bad_max_bytes(photo, bad, error):
    with pytest.raises(error, match="max_bytes"):
        codec.encode(photo, max_bytes=bad)


def test_search_keeps_its_promises_on_a_size_curve_that_is_not_monotonic():
    """The bracketing search returns a stream that fits, within its encode budget, whatever the
    sizes do between the qualities."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        bumps = rng.uniform(-0.3, 0.3, 8)
        calls = []

        def encode_at(q, bumps=bumps, calls=calls):
            calls.append(q)
            size = 1000 * np.exp(0.5 * q + sum(b * np.sin((k + 1) * q) for k, b in enumerate(bumps)))
            return bytes(max(1, int(size)))

        low, high = len(encode_at(0.0)), len(encode_at(5.0))
        calls.clear()
        limit = int(rng.uniform(low, 1.2 * high))
        data = codec._fit_size(encode_at, 5.0, limit)
        assert len(data) <= limit
        assert len(calls) <= codec.SIZE_SEARCH_ENCODES
        if high <= limit:
            assert calls == [5.0]


def test_cli_rate_control(tmp_path, photo, sizes, capsys, monkeypatch):
    from dualres_ext.__main__ import main

    Image.fromarray(photo).save(tmp_path / "in.png")
    monkeypatch.chdir(tmp_path)
    target = (sizes[2] + sizes[3]) // 2
    assert main(["compress", "in.png", "a.drx", "--max-bytes", str(target)]) == 0
    out = capsys.readouterr().out
    data = (tmp_path / "a.drx").read_bytes()
    assert len(data) <= target and f"quality {codec.parse_header(data)['quality']:g}" in out
    bpp = 8 * target / (128 * 192)
    assert main(["compress", "in.png", "b.drx", "--max-bpp", str(bpp)]) == 0
    assert len((tmp_path / "b.drx").read_bytes()) <= target
    for argv, message in [
        (["--max-bytes", "100", "--max-bpp", "0.5"], "not both"),
        (["--max-bpp", "nan"], "--max-bpp must be a positive number"),
        (["--max-bpp", "inf"], "--max-bpp must be a positive number"),
        (["--max-bytes", "10"], "even the lowest quality needs"),
    ]:
        assert main(["compress", "in.png", "c.drx", *argv]) == 1, argv
        assert message in capsys.readouterr().err, argv
