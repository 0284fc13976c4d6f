"""Portability sweep of the default (version-5) streams: every stream decodes to the encoder's
scale indexes and means, bit for bit, under other thread counts, ATen CPU kernels, oneDNN
instruction sets, dualres_ext kernel sets and the float64 (CUDA-style) convolution path.

    PYTHONPATH=src python benchmarks/portability_sweep.py KODAK_FOLDER --crops 300 --out summary.json

The encoder (this process, ``--threads`` threads) codes every picture of the folder at every
quality, ``--crops`` random crops of them (random sizes and fractional qualities) and synthetic
pictures (flat, noise, gradients, text-like edges, odd sizes), and records a digest of the
(indexes, means) of every slice it codes. Each decoder configuration then runs in its own process
(the environment variables select ATen's and oneDNN's kernels at start-up) and decodes every
stream, recording the same digest and one of the decoded latents; all must agree. The summary
(JSON) gives the counts, any mismatch and the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from dualres_ext import codec, integer

# Decoder configurations: environment, threads, and whether oneDNN is switched off / the float64
# (CUDA-style) convolutions are forced.
CONFIGS = {
    "1-thread": ({}, 1, ""),
    "3-threads": ({}, 3, ""),
    "aten-default+sse41": (
        {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "DUALRES_CPU_KERNELS": "scalar"},
        1,
        "",
    ),
    "aten-avx2+avx2": (
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DUALRES_CPU_KERNELS": "avx2"},
        2,
        "",
    ),
    "aten-avx512+avx512": ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, 2, ""),
    "no-onednn": ({}, 2, "no-mkldnn"),
    "float64-convolutions": ({}, 2, "float64"),
}


class Tracer:
    """Digests of the (indexes, means) a model's exact slice loop sees, per stream."""

    def __init__(self, model):
        self.model = model
        self.digest = None
        for name in ("_exact_encode_step", "_exact_decode_step"):
            inner = getattr(type(model), name)

            def traced(*args, inner=inner):
                step = inner(model, *args)

                def run(i, indexes, means):
                    self.digest.update(indexes.cpu().numpy().tobytes())
                    self.digest.update(means.cpu().numpy().tobytes())
                    return step(i, indexes, means)

                return run

            setattr(model, name, traced)

    def start(self):
        self.digest = hashlib.sha256()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def pictures(folder: str, crops: int, seed: int):
    """(name, image, quality) of everything the sweep codes."""
    from PIL import Image

    files = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith((".png", ".jpg", ".ppm")))
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    for path, img in zip(files, photos):
        for q in range(6):
            yield f"{os.path.basename(path)}@q{q}", img, q
    rng = np.random.default_rng(seed)
    for i in range(crops):
        img = photos[int(rng.integers(len(photos)))]
        h, w = int(rng.integers(16, min(512, img.shape[0]) + 1)), int(rng.integers(16, min(512, img.shape[1]) + 1))
        y, x = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        q = float(np.float32(rng.uniform(0, 5)))
        yield f"crop{i}@{h}x{w}@q{q:.3f}", np.ascontiguousarray(img[y : y + h, x : x + w]), q
    yy, xx = np.mgrid[0:256, 0:384]
    synth = {
        "flat0": np.zeros((128, 192, 3), np.uint8),
        "flat128": np.full((256, 384, 3), 128, np.uint8),
        "flat255": np.full((64, 64, 3), 255, np.uint8),
        "noise": rng.integers(0, 256, (256, 384, 3), dtype=np.uint8),
        "gradient": np.stack([xx * 255 // 384, yy * 255 // 256, (xx + yy) * 255 // 640], -1).astype(np.uint8),
        "text": np.where(((xx // 2) % 3 == 0) & ((yy // 4) % 4 != 0), 0, 255).astype(np.uint8)[..., None].repeat(3, -1),
        "checker": (((xx // 1 + yy // 1) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1),
        "odd": rng.integers(0, 256, (67, 131, 3), dtype=np.uint8),
    }
    for name, img in synth.items():
        for q in (0, 2.5, 5):
            yield f"{name}@q{q}", img, q


def worker(paths, flag: str) -> None:
    """Decode every stream; print ``trace-digest latent-digest seconds`` per stream."""
    if flag == "no-mkldnn":
        torch.backends.mkldnn.set_flags(False)
    model, wid = codec.resolve_model(None, None)
    tracer = Tracer(model)
    with integer.float64_convolutions() if flag == "float64" else contextlib.nullcontext():
        for path in paths:
            head = codec.parse_header(open(path, "rb").read())
            tracer.start()
            t = time.perf_counter()
            y_h, y_l = codec._decode_latents(model, wid, [head])
            seconds = time.perf_counter() - t
            latents = hashlib.sha256(y_h.numpy().tobytes() + y_l.numpy().tobytes()).hexdigest()
            print(tracer.hexdigest(), latents, f"{seconds:.4f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--crops", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2, help="encoder threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--out", default=None, help="summary JSON")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--worker-flag", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "1")))
        worker(args.worker, args.worker_flag)
        return 0
    if not args.folder:
        ap.error("a folder of pictures is needed")
    torch.set_num_threads(args.threads)
    model, _ = codec.resolve_model(None, None)
    tracer = Tracer(model)
    work = tempfile.mkdtemp(prefix="drx-sweep-")
    names, paths, expected = [], [], []
    t0 = time.perf_counter()
    for name, img, q in pictures(args.folder, args.crops, args.seed):
        tracer.start()
        data = codec.encode(img, quality=q)
        assert data[4] == codec.VERSION
        path = os.path.join(work, f"{len(paths)}.drx")
        with open(path, "wb") as f:
            f.write(data)
        names.append(name)
        paths.append(path)
        expected.append(tracer.hexdigest())
    encode_seconds = time.perf_counter() - t0
    print(f"encoded {len(paths)} streams in {encode_seconds:.0f} s ({args.threads} threads)", flush=True)
    summary = {
        "streams": len(paths),
        "encoder_threads": args.threads,
        "encode_seconds": round(encode_seconds, 1),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "version": codec.VERSION,
        "command": f"python benchmarks/portability_sweep.py KODAK --crops {args.crops}",
        "configs": {},
    }
    latents_ref = None
    for config in args.configs:
        env_extra, threads, flag = CONFIGS[config]
        env = {
            **os.environ,
            **env_extra,
            "SWEEP_THREADS": str(threads),
            "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
            + os.pathsep
            + os.environ.get("PYTHONPATH", ""),
        }
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", *paths, "--worker-flag", flag],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [line.split() for line in out.stdout.splitlines() if line.strip()]
        failed = out.returncode != 0 or len(lines) != len(paths)
        traces = [line[0] for line in lines]
        latents = [line[1] for line in lines]
        if latents_ref is None and not failed:
            latents_ref = latents
        bad = [names[i] for i, (a, b) in enumerate(zip(traces, expected)) if a != b]
        bad_latents = (
            [] if latents_ref is None else [names[i] for i, (a, b) in enumerate(zip(latents, latents_ref)) if a != b]
        )
        summary["configs"][config] = {
            "env": env_extra,
            "threads": threads,
            "flag": flag,
            "decoded": len(lines),
            "trace_mismatches": bad[:20],
            "trace_mismatch_count": len(bad),
            "latent_mismatch_count": len(bad_latents),
            "error": out.stderr[-1500:] if failed else "",
            "decode_seconds_total": round(sum(float(line[2]) for line in lines), 1),
            "wall_seconds": round(time.perf_counter() - t, 1),
        }
        print(config, json.dumps({k: v for k, v in summary["configs"][config].items() if k != "error"}), flush=True)
        if failed:
            print(out.stderr[-1500:], file=sys.stderr)
    summary["all_identical"] = all(
        c["decoded"] == len(paths) and c["trace_mismatch_count"] == 0 and c["latent_mismatch_count"] == 0
        for c in summary["configs"].values()
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print("all identical" if summary["all_identical"] else "MISMATCHES", flush=True)
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
