"""python/make_eval_crops.py: which validation pictures make the fixed evaluation set (results/val24/)
and how each is cut down to about Kodak's size."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "python", "make_eval_crops.py")


@pytest.fixture(scope="module")
def crops():
    spec = importlib.util.spec_from_file_location("make_eval_crops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pick_evenly_is_every_2_5th_of_59(crops):
    names = [f"p{i:02d}.png" for i in range(59)]
    picked = crops.pick_evenly(list(reversed(names)), 24)  # the input order does not matter
    # results/val24 was made with these indices (its per_image.csv names the pictures).
    assert [names.index(p) for p in picked] == [
        0,
        3,
        5,
        8,
        10,
        13,
        15,
        18,
        20,
        23,
        25,
        28,
        30,
        33,
        35,
        38,
        40,
        43,
        45,
        48,
        50,
        53,
        55,
        58,
    ]
    assert crops.pick_evenly(names[:5], 24) == names[:5]
    for n, count in ((7, 3), (100, 24), (25, 24)):
        picked = crops.pick_evenly([f"{i:03d}" for i in range(n)], count)
        assert len(picked) == count and len(set(picked)) == count and picked[0] == "000"


def test_eval_crop_sizes_and_centre(crops):
    rng = np.random.default_rng(5)
    big = Image.fromarray(rng.integers(0, 256, (1000, 1600, 3), dtype=np.uint8))
    assert crops.eval_crop(big, 512, 768).size == (768, 512)  # 1600x1000 -> 819x512 -> 768x512
    tall = Image.fromarray(rng.integers(0, 256, (1600, 1000, 3), dtype=np.uint8))
    assert crops.eval_crop(tall, 512, 768).size == (512, 768)
    # Small enough already: not resized, only the long side cropped, around the centre.
    small = rng.integers(0, 256, (400, 900, 3), dtype=np.uint8)
    out = np.asarray(crops.eval_crop(Image.fromarray(small), 512, 768))
    assert out.shape == (400, 768, 3)
    np.testing.assert_array_equal(out, small[:, 66:834])
    square = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(crops.eval_crop(Image.fromarray(square), 512, 768)), square)
    grey = Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8))
    assert crops.eval_crop(grey, 512, 768).mode == "RGB"


def test_cli(tmp_path, package_env):
    src, out = tmp_path / "val", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(6)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)).save(src / f"v{i}.jpg")
    (src / "notes.txt").write_text("not a picture")
    r = subprocess.run(
        [sys.executable, SCRIPT, str(src), str(out), "--count", "3"], capture_output=True, text=True, env=package_env
    )
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["v0.png", "v2.png", "v4.png"]
    assert all(Image.open(out / n).size == (768, 512) for n in os.listdir(out))
    r = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path / "empty_or_missing"), str(out)],
        capture_output=True,
        text=True,
        env=package_env,
    )
    assert r.returncode != 0
