"""python/gather_data.py on a fake offline tree: the shared folders plus an already-filled download
cache (unpacked .debs, wheels), so nothing is fetched. Checks the promises the training split rests
on: one copy per picture (the largest), no picture in both splits at any size, forced held-out
pictures (the demo photo), greyscale skipped, licences in the manifest, and a stable split across re-runs."""

import csv
import importlib.util
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gather_data():
    spec = importlib.util.spec_from_file_location("gather_data", os.path.join(ROOT, "python", "gather_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _picture(rng, size):
    """A distinct picture whose average hash is unambiguous at any size: an 8x8 grid of dark and light
    colour blocks (half of each, far from the mean), aligned with the hash's 16x16 cells."""
    light = rng.permutation(64) < 32
    grid = np.where(light[:, None], rng.integers(215, 256, (64, 3)), rng.integers(0, 41, (64, 3)))
    return Image.fromarray(grid.astype(np.uint8).reshape(8, 8, 3)).resize(size, Image.NEAREST)


def _save(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def tree(tmp_path, gather_data):
    rng = np.random.default_rng()
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    pics = {name: _picture(rng, (320, 240)) for name in ("a", "c", "e", "kite", "mate")}
    train = shared / "train"
    _save(pics["a"], train / "cid22" / "training" / "a.png")
    _save(pics["a"].convert("L"), train / "cid22" / "training" / "grey.png")
    _save(pics["c"], train / "cid22" / "validation" / "c.png")
    # CID22 itself holds a few pictures in both folders: the first copy seen decides the split.
    _save(pics["a"], train / "cid22" / "validation" / "a_again.png")
    # The same pictures again in another source: a smaller copy of a, a larger copy of held-out c.
    _save(pics["a"].resize((160, 120), Image.LANCZOS), train / "clic2025_half" / "a_small.png")
    _save(pics["c"].resize((640, 480), Image.LANCZOS), train / "clic2025_half" / "c_large.png")
    _save(pics["e"].resize((1200, 900), Image.BICUBIC), train / "sunhays80" / "e.png")
    # Unpacked Debian packages: one plasma wallpaper at two sizes (the others are absent), one mate photo.
    kite = cache / "plasma-workspace-wallpapers" / "usr/share/wallpapers/Kite/contents/images"
    _save(pics["kite"].resize((400, 300)), kite / "400x300.png")
    _save(pics["kite"].resize((480, 360)), kite / "480x360.png")
    _save(pics["mate"].convert("RGB"), cache / "mate-backgrounds" / "usr/share/backgrounds/mate/nature/m.jpg")
    # Wheels: zips holding every listed member, each a distinct picture.
    for project, members in gather_data.WHEEL_PHOTOS.items():
        with zipfile.ZipFile(cache / f"{project.replace('-', '_')}-0.0-py3-none-any.whl", "w") as zf:
            for member in members:
                photo = _picture(rng, (160, 120))
                zf.write(_save(photo, tmp_path / "wheel-src" / member), member)
                if member.endswith("astronaut.png"):  # the demo photo, also (larger) in a shared folder
                    _save(photo.resize((320, 240), Image.NEAREST), train / "sunhays80" / "astro.png")
    return shared, cache


def _manifest(out):
    with open(out / "manifest.csv") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def test_one_copy_per_picture_never_in_both_splits(tree, tmp_path, gather_data):
    shared, cache = tree
    out = tmp_path / "pool"
    assert (
        gather_data.main(["--shared", str(shared), "--out", str(out), "--cache", str(cache), "--max-side", "1000"]) == 0
    )
    rows = _manifest(out)
    files = {f: Image.open(out / f).convert("RGB") for f in rows}
    assert set(os.listdir(out / "train")) | set(os.listdir(out / "val")) == {os.path.basename(f) for f in rows}

    # a: the first cid22 copy (320x240) is kept, not the half-size one nor the equal-size copy in CID22's
    # validation folder; its split is that of the first copy, "training".
    assert rows["train/cid22__a.png"]["width"] == "320"
    assert not any("a_small" in f or "a_again" in f for f in rows)
    # c: held out by CID22's validation folder; the larger copy from the other source is kept, in val.
    assert rows["val/clic2025__c_large.png"]["width"] == "640"
    assert not any(f.endswith("cid22__c.png") for f in rows)
    # greyscale skipped; the largest plasma size; wallpapers missing from the package are skipped.
    assert not any("grey" in f for f in rows)
    kite = [r for r in rows.values() if r["source"] == "plasma-wallpapers"]
    assert [(r["picture"], r["width"]) for r in kite] == [("Kite", "480")]
    # --max-side downscales; the demo photo (astronaut) is always held out.
    assert max(max(img.size) for img in files.values()) <= 1000
    assert [files[f].size for f, r in rows.items() if r["picture"] == "e"] == [(1000, 750)]
    # The demo photo is held out even when a larger copy elsewhere, seen first, is the one kept.
    assert rows["val/sunhays80__astro.png"]["width"] == "320"
    assert not any("astronaut" in f for f in rows)
    assert len(rows) == 3 + 2 + sum(len(m) for m in gather_data.WHEEL_PHOTOS.values())  # astronaut once
    for f, r in rows.items():
        assert r["licence"] and r["origin"] and f.startswith(r["split"] + "/")
        assert files[f].size == (int(r["width"]), int(r["height"]))

    # No picture in both splits, at any size: every train/val pair differs in its average hash.
    hashes = {f: gather_data.average_hash(img) for f, img in files.items()}
    for f in rows:
        for g in rows:
            if f < g and rows[f]["split"] != rows[g]["split"]:
                assert np.count_nonzero(hashes[f] != hashes[g]) > 6, (f, g)

    # A re-run gives the same pool and the same split.
    again = tmp_path / "again"
    gather_data.main(["--shared", str(shared), "--out", str(again), "--cache", str(cache), "--max-side", "1000"])
    assert _manifest(again) == rows


def test_empty_sources_are_refused(tmp_path, gather_data):
    with pytest.raises(SystemExit, match="no pictures"):
        gather_data.gather([], str(tmp_path / "pool"))


def test_the_data_folder_is_explicit(gather_data, tmp_path, capsys):
    """--shared names the data folder: no default location is assumed."""
    with pytest.raises(SystemExit) as exc:
        gather_data.main(["--out", str(tmp_path / "pool")])
    assert exc.value.code == 2 and "--shared" in capsys.readouterr().err
