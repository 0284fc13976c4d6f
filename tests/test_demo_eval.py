"""The demo, the R-D evaluation and the metrics behind them."""

import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dualres_ext.tools.classic import available_codecs, match_size
from dualres_ext.tools.metrics import bd_rate, ms_ssim, psnr


@pytest.fixture(scope="module")
def random_model():
    from dualres_ext.models import build

    torch.manual_seed(0)
    model = build("compact").eval()
    model.update(force=True)
    return model


def _photo(size=(192, 128)):
    from dualres_ext.tools.demo import BUNDLED_PHOTO

    return Image.open(BUNDLED_PHOTO).convert("RGB").resize(size, Image.LANCZOS)


def test_psnr_matches_numpy():
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    assert psnr(a, a) == float("inf")


def test_ms_ssim_matches_pytorch_msssim():
    ref = pytest.importorskip("pytorch_msssim")
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (200, 180, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    ta, tb = (torch.from_numpy(v).permute(2, 0, 1)[None].double() for v in (a, b))
    # pytorch_msssim builds its default Gaussian window in float32 (about 1e-6 off in the final value);
    # hand it the same window in float64 so the comparison can be tight.
    x = torch.arange(11, dtype=torch.float64) - 5
    window = torch.exp(-(x**2) / (2 * 1.5**2))
    window = (window / window.sum()).repeat(3, 1, 1, 1)
    expected = ref.ms_ssim(ta, tb, data_range=255, win=window).item()
    assert ms_ssim(a, b) == pytest.approx(expected, abs=1e-10)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="161"):
        ms_ssim(a[:100], b[:100])


def test_bd_rate_recovers_a_known_rate_change():
    rng = np.random.default_rng()
    rates = np.sort(rng.uniform(0.1, 2.0, 6))
    quality = 30 + 6 * np.log2(rates) + rng.normal(0, 0.01, 6)
    factor = rng.uniform(0.5, 1.5)
    assert bd_rate(rates, quality, rates * factor, quality) == pytest.approx((factor - 1) * 100, abs=1e-6)
    with pytest.raises(ValueError):
        bd_rate(rates[:3], quality[:3], rates[:3], quality[:3])
    with pytest.raises(ValueError, match="overlap"):
        bd_rate(rates, quality, rates, quality + 100)


def test_evaluation_bd_rates_on_psnr_and_ms_ssim():
    """Both BD-rates of the summary: ours is the anchor curve at a known fraction of its rate."""
    from dualres_ext.tools.evaluation import bd_rates, ms_ssim_db

    rng = np.random.default_rng()
    rates = np.sort(rng.uniform(0.1, 2.0, 8))
    factor = rng.uniform(0.5, 1.5)
    psnrs = 30 + 6 * np.log2(rates)
    ms_db = 12 + 5 * np.log2(rates)  # MS-SSIM in dB, converted back to MS-SSIM in the curves
    curves = []
    for codec, scale in (("jpeg420", 1.0), ("dualres", factor)):
        for r, p, m in zip(rates, psnrs, ms_db):
            curves.append({"codec": codec, "bpp": r * scale, "psnr": p, "ms_ssim": 1 - 10 ** (-m / 10)})
    assert ms_ssim_db(curves[0]["ms_ssim"]) == pytest.approx(ms_db[0])
    for metric in ("psnr", "ms_ssim_db"):
        bd = bd_rates(curves, ["jpeg420"], metric, log=lambda *_: None)
        assert bd["jpeg420"] == pytest.approx((factor - 1) * 100, abs=1e-6)
    # MS-SSIM is NaN for images too small for its five scales: no BD-rate rather than a wrong one.
    for c in curves[:2]:
        c["ms_ssim"] = float("nan")
    messages = []
    assert bd_rates(curves, ["jpeg420"], "ms_ssim_db", log=messages.append) == {"jpeg420": None}
    assert messages and "not computable" in messages[0]
    assert bd_rates(curves, ["jpeg420"], "psnr", log=lambda *_: None)["jpeg420"] == pytest.approx(
        (factor - 1) * 100, abs=1e-6
    )


