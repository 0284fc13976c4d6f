"""Command line: ``python -m dualres_ext <command>`` (also installed as ``dualres``)."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    import dualres_ext

    print(f"dualres_ext {dualres_ext.__version__}: {dualres_ext.build_info()}")
    return 0


# Exit codes of compress/decompress (argparse itself exits with 2 on usage errors).
EXIT_ERROR, EXIT_BITSTREAM, EXIT_WEIGHTS = 1, 3, 4


def _fail(message: str, code: int) -> int:
    print(f"dualres: error: {message}", file=sys.stderr)
    return code


def _run_codec(func, args) -> int:
    """Run a codec command, turning the expected failures into messages and exit codes."""
    from .codec import BitstreamError, WeightsNotFoundError

    try:
        return func(args)
    except WeightsNotFoundError as exc:
        return _fail(str(exc), EXIT_WEIGHTS)
    except BitstreamError as exc:
        return _fail(f"{args.input}: {exc}", EXIT_BITSTREAM)
    except (OSError, ValueError, TypeError) as exc:
        return _fail(str(exc), EXIT_ERROR)


def _cmd_compress(args) -> int:
    import time

    from PIL import Image, UnidentifiedImageError

    from .codec import encode

    try:
        image = Image.open(args.input)
        image.load()
    except FileNotFoundError:
        return _fail(f"{args.input}: no such file", EXIT_ERROR)
    except (UnidentifiedImageError, OSError) as exc:
        return _fail(f"{args.input}: not a readable image ({exc})", EXIT_ERROR)
    start = time.perf_counter()
    data = encode(image, quality=args.quality, device=args.device, weights=args.weights)
    seconds = time.perf_counter() - start
    with open(args.output, "wb") as f:
        f.write(data)
    bpp = 8.0 * len(data) / (image.width * image.height)
    print(f"{args.output}: {len(data)} bytes, {bpp:.4f} bpp, {image.width}x{image.height}, "
          f"quality {args.quality}, {seconds:.2f} s")
    return 0


def _cmd_decompress(args) -> int:
    import time

    from .codec import decode

    try:
        with open(args.input, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return _fail(f"{args.input}: no such file", EXIT_ERROR)
    start = time.perf_counter()
    image = decode(data, device=args.device, weights=args.weights)
    seconds = time.perf_counter() - start
    image.save(args.output)
    print(f"{args.output}: {image.width}x{image.height} {image.mode}, {seconds:.2f} s")
    return 0


def _gaussian_tables(scale_table, tail_mass=1e-9, precision=16):
    """CompressAI-style quantised Gaussian CDF tables (one row per scale; escape entry last)."""
    import torch

    multiplier = -float(torch.special.ndtri(torch.tensor(tail_mass / 2, dtype=torch.float64)))
    centers = torch.ceil(scale_table.double() * multiplier).long()
    lengths = 2 * centers + 2  # pmf entries + the escape entry, as cdf_length - 1
    width = int(lengths.max()) + 1
    M = 1 << precision
    cdfs = torch.zeros(len(scale_table), width, dtype=torch.int32)
    for t, (s, c, n) in enumerate(zip(scale_table.double(), centers, lengths)):
        v = torch.arange(-int(c), int(c) + 1, dtype=torch.float64).abs()
        pmf = torch.special.ndtr((0.5 - v) / s) - torch.special.ndtr((-0.5 - v) / s)
        p = torch.cat([pmf, (1 - pmf.sum()).clamp(min=0).reshape(1)])
        f = torch.floor(p * (M - int(n))).long() + 1  # every entry codable
        f[torch.argmax(f)] += M - int(f.sum())
        cdfs[t, 1 : int(n) + 1] = torch.cumsum(f, 0).int()
    return cdfs, (lengths + 1).int(), (-centers).int()


def _cmd_demo(args) -> int:
    """Encode and decode the DESIGN.md latent workload with the native multi-lane rANS coder."""
    import math
    import time

    import torch

    import dualres_ext
    from dualres_ext import ops

    print(f"dualres_ext {dualres_ext.__version__}: {dualres_ext.build_info()}")
    gen = torch.Generator().manual_seed(args.seed)
    shape = (1, 320, 48, 32)  # y of a 768x512 image
    scale_table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
    cdfs, lengths, offsets = _gaussian_tables(scale_table)
    lo, hi = math.log(0.11), math.log(20.0)
    scales = torch.exp(torch.rand(shape, generator=gen) * (hi - lo) + lo)
    symbols = torch.round(torch.randn(shape, generator=gen) * scales).int()
    indexes = torch.bucketize(scales, scale_table).clamp(max=len(scale_table) - 1).int()
    n = symbols.numel()

    def best(fn, repeat=args.repeat):
        out, t = None, float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            t = min(t, time.perf_counter() - t0)
        return t, out

    # Ideal size under the tables, to show what the lanes cost.
    t_idx = indexes.reshape(-1).long()
    v = (symbols.reshape(-1) - offsets[t_idx]).long()
    inside = (v >= 0) & (v < lengths[t_idx].long() - 2)
    vv = torch.where(inside, v, lengths[t_idx].long() - 2)
    ideal = float((16 - torch.log2((cdfs[t_idx, vv + 1] - cdfs[t_idx, vv]).double())).sum()) / n

    print(f"workload: {n} Gaussian symbols {tuple(shape)}, scales log-uniform in [0.11, 20], "
          f"64 tables, {torch.get_num_threads()} threads, best of {args.repeat}")
    print(f"{'coder':<28}{'encode Msym/s':>15}{'decode Msym/s':>15}{'bits/sym':>10}{'vs ideal':>10}  lanes")
    for name, lanes in (("native, encoder's lanes", None), ("native, 1 lane", 1)):
        te, data = best(lambda: ops.rans_encode(symbols, indexes, cdfs, lengths, offsets, lanes=lanes))
        td, out = best(lambda: ops.rans_decode(data, indexes, cdfs, lengths, offsets))
        assert torch.equal(out, symbols), "round trip failed"
        bits = len(data) * 8 / n
        n_lanes = _native_lanes(data)
        print(f"{name:<28}{n / te / 1e6:>15.1f}{n / td / 1e6:>15.1f}{bits:>10.4f}{100 * (bits / ideal - 1):>+9.2f}%  {n_lanes}")
    te, data = best(lambda: ops.rans_encode_compat(symbols, indexes, cdfs, lengths, offsets))
    td, out = best(lambda: ops.rans_decode_compat(data, indexes, cdfs, lengths, offsets))
    assert torch.equal(out, symbols), "round trip failed"
    bits = len(data) * 8 / n
    print(f"{'CompressAI-compatible':<28}{n / te / 1e6:>15.1f}{n / td / 1e6:>15.1f}{bits:>10.4f}"
          f"{100 * (bits / ideal - 1):>+9.2f}%  -")
    print(f"ideal (-sum log2 p under the tables): {ideal:.4f} bits/symbol; all round trips exact")
    return 0


def _native_lanes(data: bytes) -> int:
    """Lane count from a native stream header (csrc/rans/FORMAT.md)."""
    pos, values = 9, []
    for _ in range(2):
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append(value)
    return values[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualres", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="how the native extension was built")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("compress", help="compress an image file into a .drx bitstream")
    p.add_argument("input", help="image file (PNG, JPEG, ...; grey and RGBA are handled)")
    p.add_argument("output", help="bitstream file to write (.drx)")
    p.add_argument("--quality", "-q", type=float, default=3,
                   help="0 (smallest) .. 5 (best), fractions interpolate (default 3)")
    p.add_argument("--weights", help="checkpoint to use instead of the package's trained weights")
    p.add_argument("--device", help="torch device (default cpu)")
    p.set_defaults(func=lambda a: _run_codec(_cmd_compress, a))
    p = sub.add_parser("decompress", help="decompress a .drx bitstream into an image file")
    p.add_argument("input", help="bitstream file (.drx)")
    p.add_argument("output", help="image file to write (format from the extension, e.g. .png)")
    p.add_argument("--weights", help="checkpoint the bitstream was written with (default: the package's)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.set_defaults(func=lambda a: _run_codec(_cmd_decompress, a))
    p = sub.add_parser("demo", help="the main job: a short demonstration of the package (rANS coder for now)")
    p.add_argument("--repeat", type=int, default=5, help="timing repetitions (best is shown)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
