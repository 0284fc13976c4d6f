"""End-to-end codec speed: DualRes (compact, paper-size) against CompressAI's models.

    PYTHONPATH=src python benchmarks/bench_codec.py [--image kodim01.png] [--repeat 3] [--device cpu]

All models have random weights (``update()`` first), which is fine for timing: every model runs
its full analysis/synthesis and codes every latent symbol. One process, models timed one after
the other, best of ``--repeat`` runs (the machine is shared: take the best of a few runs).
Prints a markdown table of compress / decompress seconds and the speed-up of each DualRes
model over each peer.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from dualres_ext.tools.timing import sync_device


def load_image(path, device):
    if path and os.path.isfile(path):
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))
    else:
        # A photo-like synthetic 768x512 image (smooth gradients + texture).
        yy, xx = np.mgrid[0:512, 0:768]
        img = np.stack([np.sin(xx / (9.0 + 3 * c)) * np.cos(yy / (13.0 - 2 * c)) for c in range(3)], -1)
        img = np.clip(128 + 90 * img + 25 * np.random.rand(512, 768, 3), 0, 255).astype(np.uint8)
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    return x[..., : h - h % 64, : w - w % 64].to(device)


@torch.no_grad()
def time_model(name, model, x, repeat, compress, decompress, device):
    out = compress(model, x)  # warm-up (allocations, caches)
    decompress(model, out)
    enc, dec, enc_cpu, dec_cpu = [], [], [], []
    for _ in range(repeat):
        sync_device(device)
        t, c = time.perf_counter(), time.process_time()
        out = compress(model, x)
        sync_device(device)
        enc.append(time.perf_counter() - t)
        enc_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        x_hat = decompress(model, out)
        sync_device(device)
        dec.append(time.perf_counter() - t)
        dec_cpu.append(time.process_time() - c)
    n_bytes = sum(len(s[0]) for s in out["strings"])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert x_hat.shape == x.shape, (name, x_hat.shape)
    return {
        "name": name,
        "enc": min(enc),
        "dec": min(dec),
        "bytes": n_bytes,
        "params": params,
        "enc_cpu": min(enc_cpu),
        "dec_cpu": min(dec_cpu),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--image", default=os.path.join(here, "..", "..", "shared", "data", "kodak", "kodim01.png"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 is the steadiest on a busy machine",
    )
    parser.add_argument("--skip-peers", action="store_true", help="time only DualRes")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = load_image(args.image, device)
    rows = []

    from dualres_ext.models import build

    def ours_c(m, x):
        return m.compress(x, 3)

    def ours_d(m, out):
        return m.decompress(out["strings"], out["shape"], 3)["x_hat"]

    for config in ("compact", "paper"):
        model = build(config).to(device).eval()
        model.update(force=True)
        rows.append(time_model(f"DualRes {config}", model, x, args.repeat, ours_c, ours_d, device))
        print(rows[-1], flush=True)

    if not args.skip_peers:
        import compressai
        from compressai.models import Cheng2020AnchorCheckerboard, Elic2022Official, MeanScaleHyperprior

        def ca_c(m, x):
            return m.compress(x)

        def ca_d(m, out):
            return m.decompress(out["strings"], out["shape"])["x_hat"]

        peers = [
            ("mbt2018-mean (N=128, M=192)", lambda: MeanScaleHyperprior(128, 192)),
            ("mbt2018-mean (N=192, M=320)", lambda: MeanScaleHyperprior(192, 320)),
            ("Cheng2020AnchorCheckerboard (N=192)", lambda: Cheng2020AnchorCheckerboard(192)),
            ("Elic2022Official (N=192, M=320)", lambda: Elic2022Official(192, 320)),
        ]
        for name, make in peers:
            model = make().to(device).eval()
            model.update(force=True)
            rows.append(time_model(name, model, x, args.repeat, ca_c, ca_d, device))
            print(rows[-1], flush=True)
        peer_note = f"CompressAI {compressai.__version__}"
    else:
        peer_note = "peers skipped"

    print()
    print(
        f"Image {x.shape[-1]}x{x.shape[-2]}, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {peer_note}; "
        f"random weights, best of {args.repeat}."
    )
    print()
    # CPU seconds (all threads) are less disturbed by other processes than wall time on a
    # shared machine: compare the ratios of both.
    print("| model | params (M) | compress (s) | decompress (s) | compress CPU (s) | decompress CPU (s) | bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['params']:.2f} | {r['enc']:.3f} | {r['dec']:.3f} | "
            f"{r['enc_cpu']:.3f} | {r['dec_cpu']:.3f} | {r['bytes']} |"
        )
    ours = [r for r in rows if r["name"].startswith("DualRes")]
    peers = [r for r in rows if not r["name"].startswith("DualRes")]
    if peers:
        print()
        print("| speed-up (peer time / ours) | " + " | ".join(p["name"] for p in peers) + " |")
        print("|---|" + "---|" * len(peers))
        for o in ours:
            cells = [f"{p['enc'] / o['enc']:.2f}x / {p['dec'] / o['dec']:.2f}x" for p in peers]
            print(f"| {o['name']} wall (compress / decompress) | " + " | ".join(cells) + " |")
            cells = [f"{p['enc_cpu'] / o['enc_cpu']:.2f}x / {p['dec_cpu'] / o['dec_cpu']:.2f}x" for p in peers]
            print(f"| {o['name']} CPU time (compress / decompress) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