def test_psnr_differences_at_our_rates():
    """Ours is the anchor curve raised by a known amount per point: the differences recover it,
    and rates outside the anchor's range get None."""
    from dualres_ext.tools.evaluation import psnr_differences

    rng = np.random.default_rng()
    rates = np.sort(rng.uniform(0.1, 2.0, 7))
    anchor = [{"codec": "webp", "bpp": r, "psnr": 30 + 6 * np.log2(r)} for r in rates]
    # Our rates lie between the anchor's points, where its curve is linear in log-rate.
    ours_rates = np.sqrt(rates[:-1] * rates[1:])
    offsets = rng.uniform(-1, 1, len(ours_rates))
    ours = [{"codec": "dualres", "bpp": r, "psnr": 30 + 6 * np.log2(r) + o} for r, o in zip(ours_rates, offsets)]
    outside = [
        {"codec": "dualres", "bpp": rates[0] / 2, "psnr": 20.0},
        {"codec": "dualres", "bpp": rates[-1] * 2, "psnr": 40.0},
    ]
    diffs = psnr_differences(anchor + ours[::-1] + outside, ["webp"])["webp"]
    assert diffs[0] is None and diffs[-1] is None  # sorted by rate: the two outside points at the ends
    np.testing.assert_allclose(diffs[1:-1], offsets, atol=1e-9)


def test_match_size_never_exceeds_the_target():
    rgb = np.asarray(_photo())
    codec = available_codecs()["jpeg420"]
    target = len(codec.encode(rgb, 50))
    q, data = match_size(codec, rgb, target)
    assert len(data) <= target and q >= 45
    assert match_size(codec, rgb, 10) is None


def test_demo_writes_reconstructions_and_comparison(tmp_path, random_model):
    from dualres_ext.tools.demo import run_demo

    image = tmp_path / "photo.png"
    _photo().save(image)
    lines = []
    rows = run_demo(str(image), str(tmp_path / "out"), qualities=(0, 5), weights=random_model, log=lines.append)
    assert [r["quality"] for r in rows] == [0, 5]
    for r in rows:
        assert r["bytes"] > 0 and r["bpp"] == pytest.approx(8 * r["bytes"] / (192 * 128))
        assert math.isfinite(r["psnr"])
        assert os.path.exists(tmp_path / "out" / f"dualres_q{r['quality']}.png")
    assert os.path.exists(tmp_path / "out" / "side_by_side.png")
    assert any("JPEG" in line for line in lines)


def test_demo_picture_shows_full_views_and_enlarged_details(tmp_path, random_model):
    """side_by_side.png: the original, DualRes, JPEG and WebP at full size, and under them the same
    detail region of each enlarged with nearest-neighbour sampling."""
    from dualres_ext.tools.demo import MARGIN, side_by_side

    image = tmp_path / "photo.png"
    _photo().save(image)  # 192 x 128
    rows = run_demo_quietly(image, tmp_path / "out", random_model)
    sheet = np.asarray(Image.open(tmp_path / "out" / "side_by_side.png").convert("RGB"))
    rgb = np.asarray(Image.open(image).convert("RGB"))
    peers = [k for k in ("jpeg420", "webp") if rows[0].get(k)]
    views = [("DualRes q0", "", np.asarray(Image.open(tmp_path / "out" / "dualres_q0.png").convert("RGB")))] + [
        (k, "", np.asarray(Image.open(tmp_path / "out" / f"{k}_same_size_as_q0.png").convert("RGB"))) for k in peers
    ]
    again, layout = side_by_side(rgb, views)
    assert sheet.shape == np.asarray(again).shape
    # Two rows (full views, then details), one column per picture.
    full_row = MARGIN + layout["label_height"] + 128
    assert sheet.shape[0] > full_row + layout["label_height"] + 64 and sheet.shape[1] == MARGIN + (1 + len(views)) * (
        192 + MARGIN
    )
    assert len(layout["full"]) == len(layout["crops"]) == 1 + len(views)
    x0, y0, cw, ch = layout["box"]
    zoom = layout["zoom"]
    assert zoom == 2 and (cw, ch) == (96, 64)
    for picture, (fx, fy), (cx, cy) in zip([rgb] + [v[2] for v in views], layout["full"], layout["crops"]):
        if picture is not rgb:  # the original carries the frame around the detail region
            np.testing.assert_array_equal(sheet[fy : fy + 128, fx : fx + 192], picture)
        detail = picture[y0 : y0 + ch, x0 : x0 + cw].repeat(zoom, axis=0).repeat(zoom, axis=1)
        np.testing.assert_array_equal(sheet[cy : cy + ch * zoom, cx : cx + cw * zoom], detail)
    # The labels are drawn: dark text pixels above each full view and each detail.
    for x, y in layout["full"] + layout["crops"]:
        assert (sheet[y - layout["label_height"] : y, x : x + 192] < 100).any()


def test_detail_window_finds_the_largest_error():
    from dualres_ext.tools.demo import detail_window

    rgb = np.zeros((64, 96, 3), np.uint8)
    a, b = rgb.copy(), rgb.copy()
    a[40:50, 60:70] = 200  # one codec's error ...
    b[44:52, 62:72] = 100  # ... and another's, nearby
    x, y = detail_window(rgb, [a, b], 16, 16, step=1)
    assert 56 <= x <= 60 and 36 <= y <= 40  # a 16x16 window covering both error patches
    assert detail_window(rgb, [rgb], 200, 200) == (0, 0)  # window larger than the picture: clipped


