"""Rate-distortion evaluation over a folder: DualRes against classical codecs.

For every image and every quality: the real bitstream size (bpp), RGB PSNR, MS-SSIM and encode/
decode milliseconds; the same for each classical codec over its quality sweep; dataset-average
curves, Bjøntegaard delta-rates of ours against each codec (on PSNR and on MS-SSIM in dB), an R-D plot and CSV/JSON files.
Used by ``python -m dualres_ext eval DIR`` (and ``python/eval_rd.py``, the same command).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..codec import decode, encode, resolve_model
from ..models.refine import check_refinement
from .classic import available_codecs
from .metrics import bd_rate, ms_ssim, psnr

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def _images(folder: str) -> List[str]:
    files = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images in {folder!r}")
    return files


def _ms_ssim_or_nan(a, b) -> float:
    try:
        return ms_ssim(a, b)
    except ValueError:  # image too small for five scales
        return float("nan")


def _average(rows: List[dict], key_fields: Sequence[str]) -> List[dict]:
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    out = []
    for key, rs in groups.items():
        avg = dict(zip(key_fields, key))
        for m in ("bpp", "psnr", "ms_ssim", "enc_ms", "dec_ms"):
            vals = [r[m] for r in rs if r.get(m) is not None and not np.isnan(r[m])]
            avg[m] = float(np.mean(vals)) if vals else float("nan")
        avg["images"] = len(rs)
        out.append(avg)
    return sorted(out, key=lambda r: (r["codec"], r["bpp"]))


_CSV_FIELDS = ["image", "codec", "quality", "bytes", "bpp", "psnr", "ms_ssim", "enc_ms", "dec_ms"]
_CSV_TYPES = {
    "quality": float,
    "bytes": int,
    "bpp": float,
    "psnr": float,
    "ms_ssim": float,
    "enc_ms": float,
    "dec_ms": float,
}


def _load_anchor_rows(path: str) -> Dict[tuple, dict]:
    """Classical-codec rows of an earlier run's per_image.csv, keyed by (image, codec, quality)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["codec"] == "dualres":
                continue
            row = {k: (_CSV_TYPES[k](v) if k in _CSV_TYPES else v) for k, v in row.items()}
            q = row["quality"]
            row["quality"] = int(q) if float(q).is_integer() else q
            out[(row["image"], row["codec"], row["quality"])] = row
    return out


def _measure(rgb: np.ndarray, name: str, codec: str, quality, encode, decode) -> dict:
    """One row of per_image.csv: ``encode(rgb) -> bytes``, ``decode(bytes) -> rgb``, timed."""
    t0 = time.perf_counter()
    data = encode(rgb)
    t1 = time.perf_counter()
    rec = decode(data)
    t2 = time.perf_counter()
    return {
        "image": name,
        "codec": codec,
        "quality": quality,
        "bytes": len(data),
        "bpp": 8 * len(data) / (rgb.shape[0] * rgb.shape[1]),
        "psnr": psnr(rgb, rec),
        "ms_ssim": _ms_ssim_or_nan(rgb, rec),
        "enc_ms": 1e3 * (t1 - t0),
        "dec_ms": 1e3 * (t2 - t1),
    }


