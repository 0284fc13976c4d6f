"""The DualRes codec on a GPU against the CPU, in one process (a step of benchmarks/gpu_check.sh).

    PYTHONPATH=src python benchmarks/gpu_codec_check.py [--batch 16] [--repeat 3]

1. Streams written on the CPU decode on the GPU, and streams written on the GPU decode on the
   CPU, to the same latents (versions 4 and 5 are exact: integer entropy parameters), for the
   bundled photo at qualities 0, 2.5 and 5 and a few synthetic pictures and sizes.
2. The slice loops of the GPU encoder and decoder wait for the host nowhere:
   ``torch.cuda.set_sync_debug_mode("error")`` is on while they run, so any synchronising call
   inside them (``.item()``, ``.cpu()``, a pageable copy, ``nonzero``) raises.
3. Throughput of ``compress_latents`` / ``decompress_latents`` (entropy parameters and coding) on a
   batch of Kodak-size (768x512) pictures, GPU against CPU, and end-to-end ``encode`` / ``decode``
   of the batch.

Exits non-zero on any mismatch or synchronisation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dualres_ext
from dualres_ext import codec


def photo() -> np.ndarray:
    path = Path(dualres_ext.__file__).resolve().parent / "assets" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB"))


def synthetic(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx * yy) % 256], -1) + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def latents(data: bytes, model, wid) -> tuple:
    y_h, y_l = codec._decode_latents(model, wid, [codec.parse_header(data)])
    return y_h.cpu(), y_l.cpu()


def cross_device(failures: list) -> None:
    cpu, wid = codec.resolve_model(None, "cpu")
    gpu, _ = codec.resolve_model(None, "cuda")
    cases = [(photo(), q) for q in (0, 2.5, 5)] + [(synthetic(1, 200, 300), 1), (synthetic(2, 64, 64), 4)]
    for i, (img, q) in enumerate(cases):
        for version in (4, 5):
            written = {
                "cpu": codec.encode(img, quality=q, version=version, device="cpu"),
                "cuda": codec.encode(img, quality=q, version=version, device="cuda"),
            }
            for where, data in written.items():
                a, b = latents(data, cpu, wid), latents(data, gpu, wid)
                ok = all(torch.equal(x, y) for x, y in zip(a, b))
                print(f"case {i} q={q} v{version}: written on {where}, CPU and GPU decode alike: {ok}")
                if not ok:
                    failures.append(f"cross-device latents, case {i}, v{version}, written on {where}")


def no_waits_in_the_slice_loops(failures: list) -> None:
    model, _ = codec.resolve_model(None, "cuda")
    x = torch.rand(2, 3, 256, 384, device="cuda")
    with torch.no_grad():
        y_h, y_l = model.analysis(x, 3.0)
        z = model.hyper_analysis(y_h, y_l)
        coded = model.compress_latents(y_h, y_l, z)  # warms the caches (tables on the device)
        model.decompress_latents(coded["strings"], coded["shape"])
    loop = model.exact.decode_latents

    def watched(*args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return loop(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    model.exact.decode_latents = watched
    try:
        for name, run in (
            ("encoder", lambda: model.compress_latents(y_h, y_l, z)),
            ("decoder", lambda: model.decompress_latents(coded["strings"], coded["shape"])),
        ):
            try:
                with torch.no_grad():
                    run()
                print(f"{name} slice loop: no synchronisation")
            except RuntimeError as exc:
                print(f"{name} slice loop synchronised: {exc}")
                failures.append(f"{name} slice loop synchronised")
    finally:
        del model.exact.decode_latents


def best(fn, repeat: int, sync: bool) -> float:
    times = []
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def throughput(batch: int, repeat: int) -> None:
    rng = np.random.default_rng(5)
    base = np.asarray(Image.fromarray(photo()).resize((768, 512)))
    images = [
        np.clip(base.astype(int) + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8) for _ in range(batch)
    ]
    print(f"\n| {batch} pictures 768x512, quality 3 | CPU ms | GPU ms | CPU/GPU |")
    print("|---|---:|---:|---:|")
    rows = {}
    for device in ("cpu", "cuda"):
        model, _ = codec.resolve_model(None, device)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(device)
        with torch.no_grad():
            y_h, y_l = model.analysis(x, 3.0)
            z = model.hyper_analysis(y_h, y_l)
            coded = model.compress_latents(y_h, y_l, z)
        sync = device == "cuda"
        with torch.no_grad():
            rows.setdefault("compress_latents", {})[device] = best(
                lambda: model.compress_latents(y_h, y_l, z), repeat, sync
            )
            rows.setdefault("decompress_latents", {})[device] = best(
                lambda: model.decompress_latents(coded["strings"], coded["shape"]), repeat, sync
            )
        streams = codec.encode(images, quality=3, device=device)
        rows.setdefault("encode (list)", {})[device] = best(
            lambda: codec.encode(images, quality=3, device=device), repeat, sync
        )
        rows.setdefault("decode (list)", {})[device] = best(
            lambda: codec.decode(streams, device=device, output="tensor"), repeat, sync
        )
    for name, t in rows.items():
        print(f"| {name} | {t['cpu'] * 1e3:.1f} | {t['cuda'] * 1e3:.1f} | {t['cpu'] / t['cuda']:.1f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if not dualres_ext.build_info()["cuda"] or not torch.cuda.is_available():
        sys.exit("gpu_codec_check: needs a CUDA build of dualres_ext and a visible GPU")
    failures: list = []
    cross_device(failures)
    no_waits_in_the_slice_loops(failures)
    throughput(args.batch, args.repeat)
    if failures:
        print("FAILED:", *failures, sep="\n  ")
        return 1
    print("gpu_codec_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