def run_demo_quietly(image, out, weights):
    from dualres_ext.tools.demo import run_demo

    return run_demo(str(image), str(out), qualities=(0,), weights=weights, log=lambda *_: None)


def test_demo_with_refinement_shows_refined_streams(tmp_path):
    """With the shipped weights (a random model's refinement may keep its start)."""
    from dualres_ext import codec
    from dualres_ext.tools.demo import run_demo

    image = tmp_path / "photo.png"
    _photo((128, 128)).save(image)
    rgb = np.asarray(Image.open(image).convert("RGB"))
    lines = []
    rows = run_demo(str(image), str(tmp_path / "out"), qualities=(1,), log=lines.append, refine_steps=2)
    refined, plain = codec.encode(rgb, quality=1, refine_steps=2), codec.encode(rgb, quality=1)
    assert refined != plain  # so the checks below can tell the two apart
    assert rows[0]["bytes"] == len(refined)
    assert rows[0]["psnr"] == pytest.approx(psnr(rgb, codec.decode(refined, output="numpy")))
    assert "latent refinement 2 steps + up to 3 rounds" in lines[0]
    with pytest.raises(ValueError, match="refine_steps"):
        run_demo(str(image), str(tmp_path / "out"), qualities=(1,), log=lines.append, refine_steps=-1)


def test_evaluation_writes_curves_and_bd_rates(tmp_path, random_model):
    from dualres_ext.tools.evaluation import evaluate

    folder = tmp_path / "images"
    folder.mkdir()
    _photo((192, 192)).save(folder / "a.png")
    _photo((160, 176)).save(folder / "b.png")
    summary = evaluate(
        str(folder),
        str(tmp_path / "out"),
        weights=random_model,
        qualities=[0, 2, 4, 5],
        codecs=["jpeg420", "webp"],
        log=lambda *_: None,
    )
    assert summary["images"] == 2
    with open(tmp_path / "out" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["codec"] == "dualres"]
    assert len(ours) == 2 * 4
    assert {r["codec"] for r in rows} == {"dualres", "jpeg420", "webp"}
    assert set(summary["bd_rate_psnr_percent"]) == {"jpeg420", "webp"}
    assert set(summary["bd_rate_ms_ssim_percent"]) == {"jpeg420", "webp"}
    assert {k: len(v) for k, v in summary["psnr_difference_db_at_our_rates"].items()} == {"jpeg420": 4, "webp": 4}
    with open(tmp_path / "out" / "summary.json") as f:
        assert json.load(f)["qualities"] == [0, 2, 4, 5]
    assert os.path.getsize(tmp_path / "out" / "rd.png") > 1000
    with pytest.raises(ValueError, match="not available"):
        evaluate(str(folder), str(tmp_path / "out2"), weights=random_model, codecs=["nope"])


def test_evaluation_reuses_anchor_rows(tmp_path, random_model, monkeypatch):
    """--anchors: the classical codecs' rows of an earlier run come back unchanged, without coding."""
    from dualres_ext.tools import evaluation

    folder = tmp_path / "images"
    folder.mkdir()
    _photo((192, 192)).save(folder / "a.png")
    first = evaluation.evaluate(
        str(folder),
        str(tmp_path / "first"),
        weights=random_model,
        qualities=[0, 5],
        codecs=["jpeg420"],
        log=lambda *_: None,
    )
    real = evaluation.available_codecs

    def no_coding():
        codecs = real()

        def refuse(*_):
            raise AssertionError("an anchor was coded again")

        codecs["jpeg420"] = dataclasses.replace(codecs["jpeg420"], encode=refuse)
        return codecs

    monkeypatch.setattr(evaluation, "available_codecs", no_coding)
    second = evaluation.evaluate(
        str(folder),
        str(tmp_path / "second"),
        weights=random_model,
        qualities=[0, 5],
        codecs=["jpeg420"],
        log=lambda *_: None,
        anchors=str(tmp_path / "first" / "per_image.csv"),
    )
    jpeg = [[c for c in r["curves"] if c["codec"] == "jpeg420"] for r in (first, second)]
    assert jpeg[0] == jpeg[1] and len(jpeg[0]) == len(real()["jpeg420"].qualities)
    assert second["bd_rate_psnr_percent"].keys() == {"jpeg420"}