def _evaluate_image(
    path: str, qualities, chosen, codecs, weights, device, refine: Tuple[int, int], reuse: Dict[tuple, dict]
):
    """(rows, how many were reused) of one image: DualRes at each quality (``refine``: its
    ``refine_steps`` and ``refine_rounds``), then each chosen classical codec over its sweep (rows
    found in ``reuse`` are taken instead of coded)."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    name = os.path.basename(path)
    rows = [
        _measure(
            rgb,
            name,
            "dualres",
            q,
            lambda a, q=q: encode(
                a, quality=q, device=device, weights=weights, refine_steps=refine[0], refine_rounds=refine[1]
            ),
            lambda d: decode(d, device=device, output="numpy", weights=weights),
        )
        for q in qualities
    ]
    reused = 0
    for key in chosen:
        codec = codecs[key]
        for q in codec.qualities:
            if (name, key, q) in reuse:
                rows.append(reuse[(name, key, q)])
                reused += 1
            else:
                rows.append(_measure(rgb, name, key, q, lambda a, q=q: codec.encode(a, q), codec.decode))
    return rows, reused


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _evaluate_image_in_worker(path, qualities, chosen, weights, device, refine, reuse):
    # The codec table holds closures, which do not pickle: each process builds its own.
    return _evaluate_image(path, qualities, chosen, available_codecs(), weights, device, refine, reuse)


def _evaluate_in_processes(
    files, workers: int, qualities, chosen, weights, device, refine, reuse_for, finished
) -> None:
    """:func:`_evaluate_image` for every file in ``workers`` processes; ``finished(name, rows,
    reused)`` as each image completes (in the order they complete)."""
    threads = max(1, torch.get_num_threads() // workers)
    # "spawn": a forked child would inherit torch's thread pools and the parent's locks.
    with ProcessPoolExecutor(
        max_workers=min(workers, len(files)) or 1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads,),
    ) as pool:
        jobs = {
            pool.submit(
                _evaluate_image_in_worker, path, qualities, chosen, weights, device, refine, reuse_for(path)
            ): path
            for path in files
        }
        try:
            for job in as_completed(jobs):
                finished(os.path.basename(jobs[job]), *job.result())
        except BaseException:  # a failed image (or Ctrl-C) ends the run now, not after the queue
            for job in jobs:
                job.cancel()
            raise


def evaluate(
    folder: str,
    out_dir: str,
    weights=None,
    qualities: Optional[Sequence[float]] = None,
    codecs: Optional[Sequence[str]] = None,
    device=None,
    log=print,
    anchors: Optional[str] = None,
    refine_steps: int = 0,
    workers: int = 1,
    refine_rounds: Optional[int] = None,
) -> dict:
    """Run the evaluation; write ``out_dir``/{per_image.csv, summary.json, rd.png}; return the summary.

    ``anchors``: a per_image.csv from an earlier run over the same folder; its classical-codec
    rows are reused (the anchors do not change when the weights do), anything missing is run.
    ``refine_steps``, ``refine_rounds``: DualRes encodes with latent refinement (``encode(...,
    refine_steps=N, refine_rounds=R)``).
    ``workers``: images are measured in this many processes at once, each with an equal share of
    torch's threads (for the slow refined runs on a machine with cores to spare). The bytes and
    qualities are the same as with one process (refined streams: up to float32 rounding, see
    :mod:`dualres_ext.models.refine`); the timings are of a shared machine.
    ``weights`` must then be None or a path: each process loads its own model.
    """
    refine = check_refinement(refine_steps, refine_rounds)

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers > 1 and weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            "workers > 1: weights must be None or a path (each worker process loads its own model), "
            f"got {type(weights).__name__}"
        )
    os.makedirs(out_dir, exist_ok=True)
    files = _images(folder)
    model, _ = resolve_model(weights, device)
    if qualities is None:
        qualities = list(range(model.num_qualities))
    all_codecs = available_codecs()
    chosen = list(all_codecs) if codecs is None else list(codecs)
    unknown = [c for c in chosen if c not in all_codecs]
    if unknown:
        raise ValueError(f"codecs not available here: {unknown} (available: {sorted(all_codecs)})")

    reuse = _load_anchor_rows(anchors) if anchors else {}
    # Rows go to per_image.csv as each image finishes: an interrupted run keeps what it measured
    # (and can serve as --anchors for the next one).
    csv_path = os.path.join(out_dir, "per_image.csv")
    with open(csv_path, "w", newline="") as f:
        csv.DictWriter(f, fieldnames=_CSV_FIELDS).writeheader()
    per_image: Dict[str, List[dict]] = {}
    reused = 0
    # A progress bar on a terminal; a log file gets the per-image lines alone.
    bar = tqdm(total=len(files), unit="image", desc="eval", disable=not sys.stderr.isatty(), file=sys.stderr)
    image_log = bar.write if (log is print and not bar.disable) else log

    def finished(name: str, image_rows: List[dict], image_reused: int) -> None:
        nonlocal reused
        bar.update(1)
        per_image[name] = image_rows
        reused += image_reused
        with open(csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=_CSV_FIELDS).writerows(image_rows)
        ours = [r for r in image_rows if r["codec"] == "dualres"]
        image_log(
            f"[{len(per_image)}/{len(files)}] {name}: "
            + " ".join(f"q{r['quality']}:{r['bpp']:.3f}bpp/{r['psnr']:.2f}dB" for r in ours)
        )

    reuse_by_image: Dict[str, Dict[tuple, dict]] = {}
    for key, row in reuse.items():
        reuse_by_image.setdefault(key[0], {})[key] = row

    def reuse_for(path: str) -> Dict[tuple, dict]:
        return reuse_by_image.get(os.path.basename(path), {})

    if workers == 1:
        for path in files:
            finished(
                os.path.basename(path),
                *_evaluate_image(path, qualities, chosen, all_codecs, weights, device, refine, reuse_for(path)),
            )
    else:
        _evaluate_in_processes(files, workers, qualities, chosen, weights, device, refine, reuse_for, finished)
    bar.close()
    rows = [r for path in files for r in per_image[os.path.basename(path)]]

    if anchors:
        log(f"reused {reused} classical-codec measurements from {anchors}")

    curves = _average(rows, ("codec", "quality"))
    bd = bd_rates(curves, chosen, "psnr", log)
    bd_ms_ssim = bd_rates(curves, chosen, "ms_ssim_db", log)
    differences = psnr_differences(curves, chosen)
    summary = {
        "folder": os.path.basename(os.path.abspath(folder)),  # the set's name; where it lies is local
        "images": len(files),
        "qualities": list(qualities),
        "refine_steps": refine[0],
        "refine_rounds": refine[1],
        "curves": curves,
        "bd_rate_psnr_percent": bd,
        "bd_rate_ms_ssim_percent": bd_ms_ssim,
        "psnr_difference_db_at_our_rates": differences,
        "codec_names": {k: all_codecs[k].name for k in chosen},
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    title = os.path.basename(os.path.abspath(folder)) + (
        f", DualRes refine_steps={refine[0]}, refine_rounds={refine[1]}" if any(refine) else ""
    )
    _plot(curves, summary["codec_names"], os.path.join(out_dir, "rd.png"), title=title)
    for key in chosen:
        log(
            f"BD-rate of DualRes vs {all_codecs[key].name}: PSNR {_percent(bd[key])}, "
            f"MS-SSIM {_percent(bd_ms_ssim[key])}; PSNR difference at our rates (dB): "
            + " ".join("n/a" if d is None else f"{d:+.2f}" for d in differences[key])
        )
    return summary


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def ms_ssim_db(value: float) -> float:
    """MS-SSIM on a decibel scale, -10 log10(1 - MS-SSIM), as R-D plots and BD-rates use it."""
    return -10 * math.log10(max(1 - value, 1e-10))


def bd_rates(curves: List[dict], codecs: Sequence[str], metric: str, log) -> Dict[str, Optional[float]]:
    """BD-rate (percent) of DualRes against each codec, on ``metric``: "psnr" or "ms_ssim_db"."""

    def quality(c):
        return c["psnr"] if metric == "psnr" else ms_ssim_db(c["ms_ssim"])

    ours = sorted((c for c in curves if c["codec"] == "dualres"), key=quality)
    margin = 1.5  # dB on either scale
    out = {}
    for key in codecs:
        # Fit the anchor only where it is comparable with ours (a cubic over JPEG's whole 5-95 sweep
        # would be dominated by rates far outside ours).
        # One more point on each side keeps at least four for the cubic where the sweep is coarse.
        points = sorted((c for c in curves if c["codec"] == key), key=quality)
        if not ours or any(math.isnan(quality(c)) for c in ours + points):  # MS-SSIM of tiny images
            out[key] = None
            log(f"BD-rate ({metric}) vs {key}: not computable (no finite values)")
            continue
        lo, hi = quality(ours[0]), quality(ours[-1])
        inside = [i for i, c in enumerate(points) if lo - margin <= quality(c) <= hi + margin]
        anchor = points[max(inside[0] - 1, 0) : inside[-1] + 2] if inside else []
        try:
            out[key] = bd_rate(
                [c["bpp"] for c in anchor],
                [quality(c) for c in anchor],
                [c["bpp"] for c in ours],
                [quality(c) for c in ours],
            )
        except ValueError as exc:
            out[key] = None
            log(f"BD-rate ({metric}) vs {key}: not computable ({exc})")
    return out


def psnr_differences(curves: List[dict], codecs: Sequence[str]) -> Dict[str, List[Optional[float]]]:
    """Per DualRes quality (in order of rate), its average PSNR minus each codec's at the same rate.

    The codec's average curve is interpolated linearly in log-rate; None where our rate lies
    outside it. A BD-rate is one number for a whole curve: this says where along the curve it
    is won or lost.
    """
    ours = sorted((c for c in curves if c["codec"] == "dualres"), key=lambda c: c["bpp"])
    out = {}
    for key in codecs:
        points = sorted((c for c in curves if c["codec"] == key), key=lambda c: c["bpp"])
        log_rate = np.log([c["bpp"] for c in points]) if points else np.array([])
        diffs = []
        for c in ours:
            lr = math.log(c["bpp"])
            if len(points) < 2 or not log_rate[0] <= lr <= log_rate[-1]:
                diffs.append(None)
                continue
            diffs.append(float(c["psnr"] - np.interp(lr, log_rate, [p["psnr"] for p in points])))
        out[key] = diffs
    return out


def _plot(curves: List[dict], names: Dict[str, str], path: str, title: str) -> None:
    try:  # matplotlib is optional (the ``eval`` extra): without it, no plot; imported only here
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in ["dualres"] + list(names):
        cs = [c for c in curves if c["codec"] == key]
        label = "DualRes (ours)" if key == "dualres" else names[key]
        style = dict(marker="o", linewidth=2.2, color="black") if key == "dualres" else dict(marker=".", linewidth=1)
        axes[0].plot([c["bpp"] for c in cs], [c["psnr"] for c in cs], label=label, **style)
        axes[1].plot([c["bpp"] for c in cs], [ms_ssim_db(c["ms_ssim"]) for c in cs], label=label, **style)
    ours = [c["bpp"] for c in curves if c["codec"] == "dualres"]
    xmax = max(ours) * 1.3
    shown = [c for c in curves if c["bpp"] <= xmax]
    for ax, ylabel, y in zip(
        axes, ["RGB PSNR (dB)", "MS-SSIM (dB)"], [lambda c: c["psnr"], lambda c: ms_ssim_db(c["ms_ssim"])]
    ):
        ax.set_xlim(0, xmax)
        # Fit the y axis to the points inside the x range: the classical codecs' high-rate points
        # (up to 50 dB) would otherwise squeeze every curve into the bottom of the plot.
        ys = [v for v in map(y, shown) if math.isfinite(v)]
        if ys:
            ax.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Rate-distortion on {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
