"""CompressAI models before/after dualres_ext.compat.accelerate(): seconds and entropy-coding share.

    PYTHONPATH=src python benchmarks/bench_compat.py [--repeat 3] [--models mbt2018-mean,...] [--image PATH]

CPU, random weights (seeded), one 768x512 image (--image, e.g. Kodak's kodim01, cropped to
768x512; without it a synthetic one). For each model: compress and decompress seconds of the original CompressAI
model and of an accelerated deep copy (default settings: CompressAI-identical bytes, fused GDN),
best of --repeat runs each (the machine is shared), and the time spent in entropy coding, measured
by wrapping the same call sites on both sides:

* EntropyBottleneck / GaussianConditional ``compress``, ``decompress``, ``build_indexes``;
* the rANS coder objects that serial context models create (``encode_with_indexes``, ``flush``,
  ``set_stream``, ``decode_stream``), CompressAI's or dualres_ext's (whose tensor versions of the
  serial loops call ``build_indexes`` and the coder directly: the same call sites).

Nested wrapped calls count once. Also checks that both sides produce the same bytes and decode the
same latent.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import compressai
import numpy as np
import torch
from compressai.models import Cheng2020AnchorCheckerboard, Elic2022Official
from compressai.zoo import image_models

from dualres_ext import compat

QUALITY = 6  # zoo models at quality 6: N=192, M=320 (as Cheng2020AnchorCheckerboard / ELIC defaults)
MODELS = {
    "mbt2018-mean": lambda: image_models["mbt2018-mean"](quality=QUALITY),
    "Cheng2020AnchorCheckerboard": lambda: Cheng2020AnchorCheckerboard(),
    "Elic2022Official": lambda: Elic2022Official(),
    "mbt2018 (serial)": lambda: image_models["mbt2018"](quality=QUALITY),
    "cheng2020-anchor (serial)": lambda: image_models["cheng2020-anchor"](quality=QUALITY),
}


class CodingTimer:
    """Accumulates wall time spent inside wrapped entropy-coding calls (outermost call only)."""

    def __init__(self):
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.depth -= 1

        return timed


TIMER = CodingTimer()


class _TimedCoder:
    """Proxy for a rANS coder object: every method call is timed."""

    def __init__(self, coder):
        self._coder = coder

    def __getattr__(self, name):
        attr = getattr(self._coder, name)
        return TIMER.wrap(attr) if callable(attr) else attr


def install_timers():
    from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional

    for cls in (
        EntropyModel,
        EntropyBottleneck,
        GaussianConditional,
        compat.DualresEntropyBottleneck,
        compat.DualresGaussianConditional,
    ):
        for name in ("compress", "decompress", "build_indexes"):
            if name in vars(cls):
                setattr(cls, name, TIMER.wrap(vars(cls)[name]))
    for cls in (compat._NativeEntropyBottleneck, compat._NativeGaussianConditional):
        for name in ("compress", "decompress", "build_indexes"):
            if name in vars(cls):
                setattr(cls, name, TIMER.wrap(vars(cls)[name]))
    # dualres_ext's coder objects (the accelerated serial loops create them directly).
    from dualres_ext import ans

    for cls in (ans.RansEncoder, ans.RansDecoder, ans.BufferedRansEncoder):
        for name in ("encode_with_indexes", "flush", "set_stream", "decode_stream", "decode_with_indexes"):
            if name in vars(cls):
                setattr(cls, name, TIMER.wrap(vars(cls)[name]))
    # Serial context models build their coders through the switches compat installed in place of
    # the compressai.ans names: time the objects either side creates.
    for switch in compat._SWITCHES.values():
        for side in ("original", "ours"):
            factory = getattr(switch, side)
            setattr(switch, side, lambda *a, _f=factory, **k: _TimedCoder(_f(*a, **k)))


def load_image(path: str | None) -> torch.Tensor:
    from PIL import Image

    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"bench_compat: no such image: {path}")
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
        if x.shape[2] > x.shape[3]:
            x = x.transpose(2, 3).contiguous()
        return x[:, :, :512, :768], path
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 32, 48, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(512, 768), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.rand(1, 3, 512, 768, generator=g)).clamp(0, 1), "synthetic"


def measure(model, x, repeat):
    """Best-of-repeat (compress s, coding s, decompress s, coding s) and the last outputs."""
    best = [float("inf")] * 4
    out = dec = None
    for _ in range(repeat):
        with torch.no_grad():
            TIMER.seconds = 0.0
            t = time.perf_counter()
            out = model.compress(x)
            enc_s, enc_c = time.perf_counter() - t, TIMER.seconds
            TIMER.seconds = 0.0
            t = time.perf_counter()
            dec = model.decompress(out["strings"], out["shape"])
            dec_s, dec_c = time.perf_counter() - t, TIMER.seconds
        best[0] = min(best[0], enc_s)
        best[1] = min(best[1], enc_c)
        best[2] = min(best[2], dec_s)
        best[3] = min(best[3], dec_c)
    return best, out, dec


def flatten(strings):
    if isinstance(strings, (bytes, bytearray)):
        return [bytes(strings)]
    return [s for item in strings for s in flatten(item)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument(
        "--image", default=None, help="a photo (e.g. Kodak kodim01.png); default: a synthetic 768x512 image"
    )
    args = parser.parse_args(argv)

    install_timers()
    x, source = load_image(args.image)
    print(f"# CompressAI {compressai.__version__} before/after dualres_ext.compat.accelerate()")
    print(
        f"image {tuple(x.shape)} from {source}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"best of {args.repeat}; random weights (zoo models at quality {QUALITY})\n"
    )
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        model.update()
        fast = compat.accelerate(copy.deepcopy(model))
        before, out_b, dec_b = measure(model, x, args.repeat)
        after, out_a, dec_a = measure(fast, x, args.repeat)
        same = flatten(out_b["strings"]) == flatten(out_a["strings"])
        diff = (dec_b["x_hat"] - dec_a["x_hat"]).abs().max().item()
        nbytes = sum(len(s) for s in flatten(out_b["strings"]))
        rows.append((name, before, after, same, diff, nbytes))
        print(
            f"{name}: done ({nbytes} bytes, same bytes: {same}, max |x_hat diff| {diff:.1e})",
            file=sys.stderr,
            flush=True,
        )

    print(
        "| model | side | CompressAI s | accelerated s | speed-up | entropy coding s (CompressAI -> ours) "
        "| coding speed-up | coding share (CompressAI -> ours) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, b, a, same, diff, nbytes in rows:
        for side, i in (("compress", 0), ("decompress", 2)):
            print(
                f"| {name} | {side} | {b[i]:.3f} | {a[i]:.3f} | {b[i] / a[i]:.2f}x | "
                f"{b[i + 1]:.4f} -> {a[i + 1]:.4f} | {b[i + 1] / max(a[i + 1], 1e-9):.1f}x | "
                f"{100 * b[i + 1] / b[i]:.0f}% -> {100 * a[i + 1] / a[i]:.0f}% |"
            )
    print()
    for name, b, a, same, diff, nbytes in rows:
        print(f"- {name}: {nbytes} bytes; accelerated bytes identical: {same}; max |x_hat difference| {diff:.1e}")


if __name__ == "__main__":
    main()