def test_evaluation_in_worker_processes_measures_the_same_streams(tmp_path, random_model):
    """workers=2: the same rows (bytes, quality; file order in the summary) as one process."""
    from dualres_ext import codec
    from dualres_ext.tools.evaluation import evaluate

    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("a.png", (192, 128)), ("b.png", (128, 160)), ("c.png", (144, 144))):
        _photo(size).save(folder / name)
    weights = str(tmp_path / "w.pt")
    codec.save_weights(random_model, weights)
    runs = {}
    for workers in (1, 2):
        runs[workers] = evaluate(
            str(folder),
            str(tmp_path / f"out{workers}"),
            weights=weights,
            qualities=[0, 3],
            codecs=["jpeg420"],
            log=lambda *_: None,
            workers=workers,
        )
        with open(tmp_path / f"out{workers}" / "per_image.csv") as f:
            rows = sorted((r["image"], r["codec"], r["quality"], r["bytes"], r["psnr"]) for r in csv.DictReader(f))
        curves = [{k: v for k, v in c.items() if not k.endswith("_ms")} for c in runs[workers]["curves"]]
        runs[workers] = (rows, json.dumps(curves, sort_keys=True))  # as text: MS-SSIM is NaN on small pictures
    assert len(runs[1][0]) == 3 * (2 + len(available_codecs()["jpeg420"].qualities))
    assert runs[2] == runs[1]


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_evaluation_refuses_bad_workers(tmp_path, random_model, workers):
    from dualres_ext.tools.evaluation import evaluate

    with pytest.raises(ValueError, match="workers"):
        evaluate(str(tmp_path), str(tmp_path / "out"), weights=random_model, workers=workers)


def test_evaluation_in_workers_needs_weights_by_path(tmp_path, random_model):
    from dualres_ext.tools.evaluation import evaluate

    with pytest.raises(ValueError, match="weights must be None or a path"):
        evaluate(str(tmp_path), str(tmp_path / "out"), weights=random_model, workers=2)


def test_evaluation_with_refinement_measures_refined_streams(tmp_path):
    """With the shipped weights: a random model's refinement may keep its start (no change to see)."""
    from dualres_ext import codec
    from dualres_ext.tools.evaluation import evaluate

    folder = tmp_path / "images"
    folder.mkdir()
    _photo((128, 128)).save(folder / "a.png")
    summary = evaluate(
        str(folder), str(tmp_path / "out"), qualities=[1], codecs=["jpeg420"], log=lambda *_: None, refine_steps=2
    )
    assert summary["refine_steps"] == 2 and summary["refine_rounds"] == 3
    with open(tmp_path / "out" / "per_image.csv") as f:
        ours = [r for r in csv.DictReader(f) if r["codec"] == "dualres"]
    rgb = np.asarray(Image.open(folder / "a.png").convert("RGB"))
    refined = codec.encode(rgb, quality=1, refine_steps=2)
    assert refined != codec.encode(rgb, quality=1)  # so the check below can tell
    assert int(ours[0]["bytes"]) == len(refined)
    assert float(ours[0]["psnr"]) == pytest.approx(psnr(rgb, codec.decode(refined, output="numpy")))


def test_eval_command_lines_pass_workers_refinement_and_qualities(tmp_path, monkeypatch):
    """`python -m dualres_ext eval` and python/eval_rd.py (the same command) hand --workers,
    --refine-steps, --refine-rounds and --qualities on."""
    import importlib.util

    from dualres_ext.tools import evaluation
    from dualres_ext.tools.cli import main

    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: seen.append(kwargs) or {})
    assert (
        main(
            [
                "eval",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--workers",
                "2",
                "--refine-steps",
                "3",
                "--refine-rounds",
                "5",
            ]
        )
        == 0
    )
    script = os.path.join(os.path.dirname(__file__), os.pardir, "python", "eval_rd.py")
    spec = importlib.util.spec_from_file_location("eval_rd", script)
    eval_rd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_rd)
    assert (
        eval_rd.main(
            [
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--workers",
                "3",
                "--refine-steps",
                "4",
                "--qualities",
                "0",
                "2.5",
                "5",
            ]
        )
        == 0
    )
    assert [(k["workers"], k["refine_steps"], k["refine_rounds"]) for k in seen] == [(2, 3, 5), (3, 4, None)]
    assert seen[0]["qualities"] is None
    assert seen[1]["qualities"] == [0, 2.5, 5] and isinstance(seen[1]["qualities"][0], int)
    assert main(["eval", str(tmp_path), "--out", str(tmp_path / "o"), "--qualities", "1"]) == 0
    assert seen[-1]["qualities"] == [1]
    assert (seen[-1]["workers"], seen[-1]["refine_steps"], seen[-1]["refine_rounds"]) == (1, 0, None)


def test_installed_script_is_the_command_line():
    """pyproject's ``dualres`` entry point names the function ``python -m dualres_ext`` runs."""
    import importlib

    import dualres_ext.__main__
    from dualres_ext.tools import cli

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["dualres"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main is dualres_ext.__main__.main
