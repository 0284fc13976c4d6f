"""Rate cost of ``compat.accelerate(model, portable=True)`` on a folder of pictures.

    PYTHONPATH=src python benchmarks/compat_portable_rate.py KODAK_FOLDER [--quality 3] [--state FILE]

For CompressAI's mbt2018-mean and bmshj2018-hyperprior (random weights, seeded; or ``--state``, a
state dict for mbt2018-mean), the total bytes of ``compress`` with the default acceleration
(CompressAI's stream) and with ``portable=True`` (integer hyper synthesis, marked strings), and
the PSNR of both decodes. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import torch
from compressai.zoo import bmshj2018_hyperprior, mbt2018_mean
from PIL import Image

from dualres_ext import compat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--state", default=None)
    args = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.folder, "*.png")))
    print(
        "| model | default bytes | portable bytes | rate change | PSNR default | PSNR portable |\n|---|---:|---:|---:|---:|---:|"
    )
    makers = [("mbt2018-mean", mbt2018_mean)] + ([] if args.state else [("bmshj2018-hyperprior", bmshj2018_hyperprior)])
    for name, make in makers:
        models = []
        for portable in (False, True):
            torch.manual_seed(0)
            m = make(quality=args.quality, pretrained=False).eval()
            if args.state:
                m.load_state_dict(torch.load(args.state, map_location="cpu"))
            compat.accelerate(m, portable=portable)
            m.update(force=True)
            models.append(m)
        total = [0, 0]
        psnr = [[], []]
        for path in files:
            img = np.asarray(Image.open(path).convert("RGB"))
            x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
            x = x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64]
            for i, m in enumerate(models):
                with torch.no_grad():
                    out = m.compress(x)
                    rec = m.decompress(out["strings"], out["shape"])["x_hat"].clamp(0, 1)
                total[i] += sum(len(s[0]) for s in out["strings"])
                mse = float(((rec - x) ** 2).mean())
                psnr[i].append(10 * np.log10(1 / max(mse, 1e-12)))
        label = name + (" (trained state)" if args.state else " (random init)")
        print(
            f"| {label} | {total[0]} | {total[1]} | {100 * (total[1] / total[0] - 1):+.3f}% | "
            f"{np.mean(psnr[0]):.3f} | {np.mean(psnr[1]):.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
