"""The training scripts end to end on a toy folder: python/train.py (train, validate, checkpoint,
resume, the lr drop), python/widen_model.py, python/export_weights.py, and the exported file
through encode/decode. What they share (dualres_ext.training) is tested in test_training_lib.py."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dualres_ext import codec
from dualres_ext.models import build
from dualres_ext.models.dualres import CODING_NETS
from dualres_ext.tools.demo import BUNDLED_PHOTO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASTRONAUT = str(BUNDLED_PHOTO)

pytestmark = pytest.mark.slow


def _run(args, env, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three training photos (one a TIFF) and one validation photo cut from the bundled demo photo."""
    base = tmp_path_factory.mktemp("pool")
    photo = Image.open(ASTRONAUT).convert("RGB")
    train, val = base / "train", base / "val"
    train.mkdir()
    val.mkdir()
    for i, box in enumerate(((0, 0, 160, 160), (200, 40, 392, 232), (100, 250, 260, 410))):
        photo.crop(box).save(train / f"t{i}.{'tif' if i == 2 else 'png'}")
    photo.crop((300, 300, 428, 428)).save(val / "v0.png")
    return train, val, base


def _train_args(folders, out, *extra):
    train, val, _ = folders
    return [
        "python/train.py",
        "--train",
        str(train),
        "--val",
        str(val),
        "--out",
        str(out),
        "--model",
        "compact",
        "--crop",
        "64",
        "--batch",
        "2",
        "--val-size",
        "128",
        "--val-every",
        "2",
        "--save-every",
        "1",
        "--threads",
        "1",
        *extra,
    ]


