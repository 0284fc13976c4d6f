"""Exact (integer) entropy parameters against the float64 path and against CompressAI's mbt2018-mean.

    PYTHONPATH=src python benchmarks/bench_exact.py --image kodim01.png [--repeat 7] [--threads 2]

One process; every variant is timed in turn within each round (interleaved), best of ``--repeat``
rounds, so that a shared machine's load hits all of them alike. Measures, on one image at quality 3:

* the entropy-parameter path alone (hyper synthesis, slice coders, LRP, ``down(ŷ_H)``, the
  scale-to-index step; quantising the latents but no entropy coding): float64 networks (bitstream
  versions 2/3) against the integer networks (versions 4 and 5); with ``--fallback`` also the integer
  networks with their convolutions forced to float64 im2col (the formulation used off CPU);
* ``encode`` and ``decode`` end to end, version 3 against versions 4 and 5 (the shipped weights);
* CompressAI's mbt2018-mean (quality 3, random weights, no download) ``compress`` /
  ``decompress``, plain and with ``dualres_ext.compat.accelerate`` (default and ``portable=True``).

Prints a markdown table of milliseconds and ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dualres_ext import codec, integer
from dualres_ext.models.quantize import quantize_latent


def load(path):
    from PIL import Image

    if path:
        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:768]
    img = np.stack([np.sin(xx / (9.0 + 3 * c)) * np.cos(yy / (13.0 - 2 * c)) for c in range(3)], -1)
    return np.clip(128 + 90 * img + 25 * rng.random((512, 768, 3)), 0, 255).astype(np.uint8)


def entropy_paths(model, img, quality):
    """Two callables: the float64 and the integer entropy-parameter path on ``img``'s latents."""
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, -w % 64, 0, -h % 64), mode="replicate")
    gc = model.gaussian_conditional
    with torch.no_grad():
        y_h, y_l = model.analysis(x, quality)
        z = model.hyper_analysis(y_h, y_l)
        z_hat = quantize_latent(z, model.z_offset(), False, model.entropy_bottleneck)

    def float_step(y, coder):
        pieces = coder.split(y.double())

        def step(i, scales, means):
            gc.build_indexes(scales)
            return quantize_latent(pieces[i], means, False, gc)

        return step

    def exact_step(y, coder):
        pieces = coder.split(y)

        def step(i, indexes, means):
            return quantize_latent(pieces[i].double(), means, False, gc)

        return step

    @torch.no_grad()
    def run_float():
        nets = model.coding_nets()
        model.decode_latents(z_hat.double(), float_step(y_h, nets.coder_h), float_step(y_l, nets.coder_l), nets)

    @torch.no_grad()
    def run_exact():
        model.exact.decode_latents(z_hat, exact_step(y_h, model.coder_h), exact_step(y_l, model.coder_l))

    return run_float, run_exact


def mbt_variants(img):
    """compress/decompress callables of CompressAI's mbt2018-mean: plain, accelerated, portable."""
    from compressai.zoo import mbt2018_mean

    from dualres_ext import compat

    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    x = x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64]
    out = {}
    for name, options in (
        ("mbt2018-mean", None),
        ("mbt2018-mean accelerated", {}),
        ("mbt2018-mean portable", {"portable": True}),
    ):
        torch.manual_seed(0)
        model = mbt2018_mean(quality=3, pretrained=False).eval()
        if options is not None:
            compat.accelerate(model, **options)
        model.update(force=True)
        with torch.no_grad():
            coded = model.compress(x)

        def enc(model=model):
            with torch.no_grad():
                model.compress(x)

        def dec(model=model, coded=coded):
            with torch.no_grad():
                model.decompress(coded["strings"], coded["shape"])

        out[name] = (enc, dec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=None, help="an RGB picture (default: a synthetic 768x512 one)")
    ap.add_argument("--quality", type=float, default=3)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compressai", action="store_true")
    ap.add_argument("--weights", default=None, help="a weights file with exact networks (default: the shipped one)")
    ap.add_argument("--only-entropy", action="store_true", help="time the entropy-parameter paths only")
    ap.add_argument(
        "--fallback", action="store_true", help="also the integer path with float64 convolutions (no int8 GEMM)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    img = load(args.image)
    model, _ = codec.resolve_model(args.weights, None)
    if model.exact is None:
        raise SystemExit("the weights have no exact networks")
    run_float, run_exact = entropy_paths(model, img, args.quality)
    w = args.weights
    v3 = codec.encode(img, quality=args.quality, version=3, weights=w)
    v4 = codec.encode(img, quality=args.quality, version=4, weights=w)
    v5 = codec.encode(img, quality=args.quality, version=5, weights=w)
    jobs = {
        "entropy path float64 (v3)": run_float,
        "entropy path integer (v4, v5)": run_exact,
    }
    if args.fallback:

        def run_fallback():
            with integer.float64_convolutions():
                run_exact()

        jobs["entropy path integer (v4, v5), float64 convolutions"] = run_fallback
    if not args.only_entropy:
        jobs.update(
            {
                "encode v3": lambda: codec.encode(img, quality=args.quality, version=3, weights=w),
                "encode v4": lambda: codec.encode(img, quality=args.quality, version=4, weights=w),
                "encode v5": lambda: codec.encode(img, quality=args.quality, version=5, weights=w),
                "decode v3": lambda: codec.decode(v3, output="numpy", weights=w),
                "decode v4": lambda: codec.decode(v4, output="numpy", weights=w),
                "decode v5": lambda: codec.decode(v5, output="numpy", weights=w),
            }
        )
    if not args.no_compressai and not args.only_entropy:
        for name, (enc, dec) in mbt_variants(img).items():
            jobs[f"{name} compress"] = enc
            jobs[f"{name} decompress"] = dec
    best = {name: float("inf") for name in jobs}
    for fn in jobs.values():  # warm-up
        fn()
    for _ in range(args.repeat):
        for name, fn in jobs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    ms = {k: 1000 * v for k, v in best.items()}
    h, w = img.shape[:2]
    print(
        f"{w}x{h}, quality {args.quality}, {args.threads} threads, best of {args.repeat} interleaved rounds; "
        f"v3 {len(v3)} bytes, v4 {len(v4)} bytes, v5 {len(v5)} bytes\n"
    )
    print("| operation | ms |\n|---|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} |")
    print("\n| ratio | value |\n|---|---:|")
    print(
        f"| entropy path float64 / integer | {ms['entropy path float64 (v3)'] / ms['entropy path integer (v4, v5)']:.2f}x |"
    )
    if args.fallback:
        name = "entropy path integer (v4, v5), float64 convolutions"
        print(
            f"| entropy path integer with float64 convolutions / integer | {ms[name] / ms['entropy path integer (v4, v5)']:.2f}x |"
        )
    if args.only_entropy:
        return 0
    for new in ("v4", "v5"):
        print(f"| encode v3 / {new} | {ms['encode v3'] / ms[f'encode {new}']:.2f}x |")
        print(f"| decode v3 / {new} | {ms['decode v3'] / ms[f'decode {new}']:.2f}x |")
    if not args.no_compressai:
        for what in ("compress", "decompress"):
            ours = ms["encode v5" if what == "compress" else "decode v5"]
            for peer in ("mbt2018-mean", "mbt2018-mean accelerated", "mbt2018-mean portable"):
                print(f"| {peer} {what} / DualRes v5 | {ms[f'{peer} {what}'] / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
