"""Train a DualRes model (CompressAI-style), on CPU or GPU; a stopped run resumes from its checkpoint.

Loss per batch (dualres_ext.models.loss.rate_distortion): bpp + lambda_q * 255^2 * MSE, with one
random quality q per batch so that one set of weights learns every rate (gain units;
--quality-weights draws some rates more often). The factorized prior's quantiles are trained by
their own optimizer on the auxiliary loss, as in CompressAI. The checkpoint format, parameter
groups, weight average and validation are dualres_ext.training's.

  # a small CPU (2 cores): stops by itself after --minutes and leaves a resumable checkpoint
  python python/train.py --train data/pool/train --val data/pool/val --out runs/compact --minutes 60
  # resume (same command; --out holds last.pt)
  python python/train.py --train data/pool/train --val data/pool/val --out runs/compact --minutes 60
  # several GPUs
  torchrun --nproc_per_node=4 python/train.py --train ... --val ... --out runs/paper --model paper --device cuda

Checkpoints: OUT/last.pt (every --save-every steps and at exit) and OUT/best.pt (lowest validation
loss averaged over qualities). python/export_weights.py turns one into the package's weights file.
With --ema DECAY an exponential moving average of the weights is kept beside them (Polyak
averaging: it smooths the noise of small-batch steps, much as a lower lr does); each validation
scores both, and best.pt takes whichever is lower.

--qat trains for the integer entropy-parameter networks of bitstream versions 4 and 5
(dualres_ext.models.fake_quant): those networks round in the forward pass as their conversion
(python/convert_exact.py, to be run on the result) will, on the grids the conversion gives the
starting weights (calibrated once per run folder on training crops, OUT/qat_stats.pt), with
straight-through gradients. Validation then scores the rounded networks.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dualres_ext.models import build, fake_quant, get_scale_table
from dualres_ext.models.dualres import CODING_NETS
from dualres_ext.models.exact import DEFAULTS as EXACT_DEFAULTS
from dualres_ext.models.exact import calibrate
from dualres_ext.models.loss import rate_distortion
from dualres_ext.tools.evaluation import IMAGE_EXTENSIONS  # train on whatever `eval` reads (.tif included)
from dualres_ext.training import (
    WeightAverage,
    checkpoint_config,
    is_auxiliary,
    load_checkpoint,
    optimizer_groups,
    parameter_groups,
    psnr_of_mse,
    save_checkpoint,
    validate,
)


# ----------------------------------------------------------------------------------------------
# data
def list_images(folder: str) -> list[str]:
    files = sorted(
        p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if p.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise SystemExit(f"no images found in {folder!r}")
    return files


class CropSampler:
    """Random crops of in-memory photos: random rescale (0.5-1x, antialiased), crop, flips.

    The pool is small (a few hundred photos), so it is decoded once and kept as uint8 tensors;
    every batch is then cheap to make in the training process itself, which on a 2-core machine
    beats spending a core on DataLoader workers.
    """

    def __init__(self, files: list[str], crop: int, seed: int):
        self.crop = crop
        self.rng = random.Random(seed)
        self.images = []
        for f in files:
            img = Image.open(f).convert("RGB")
            if min(img.size) < crop:  # upscale tiny pictures just enough to crop from
                s = crop / min(img.size)
                img = img.resize((math.ceil(img.size[0] * s), math.ceil(img.size[1] * s)), Image.BICUBIC)
            self.images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))

    def sample(self) -> torch.Tensor:
        img = self.images[self.rng.randrange(len(self.images))]
        _, h, w = img.shape
        # Rescaling shows the model textures at other scales (photos here are ~1-2 MP, Kodak is 0.4 MP).
        lo = max(self.crop / min(h, w), 0.5)
        s = self.rng.uniform(min(lo, 1.0), 1.0)
        ch, cw = min(h, math.ceil(self.crop / s)), min(w, math.ceil(self.crop / s))
        y, x = self.rng.randrange(h - ch + 1), self.rng.randrange(w - cw + 1)
        patch = img[:, y : y + ch, x : x + cw].float().div_(255)
        if (ch, cw) != (self.crop, self.crop):
            patch = F.interpolate(
                patch[None], size=(self.crop, self.crop), mode="bilinear", antialias=True, align_corners=False
            )[0].clamp_(0, 1)
        if self.rng.random() < 0.5:
            patch = patch.flip(-1)
        if self.rng.random() < 0.5:
            patch = patch.flip(-2)
        return patch

    def batch(self, n: int) -> torch.Tensor:
        return torch.stack([self.sample() for _ in range(n)])


def load_val(files: list[str], size: int) -> list[torch.Tensor]:
    """Fixed centre crops (multiples of 64) of the validation photos, for a stable validation loss."""
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        s = min(1.0, size / min(w, h))
        if s < 1:
            img = img.resize((round(w * s), round(h * s)), Image.LANCZOS)
        w, h = img.size
        cw, ch = min(w, size) // 64 * 64, min(h, size) // 64 * 64
        if cw == 0 or ch == 0:
            continue
        left, top = (w - cw) // 2, (h - ch) // 2
        out.append(torch.from_numpy(np.asarray(img.crop((left, top, left + cw, top + ch))).copy()).permute(2, 0, 1))
    return out


def install_fake_quant(model, args, device) -> None:
    """--qat: the conversion's grids for ``model``'s current weights, calibrated on evenly spread
    centre crops of the training photos (the same on every process, and kept in OUT so that a
    resumed run rounds to the same grids), installed on its entropy-parameter networks."""
    stats_path = os.path.join(args.out, "qat_stats.pt")
    if os.path.isfile(stats_path):
        stats = torch.load(stats_path, weights_only=True)
    else:
        files = list_images(args.train)
        count = min(args.qat_images, len(files))
        picks = [files[int(i * len(files) / count)] for i in range(count)]
        crops = [img[None].float().div(255).to(device) for img in load_val(picks, args.crop)]
        model.eval()
        stats = calibrate(model, crops, list(range(model.num_qualities)))
        model.train()
        if "LOCAL_RANK" not in os.environ or int(os.environ["LOCAL_RANK"]) == 0:
            torch.save(stats, stats_path)
    grids = fake_quant.grids_of(model, stats, get_scale_table())
    fake_quant.install(model, grids, EXACT_DEFAULTS["weight_bits"])


# ----------------------------------------------------------------------------------------------
# several processes (torchrun)
def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def wrap_ddp(model, device):
    """DistributedDataParallel over the main parameters only.

    The quantiles get no gradient from the main loss (only from the auxiliary loss, after the
    forward). Left to DDP, such a parameter keeps its gradient bucket from ever being ready, and
    DDP then all-reduces nothing at all: every rank silently trains its own model. They are
    synchronised by hand instead (``average_gradients``).
    """
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [n for n, _ in model.named_parameters() if is_auxiliary(n)]
    )
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def average_gradients(params) -> None:
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def check_ranks_agree(model) -> None:
    """Raise if any parameter differs between processes, compared by its sum in float64 (all-reduced
    gradients and identical optimisers keep them bit-identical; anything else is a bug that would only
    show as a worse model). A collective: every rank must call it at the same step."""
    named = list(unwrap(model).named_parameters())
    sums = torch.stack([p.detach().double().sum() for _, p in named])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    differ = [n for (n, _), a, b in zip(named, lo.tolist(), hi.tolist()) if a != b]
    if differ:
        raise RuntimeError(
            f"DDP processes hold different parameters ({len(differ)} of {len(named)}: "
            f"{', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''})"
        )


class Progress:
    """Training progress: a tqdm bar (steps, rate, time left, the running loss) on a terminal, and one
    plain line per report in a log file, where a redrawn bar would be unreadable."""

    def __init__(self, start_step: int, total: int | None, deadline: float | None, is_tty: bool):
        self.total, self.deadline, self.tty = total, deadline, is_tty
        self.t0, self.start = time.time(), start_step
        self.bar = tqdm(
            total=total, initial=start_step, unit="step", dynamic_ncols=True, disable=not is_tty, file=sys.stdout
        )

    def show(self, step: int, msg: str, force_newline: bool = False) -> None:
        left = ""
        if self.deadline is not None:
            left = f" {max(0, self.deadline - time.time()) / 60:.1f} min left"
        if self.tty:
            self.bar.update(step - self.bar.n)
            if force_newline:
                self.bar.write(f"step {step} | {msg}")
            else:
                self.bar.set_postfix_str(f"{msg}{left}", refresh=True)
            return
        rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
        if not left and self.total:
            left = f" eta {(self.total - step) / max(rate, 1e-9) / 60:.1f} min"
        print(f"step {step}{f'/{self.total}' if self.total else ''} {rate:.2f} it/s{left} | {msg}", flush=True)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="folder of training images")
    ap.add_argument("--val", required=True, help="folder of validation images")
    ap.add_argument("--out", required=True, help="run folder: last.pt, best.pt, log.jsonl")
    ap.add_argument("--model", default="compact", help="configuration name for dualres_ext.models.build")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="per process")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--aux-lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    ap.add_argument("--steps", type=int, default=None, help="stop at this total step count")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this many minutes in this run")
    ap.add_argument("--lr-drop-at", type=int, default=None, help="divide the lr by 10 from this step on")
    ap.add_argument(
        "--lr-drop-minutes",
        type=float,
        default=None,
        help="divide the lr by 10 for the last this-many minutes of --minutes (a time-boxed run's "
        "step count is not known in advance)",
    )
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="ramp the lr up linearly over the first this-many steps when the optimiser starts fresh "
        "(a new run or --init; about 500 for --init: Adam's first steps move every parameter by "
        "about the lr and jolt a trained model); a resumed run keeps its moments and does not warm up",
    )
    ap.add_argument(
        "--quality-weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="how often each quality is drawn, one weight per quality (default: all equally; 0 leaves "
        "a quality out, e.g. '0 0 0 0 1 1' fine-tunes the top two rates); validation covers all",
    )
    ap.add_argument(
        "--modulation",
        action="store_true",
        help="a new model with the per-quality channel modulation (a checkpoint or --init file "
        "brings its own configuration; python/widen_model.py adds it to a trained one)",
    )
    ap.add_argument(
        "--modulation-lr-scale",
        type=float,
        default=10.0,
        help="lr multiplier of the quality modulation (models that have it): small tables that "
        "start at the identity, added to trained models",
    )
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--val-every", type=int, default=1000)
    ap.add_argument(
        "--val-size",
        type=int,
        default=512,
        help="validation centre-crop size (large: small crops misjudge full-size images)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an exponential moving average of the weights (e.g. 0.998: about 500 steps); "
        "validation scores it too and best.pt takes the lower loss",
    )
    ap.add_argument(
        "--qat",
        action="store_true",
        help="quantisation-aware training of the exact entropy-parameter networks (see above)",
    )
    ap.add_argument(
        "--only-coding-nets",
        action="store_true",
        help="optimise only the entropy-parameter networks (hyper synthesis, slice coders, LRP, "
        "down(y_H)); the transforms and the factorized prior's density stay as they are (with --qat: the "
        "networks that are converted; give it again when resuming such a run)",
    )
    ap.add_argument(
        "--qat-images", type=int, default=8, help="training crops that calibrate the --qat grids (once per --out)"
    )
    ap.add_argument(
        "--init",
        default=None,
        help="start a new run from a weights file (e.g. the package's dualres_compact.pt, which "
        "records its step count) when --out has no last.pt yet",
    )
    args = ap.parse_args(argv)
    if args.lr_drop_minutes is not None and not args.minutes:
        ap.error("--lr-drop-minutes needs --minutes")
    if args.warmup_steps < 0:
        ap.error("--warmup-steps must be >= 0")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        ap.error("--ema must lie strictly between 0 and 1")
    if args.quality_weights is not None and (
        min(args.quality_weights) < 0
        or sum(args.quality_weights) <= 0
        or not all(math.isfinite(w) for w in args.quality_weights)
    ):
        ap.error("--quality-weights must be finite, >= 0 and not all 0")

    distributed = "LOCAL_RANK" in os.environ
    rank = 0
    if distributed:  # torchrun
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")

    # The configuration comes with the weights: a checkpoint or an --init file records its own
    # (e.g. a model widened by python/widen_model.py), a new run takes --model's.
    fresh_optimizer = not os.path.exists(last_path)  # no checkpoint to resume: Adam starts from zero moments
    ckpt = init = None
    config = {}
    if not fresh_optimizer:
        ckpt = load_checkpoint(last_path, map_location=device)
        if ckpt["model_name"] != args.model:
            raise SystemExit(f"{last_path} holds a {ckpt['model_name']!r} model, not {args.model!r}")
        config = checkpoint_config(ckpt)
    elif args.init:
        from dualres_ext.models.zoo import load_weights

        init = load_weights(args.init)
        if init.name != args.model:
            raise SystemExit(f"{args.init} holds a {init.name!r} model, not {args.model!r}")
        config = dict(init.config)
    if args.modulation:
        if config and not config.get("modulation"):
            raise SystemExit(
                f"--modulation: {last_path if ckpt is not None else args.init} has no quality "
                "modulation; add it with python/widen_model.py IN OUT --modulation"
            )
        config["modulation"] = True
    torch.manual_seed(args.seed + rank)
    model = build(args.model, **config).to(device)
    if args.only_coding_nets:
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in CODING_NETS or is_auxiliary(name))
    main_params, aux_params = parameter_groups(model)
    optimizer = torch.optim.Adam(optimizer_groups(model), lr=args.lr)
    aux_optimizer = torch.optim.Adam(aux_params, lr=args.aux_lr)
    step, best_val, history = 0, float("inf"), []
    ema_state = None
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        step, best_val, history = ckpt["step"], ckpt["best_val"], ckpt.get("history", [])
        ema_state = ckpt.get("ema_state_dict")
        if rank == 0:
            print(f"resumed {last_path} at step {step} (best val loss {best_val:.4f})", flush=True)
        # Losses on other validation crops are not comparable: best.pt restarts with this run's.
        old_val_size = ckpt.get("args", {}).get("val_size", 256)
        if old_val_size != args.val_size:
            best_val = float("inf")
            if rank == 0:
                print(
                    f"validation crops changed ({old_val_size} -> {args.val_size} px): the next validation "
                    "starts a new best.pt",
                    flush=True,
                )
        del ckpt
    elif init is not None:
        # Exported weights are float16 and leave the Gaussian tables out: load what the model trains.
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in init.state_dict().items() if k in own}, strict=False)
        step = int(init.metadata.get("steps", 0))
        history = list(init.metadata.get("lineage") or [])  # the runs that made the weights, carried on
        if rank == 0:
            print(f"initialised from {args.init} (step {step}); optimiser state starts fresh", flush=True)
        del init
    if args.qat:
        install_fake_quant(model, args, device)
    # The average lives on the process that validates and saves (the weights are the same on all);
    # a copy of the model, it rounds as the model does.
    ema = None
    if args.ema is not None and rank == 0:
        ema = WeightAverage(unwrap(model), args.ema, ema_state)
        print(
            f"weight average (decay {args.ema:g}) "
            + ("resumed" if ema_state is not None else "starts from the current weights"),
            flush=True,
        )
    del ema_state
    if distributed:
        model = wrap_ddp(model, device)

    sampler = CropSampler(list_images(args.train), args.crop, seed=args.seed * 1000 + rank + step)
    val_images = load_val(list_images(args.val), args.val_size) if rank == 0 else []
    qrng = random.Random(args.seed * 7919 + step)
    deadline = time.time() + args.minutes * 60 if args.minutes else None
    drop_time = deadline - args.lr_drop_minutes * 60 if args.lr_drop_minutes is not None else None
    lr_dropped = False
    run_start = step

    def set_lr() -> None:
        """The lr for this step: /10 after the drop (by step or by time), times the warm-up ramp."""
        lr = args.lr / 10 if lr_dropped or (args.lr_drop_at is not None and step >= args.lr_drop_at) else args.lr
        if fresh_optimizer and step - run_start < args.warmup_steps:
            lr *= (step - run_start + 1) / args.warmup_steps
        for g in optimizer.param_groups:
            g["lr"] = lr * (args.modulation_lr_scale if g.get("name") == "modulation" else 1.0)

    progress = Progress(step, args.steps, deadline, sys.stdout.isatty())
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    # Each run's command goes into the history where it starts: export_weights.py keeps these
    # entries (and the widenings) as the weights' lineage.
    history.append({"step": step, "command": command})
    lambdas = unwrap(model).lambdas
    if args.quality_weights is not None and len(args.quality_weights) != len(lambdas):
        raise SystemExit(
            f"--quality-weights: {len(args.quality_weights)} weights for a model with {len(lambdas)} qualities"
        )
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{args.model}: {n_params / 1e6:.2f} M parameters, {len(sampler.images)} training photos, "
            f"{len(val_images)} validation crops, qualities {len(lambdas)}, device {device}",
            flush=True,
        )

    def weights_of(kind):
        """The model a checkpoint's "weights" label names: "trained" or "average" (the EMA)."""
        return ema.averaged() if kind == "average" else unwrap(model)

    def checkpoint(path, kind="trained"):
        """Save a resumable checkpoint; kind="average" stores the weight average as its weights
        (best.pt when the average validated lower), the optimiser state being the trained weights'."""
        save_checkpoint(
            path,
            {
                "model_name": args.model,
                "config": dict(unwrap(model).config),
                "state_dict": weights_of(kind).state_dict(),
                "weights": kind,
                "ema_state_dict": ema.model.state_dict() if ema is not None else None,
                "ema_decay": args.ema,
                "optimizer": optimizer.state_dict(),
                "aux_optimizer": aux_optimizer.state_dict(),
                "step": step,
                "best_val": best_val,
                "history": history,
                "command": command,
                "args": vars(args),
                "train_images": len(sampler.images),
            },
        )

    def validate_and_keep_best(final: bool) -> None:
        """Validate the trained weights (and the average), log them, and save best.pt on a new low."""
        nonlocal best_val
        candidates = [("val", "trained")] + ([("val_ema", "average")] if ema is not None else [])
        for key, kind in candidates:
            val = validate(weights_of(kind), val_images, device)
            history.append({"step": step, key: val})
            if final:
                print(
                    json.dumps(
                        {"step": step, "weights": kind, "val_loss": val["loss"], "per_quality": val["per_quality"]}
                    ),
                    flush=True,
                )
            else:
                summary = " ".join(
                    f"q{i}:{p['bpp']:.3f}bpp/{p['psnr']:.2f}dB" for i, p in enumerate(val["per_quality"])
                )
                label = "ema val loss" if kind == "average" else "val loss"
                progress.show(step, f"{label} {val['loss']:.4f} | {summary}", force_newline=True)
            if val["loss"] < best_val:
                best_val = val["loss"]
                checkpoint(best_path, kind)

    # SIGTERM / Ctrl-C (a cluster's preemption, a time-boxed job, torchrun passing on a signal):
    # finish the step, validate and save last.pt as at the deadline. A second signal aborts.
    stop_requested = []
    previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request_stop(signum, frame):
        # Only record it (printing here could re-enter a print the main loop is in).
        stop_requested.append(signum)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if threading.current_thread() is threading.main_thread():  # signal handlers live there only
        for sig in previous_handlers:
            signal.signal(sig, request_stop)

    def clock():
        """(stop now, past the lr-drop time), agreed by all processes: under DDP every rank must
        stop (and drop its lr) at the same step, or the others hang in the next all-reduce. Stop
        at the deadline or on a signal."""
        now = time.time()
        flags = torch.tensor(
            [
                bool(stop_requested) or (deadline is not None and now >= deadline),
                drop_time is not None and now >= drop_time,
            ],
            dtype=torch.int32,
            device=device,
        )
        if distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    model.train()
    running = {"loss": 0.0, "bpp": 0.0, "psnr": 0.0, "aux": 0.0, "n": 0}
    while True:
        stop_now, past_drop = clock()
        if (args.steps is not None and step >= args.steps) or stop_now:
            if stop_requested and rank == 0:
                print(
                    f"\n{signal.Signals(stop_requested[0]).name}: stopping at step {step}, saving {last_path}",
                    flush=True,
                )
            break
        if past_drop and not lr_dropped:
            lr_dropped = True
            if rank == 0:
                print(f"\nstep {step}: lr divided by 10 for the last {args.lr_drop_minutes:g} minutes", flush=True)
        set_lr()
        x = sampler.batch(args.batch).to(device, non_blocking=True)
        if args.quality_weights is None:
            q = qrng.randrange(len(lambdas))
        else:
            q = qrng.choices(range(len(lambdas)), weights=args.quality_weights)[0]
        out = model(x, q)
        rd = rate_distortion(out, x, lambdas[q])
        optimizer.zero_grad(set_to_none=True)
        rd["loss"].backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(main_params, args.clip)
        optimizer.step()
        aux_loss = unwrap(model).aux_loss()
        aux_optimizer.zero_grad(set_to_none=True)
        aux_loss.backward()
        if distributed:
            average_gradients(aux_params)
        aux_optimizer.step()
        if ema is not None:
            ema.update()
        step += 1

        running["loss"] += rd["loss"].item()
        running["bpp"] += rd["bpp"].item()
        running["psnr"] += psnr_of_mse(rd["mse"].item())
        running["aux"] += aux_loss.item()
        running["n"] += 1
        if rank == 0 and (step % 10 == 0):
            n = running["n"]
            progress.show(
                step,
                f"loss {running['loss'] / n:.4f} bpp {running['bpp'] / n:.3f} "
                f"psnr {running['psnr'] / n:.2f} aux {running['aux'] / n:.1f}",
            )
            history.append(
                {"step": step, "time": time.time(), **{k: running[k] / n for k in ("loss", "bpp", "psnr", "aux")}}
            )
            running = {k: 0.0 for k in running} | {"n": 0}
        if rank == 0 and step % args.val_every == 0 and val_images:
            validate_and_keep_best(final=False)
        if step % args.save_every == 0:
            if distributed:
                check_ranks_agree(model)
            if rank == 0:
                checkpoint(last_path)

    if distributed:
        check_ranks_agree(model)
    progress.close()
    if rank == 0:
        print(flush=True)
        if distributed:
            print(f"{dist.get_world_size()} processes: parameters identical on every rank", flush=True)
        if val_images:
            validate_and_keep_best(final=True)
        checkpoint(last_path)
        print(f"saved {last_path} at step {step}", flush=True)
    if not stop_requested and threading.current_thread() is threading.main_thread():
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if distributed:
        # Tear down together, the DDP wrapper first: with gloo, a DDP object still alive when its
        # process group goes (or a peer leaving mid-teardown) sometimes aborted the process at exit.
        model = unwrap(model)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