def test_train_resume_export_and_code(folders, package_env):
    out = folders[2] / "run"
    r = _run(_train_args(folders, out, "--steps", "3"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val loss" in r.stdout and os.path.isfile(out / "best.pt")
    assert ", 3 training photos," in r.stdout  # the TIFF too
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == 3 and last["model_name"] == "compact"
    final = json.loads(r.stdout[r.stdout.index('{"step"') :].splitlines()[0])
    assert final["step"] == 3 and len(final["per_quality"]) == 6
    assert all(np.isfinite(q["loss"]) and q["bpp"] > 0 for q in final["per_quality"])

    # Rerunning the command resumes from last.pt (model, optimisers, step).
    r = _run(_train_args(folders, out, "--steps", "5"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout and "at step 3" in r.stdout
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert resumed["step"] == 5
    assert any(not torch.equal(resumed["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])

    # Other validation crops: their losses are not comparable, so best.pt restarts.
    r = _run(_train_args(folders, out, "--steps", "6") + ["--val-size", "64"], package_env)
    assert r.returncode == 0 and "validation crops changed (128 -> 64 px)" in r.stdout, r.stderr[-3000:]
    assert torch.load(out / "best.pt", map_location="cpu", weights_only=False)["step"] == 6

    # Export, then the codec loads the file and round-trips an image with it.
    weights = folders[2] / "exported.pt"
    r = _run(["python/export_weights.py", str(out / "best.pt"), str(weights)], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    model = codec.load_weights(weights)
    assert model.metadata["steps"] in (2, 4, 5, 6) and "python/train.py" in model.metadata["training_command"]
    # The lineage: the three runs' commands, from the steps they started at.
    lineage = model.metadata["lineage"]
    assert [e["step"] for e in lineage] == [0, 3, 5]
    assert "--steps 6" in lineage[-1]["command"] and "--val-size 64" in lineage[-1]["command"]
    img = np.asarray(Image.open(ASTRONAUT).convert("RGB"))[:70, :90]
    data = codec.encode(img, quality=2, weights=str(weights))
    back = codec.decode(data, weights=str(weights), output="numpy")
    assert back.shape == img.shape

    # --init: a new run from the exported weights (the optimiser starts fresh); the step count and
    # the lineage carry on.
    steps = model.metadata["steps"]
    r = _run(
        _train_args(folders, folders[2] / "from-init", "--init", str(weights), "--steps", str(steps + 1)), package_env
    )
    assert r.returncode == 0 and f"initialised from {weights} (step {steps})" in r.stdout, r.stderr[-3000:]
    ckpt = torch.load(folders[2] / "from-init" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == steps + 1
    assert [h["step"] for h in ckpt["history"] if "command" in h] == [0, 3, 5, steps]
    assert "--init" in [h for h in ckpt["history"] if "command" in h][-1]["command"]


def test_lr_drop_minutes(folders, package_env):
    out = folders[2] / "drop"
    # The whole (tiny) run lies inside the drop window: the lr is divided at the first step.
    r = _run(
        _train_args(folders, out, "--minutes", "0.5", "--lr-drop-minutes", "1", "--steps", "2", "--lr", "3e-4"),
        package_env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lr divided by 10" in r.stdout
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-5)

    r = _run(_train_args(folders, out, "--lr-drop-minutes", "1"), package_env)
    assert r.returncode == 2 and "--lr-drop-minutes needs --minutes" in r.stderr


def test_quality_weights_choose_the_trained_rates(folders, package_env):
    out = folders[2] / "top"
    r = _run(_train_args(folders, out, "--steps", "2", "--quality-weights", "0", "0", "0", "0", "0", "1"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    lambdas = ckpt["config"]["lambdas"]
    gains = ckpt["state_dict"]["gain_l"]
    # Only the top quality was drawn: the other rows keep their initialisation (0.5 log(l_q / l_mid)).
    start = torch.tensor([0.5 * np.log(v / lambdas[len(lambdas) // 2]) for v in lambdas], dtype=torch.float32)
    torch.testing.assert_close(gains[:-1], start[:-1, None].expand_as(gains[:-1]), rtol=0, atol=1e-6)
    assert (gains[-1] - start[-1]).abs().max() > 1e-6
    # The validation still covers every quality.
    assert len(ckpt["history"][-1]["val"]["per_quality"]) == len(lambdas)

    r = _run(_train_args(folders, folders[2] / "bad", "--steps", "1", "--quality-weights", "1", "1"), package_env)
    assert r.returncode == 1 and "2 weights for a model with 6 qualities" in r.stderr
    r = _run(_train_args(folders, folders[2] / "bad", "--quality-weights", "-1", "1", "1", "1", "1", "1"), package_env)
    assert r.returncode == 2 and "--quality-weights must be" in r.stderr


def test_warmup_steps_ramp_a_fresh_optimiser_only(folders, package_env):
    out = folders[2] / "warmup"
    # Step k of a fresh run trains at lr * (k + 1) / N: the second of two steps at half the lr.
    r = _run(_train_args(folders, out, "--steps", "2", "--lr", "4e-4", "--warmup-steps", "4"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-4)
    # A resumed run keeps its Adam moments: no second warm-up, the full lr at once.
    r = _run(_train_args(folders, out, "--steps", "3", "--lr", "4e-4", "--warmup-steps", "4"), package_env)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(4e-4)

    r = _run(_train_args(folders, out, "--warmup-steps", "-1"), package_env)
    assert r.returncode == 2 and "--warmup-steps must be >= 0" in r.stderr


def test_ema_validates_the_average_and_keeps_the_better(folders, package_env):
    out = folders[2] / "ema"
    r = _run(_train_args(folders, out, "--steps", "3", "--ema", "0.5", "--lr", "3e-4"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weight average (decay 0.5) starts from the current weights" in r.stdout
    assert "ema val loss" in r.stdout
    finals = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"step"')]
    assert [f["weights"] for f in finals] == ["trained", "average"]
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert last["ema_decay"] == 0.5 and last["weights"] == "trained"
    ema, trained = last["ema_state_dict"], last["state_dict"]
    assert set(ema) == set(trained)
    assert any(not torch.equal(ema[k], trained[k]) for k in trained if trained[k].is_floating_point())

    # best.pt holds whichever of the two validated lowest, with that loss.
    losses = [(h.get("val") or h.get("val_ema"))["loss"] for h in last["history"] if "val" in h or "val_ema" in h]
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert best["best_val"] == pytest.approx(min(losses))
    kind = best["weights"]
    best_entry = [h for h in best["history"] if h.get("step") == best["step"] and ("val" in h or "val_ema" in h)][-1]
    assert ("val_ema" in best_entry) == (kind == "average")
    if kind == "average":
        for k, v in best["state_dict"].items():
            torch.testing.assert_close(v, best["ema_state_dict"][k])

    # Resuming carries the average on; the exported file says which weights it holds.
    r = _run(_train_args(folders, out, "--steps", "4", "--ema", "0.5"), package_env)
    assert r.returncode == 0 and "weight average (decay 0.5) resumed" in r.stdout, r.stderr[-3000:]
    weights = folders[2] / "ema-exported.pt"
    r = _run(["python/export_weights.py", str(out / "best.pt"), str(weights)], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = codec.load_weights(weights).metadata
    exported = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert meta["weights"].startswith("average") == (exported["weights"] == "average")
    assert meta["validation"]["loss"] == pytest.approx(exported["best_val"])

    r = _run(_train_args(folders, out, "--ema", "1"), package_env)
    assert r.returncode == 2 and "--ema must lie strictly between 0 and 1" in r.stderr


def test_widened_checkpoint_resumes_and_weights_decode_alike(folders, package_env):
    """python/widen_model.py: a checkpoint comes out as one train.py resumes (step, history and
    Adam moments kept, the moments widened); a weights file as one that decodes to the same picture."""
    out, wide = folders[2] / "narrow", folders[2] / "wide"
    r = _run(_train_args(folders, out, "--steps", "2"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    narrow = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    cfg = narrow["config"]
    n_s, n1_s = cfg["N_s"] + 16, cfg["N1_s"] + 8
    r = _run(
        ["python/widen_model.py", str(out / "last.pt"), str(wide / "last.pt"), "--N_s", str(n_s), "--N1_s", str(n1_s)],
        package_env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"N_s {cfg['N_s']} -> {n_s}, N1_s {cfg['N1_s']} -> {n1_s}" in r.stdout, r.stdout
    widened = torch.load(wide / "last.pt", map_location="cpu", weights_only=False)
    assert widened["config"]["N_s"] == n_s and widened["config"]["N1_s"] == n1_s and widened["step"] == 2
    moments = widened["optimizer"]["state"]
    shapes = {tuple(v.shape) for v in widened["state_dict"].values()}
    assert all(tuple(e["exp_avg"].shape) in shapes for e in moments.values())
    assert len(moments) == len(narrow["optimizer"]["state"])
    r = _run(["python/widen_model.py", str(out / "last.pt"), str(wide / "last.pt"), "--N", "512"], package_env)
    assert r.returncode != 0 and "exists" in r.stderr

    # train.py resumes the widened run with its own configuration (not --model's).
    r = _run(_train_args(folders, wide, "--steps", "3"), package_env)
    assert r.returncode == 0 and "resumed" in r.stdout and "at step 2" in r.stdout, r.stderr[-3000:]
    resumed = torch.load(wide / "last.pt", map_location="cpu", weights_only=False)
    assert resumed["step"] == 3 and resumed["config"]["N_s"] == n_s
    assert resumed["state_dict"]["g_s.5.weight"][cfg["N1_s"] :].abs().max() > 0  # the new channels train

    # A weights file widens to a weights file (here analysis and synthesis); both decode a
    # stream to the same picture.
    narrow_w, wide_w = folders[2] / "narrow-w.pt", folders[2] / "wide-w.pt"
    r = _run(["python/export_weights.py", str(out / "last.pt"), str(narrow_w)], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(
        ["python/widen_model.py", str(narrow_w), str(wide_w), "--N1_s", str(n1_s), "--N", str(cfg["N"] + 16)],
        package_env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    model = codec.load_weights(wide_w)
    assert model.config["N1_s"] == n1_s and model.metadata["lineage"][-1]["widened"]["N1_s"] == n1_s
    assert "widened" not in model.metadata  # recorded once, in the lineage
    assert model.config["N"] == cfg["N"] + 16 and model.config["N_s"] == cfg["N_s"]
    assert model.metadata["lineage"][-1]["widened"]["N"] == cfg["N"] + 16
    assert "python/train.py" in model.metadata["lineage"][0]["command"]
    img = np.asarray(Image.open(ASTRONAUT).convert("RGB"))[:70, :90]
    a = codec.decode(codec.encode(img, quality=3, weights=str(narrow_w)), weights=str(narrow_w), output="numpy")
    b = codec.decode(codec.encode(img, quality=3, weights=str(wide_w)), weights=str(wide_w), output="numpy")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float16 storage of the new layout

    r = _run(["python/widen_model.py", str(ASTRONAUT), str(folders[2] / "x.pt"), "--N", "512"], package_env)
    assert r.returncode != 0 and "neither" in r.stderr
    r = _run(["python/widen_model.py", str(narrow_w), str(folders[2] / "x.pt")], package_env)
    assert r.returncode != 0 and "nothing to do" in r.stderr


def test_modulated_checkpoint_resumes_with_its_own_lr_and_exports(folders, package_env):
    """widen_model.py --modulation: the checkpoint resumes with the modulation in a parameter group
    of its own (lr times --modulation-lr-scale), the old moments kept; the tables train; the
    exported weights code with it."""
    out, mod = folders[2] / "plain", folders[2] / "mod"
    r = _run(_train_args(folders, out, "--steps", "2"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    plain = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    r = _run(["python/widen_model.py", str(out / "last.pt"), str(mod / "last.pt"), "--modulation"], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "modulation False -> True" in r.stdout and "pictures equal to 0.0e+00" in r.stdout, r.stdout
    grown = torch.load(mod / "last.pt", map_location="cpu", weights_only=False)
    groups = grown["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["main", "modulation"]
    n_old = len(plain["optimizer"]["param_groups"][0]["params"])
    assert groups[0]["params"] == list(range(n_old)) and groups[1]["params"][0] == n_old
    assert grown["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()

    r = _run(_train_args(folders, mod, "--steps", "4", "--lr", "2e-4", "--modulation-lr-scale", "5"), package_env)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-3000:]
    resumed = torch.load(mod / "last.pt", map_location="cpu", weights_only=False)
    lrs = {g["name"]: g["lr"] for g in resumed["optimizer"]["param_groups"]}
    assert lrs == {"main": pytest.approx(2e-4), "modulation": pytest.approx(1e-3)}
    tables = {k: v for k, v in resumed["state_dict"].items() if k.startswith("modulation.")}
    assert len(tables) == 12 and max(float(v.abs().max()) for v in tables.values()) > 1e-4  # they train
    r = _run(["python/widen_model.py", str(mod / "last.pt"), str(folders[2] / "mod2.pt"), "--modulation"], package_env)
    assert r.returncode != 0 and "already has the quality modulation" in r.stderr

    # A new run can have it from the start; a checkpoint without it is not silently rebuilt.
    r = _run(_train_args(folders, folders[2] / "mod-new", "--steps", "1", "--modulation"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = torch.load(folders[2] / "mod-new" / "last.pt", map_location="cpu", weights_only=False)
    assert fresh["config"]["modulation"] is True and len(fresh["optimizer"]["param_groups"]) == 2
    r = _run(_train_args(folders, out, "--steps", "3", "--modulation"), package_env)
    assert r.returncode != 0 and "has no quality modulation" in r.stderr

    weights = folders[2] / "mod-w.pt"
    r = _run(["python/export_weights.py", str(mod / "last.pt"), str(weights)], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    model = codec.load_weights(weights)
    assert model.config["modulation"] is True
    assert model.metadata["lineage"][-2]["widened"]["modulation"] is True  # then the resumed run
    img = np.asarray(Image.open(ASTRONAUT).convert("RGB"))[:70, :90]
    data = codec.encode(img, quality=4.5, weights=str(weights))
    assert codec.decode(data, weights=str(weights), output="numpy").shape == img.shape


def test_qat_rounds_and_trains_only_the_coding_nets(folders, package_env):
    out = folders[2] / "qat"
    qat = ("--qat", "--qat-images", "2", "--only-coding-nets", "--lr", "1e-3")
    r = _run(_train_args(folders, out, "--steps", "2", *qat), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    stats_file = out / "qat_stats.pt"
    stats = torch.load(stats_file, weights_only=True)
    assert stats["h_s.0"] > 0 and stats["y_hat_h"] > 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["state_dict"]
    torch.manual_seed(0)  # the script's seed: the weights it started from
    start = build("compact").state_dict()
    assert set(state) == set(start)  # the rounding leaves no state behind
    moved = {k.split(".")[0] for k in state if not torch.equal(state[k], start[k])}
    assert moved and moved <= set(CODING_NETS) | {"entropy_bottleneck"}, moved
    assert {"coder_h", "coder_l", "h_s"} <= moved
    assert not any(
        k.startswith("entropy_bottleneck") and not k.endswith("quantiles")
        for k in state
        if not torch.equal(state[k], start[k])
    )
    # Resuming rounds to the same grids: the calibration is kept, not redone.
    stamp = stats_file.stat().st_mtime_ns
    r = _run(_train_args(folders, out, "--steps", "3", *qat), package_env)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-3000:]
    assert stats_file.stat().st_mtime_ns == stamp

    # Export, convert on the grids the run rounded to, and code version 5 with the result.
    weights, exact = folders[2] / "qat.pt", folders[2] / "qat-exact.pt"
    r = _run(["python/export_weights.py", str(out / "last.pt"), str(weights)], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    args = [str(folders[0]), "--weights", str(weights), "--out", str(exact), "--stats", str(stats_file)]
    r = _run(["python/convert_exact.py", *args], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    model = codec.load_weights(exact)
    assert model.metadata["exact"]["stats_file"] == "qat_stats.pt"
    img = np.asarray(Image.open(ASTRONAUT).convert("RGB"))[:70, :90]
    data = codec.encode(img, quality=2, weights=str(exact))
    assert data[4] == 5 and codec.decode(data, weights=str(exact), output="numpy").shape == img.shape


def test_sigterm_stops_cleanly_and_saves(folders, package_env):
    """A signal (preemption, torchrun passing one on) ends the run like the deadline does: the step
    finishes, the model is validated and last.pt saved, exit code 0; resuming continues from there."""
    out = folders[2] / "sigterm"
    proc = subprocess.Popen(
        [sys.executable, *_train_args(folders, out, "--minutes", "10")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=package_env,
        cwd=ROOT,
    )
    try:
        seen = []
        for line in proc.stdout:  # wait until it is training (a validation has run)
            seen.append(line)
            if "val loss" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(seen) + rest
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: stopping at step" in text and "saved" in text
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] >= 2
    r = _run(_train_args(folders, out, "--steps", str(ckpt["step"] + 1)), package_env)
    assert r.returncode == 0 and f"at step {ckpt['step']}" in r.stdout, r.stderr[-3000:]


def _torchrun(args, env, nproc=2):
    env = dict(env, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def test_torchrun_processes_train_one_model(folders, package_env):
    """torchrun on the CPU (gloo): two processes, each on its own crops, train one model. The parameters
    are compared across ranks at every save (--save-every 1) and at the end; a divergence raises.
    (Before the fix, DDP all-reduced nothing: the quantiles' empty gradient kept its bucket unready.)"""
    out = folders[2] / "ddp"
    r = _torchrun(_train_args(folders, out, "--steps", "3"), package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes: parameters identical on every rank" in r.stdout
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3


DIVERGE_WORKER = """
import importlib.util, sys, torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("train", "python/train.py")
train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)
dist.init_process_group("gloo")
torch.manual_seed(0)
model = train.build("compact")  # the same weights on both ranks
train.check_ranks_agree(model)
if dist.get_rank() == 1:
    with torch.no_grad():
        train.unwrap(model).entropy_bottleneck.quantiles[0, 0, 1] += 1e-3
try:
    train.check_ranks_agree(model)
except RuntimeError as exc:
    print(f"rank {dist.get_rank()}: {exc}", flush=True)
dist.barrier()  # tear down together: a gloo peer closing while the other still talks aborts it
dist.destroy_process_group()
"""


def test_diverged_ranks_are_detected(tmp_path, package_env):
    worker = tmp_path / "worker.py"
    worker.write_text(DIVERGE_WORKER)
    r = _torchrun([str(worker)], package_env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: DDP processes hold different parameters (1 of" in r.stdout
    assert "entropy_bottleneck.quantiles" in r.stdout
