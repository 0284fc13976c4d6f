"""The command line: ``python -m dualres_ext <command>``, also installed as ``dualres``
(``main``), and ``python/eval_rd.py`` (the ``eval`` command).

Each command imports what it needs when it runs, so that ``dualres info`` or ``--help`` does not
load the model, the codec and the classical codecs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .. import __version__, build_info


def _cmd_info(args) -> int:
    print(f"dualres_ext {__version__}: {build_info()}")
    return 0


# Exit codes of compress/decompress (argparse itself exits with 2 on usage errors).
EXIT_ERROR, EXIT_BITSTREAM, EXIT_WEIGHTS = 1, 3, 4


def _fail(message: str, code: int) -> int:
    print(f"dualres: error: {message}", file=sys.stderr)
    return code


def _run_codec(func, args) -> int:
    """Run a codec command, turning the expected failures into messages and exit codes."""
    from ..codec import BitstreamError, WeightsNotFoundError

    try:
        return func(args)
    except WeightsNotFoundError as exc:
        return _fail(str(exc), EXIT_WEIGHTS)
    except BitstreamError as exc:
        return _fail(f"{getattr(args, 'input', args.command)}: {exc}", EXIT_BITSTREAM)
    except (OSError, ValueError, TypeError) as exc:
        return _fail(str(exc), EXIT_ERROR)


def _cmd_compress(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from ..codec import encode, parse_header

    if os.path.isdir(args.input):
        return _cmd_compress_folder(args)

    try:
        image = Image.open(args.input)
        image.load()
    except FileNotFoundError:
        return _fail(f"{args.input}: no such file", EXIT_ERROR)
    except (UnidentifiedImageError, OSError) as exc:
        return _fail(f"{args.input}: not a readable image ({exc})", EXIT_ERROR)
    if args.max_bytes is not None and args.max_bpp is not None:
        return _fail("give --max-bytes or --max-bpp, not both", EXIT_ERROR)
    max_bytes = args.max_bytes
    if args.max_bpp is not None:
        if not (0 < args.max_bpp < float("inf")):
            return _fail(f"--max-bpp must be a positive number, got {args.max_bpp}", EXIT_ERROR)
        max_bytes = max(1, int(args.max_bpp * image.width * image.height / 8))
    start = time.perf_counter()
    data = encode(
        image,
        quality=args.quality,
        device=args.device,
        weights=args.weights,
        max_bytes=max_bytes,
        refine_steps=args.refine_steps,
        refine_rounds=args.refine_rounds,
    )
    seconds = time.perf_counter() - start
    with open(args.output, "wb") as f:
        f.write(data)
    bpp = 8.0 * len(data) / (image.width * image.height)
    quality = parse_header(data)["quality"]
    print(
        f"{args.output}: {len(data)} bytes, {bpp:.4f} bpp, {image.width}x{image.height}, "
        f"quality {quality:g}, {seconds:.2f} s"
    )
    return 0


def _cmd_compress_folder(args) -> int:
    from .folders import compress_folder

    if args.max_bytes is not None:
        return _fail("a folder takes --max-bpp (per image), not --max-bytes", EXIT_ERROR)
    summary = compress_folder(
        args.input,
        args.output,
        quality=args.quality,
        max_bpp=args.max_bpp,
        device=args.device,
        weights=args.weights,
        refine_steps=args.refine_steps,
        refine_rounds=args.refine_rounds,
    )
    print(summary.line("compressed"))
    return EXIT_ERROR if summary.failures else 0


def _cmd_decompress_folder(args) -> int:
    from .folders import decompress_folder

    summary = decompress_folder(
        args.input, args.output, image_format=args.format, device=args.device, weights=args.weights
    )
    print(summary.line("decompressed"))
    return EXIT_ERROR if summary.failures else 0


def _cmd_decompress(args) -> int:
    from ..codec import decode

    if os.path.isdir(args.input):
        return _cmd_decompress_folder(args)

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


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        args.image,
        args.out,
        args.qualities,
        weights=args.weights,
        refine_steps=args.refine_steps,
        refine_rounds=args.refine_rounds,
    )
    return 0


def _cmd_eval(args) -> int:
    from . import evaluation

    # Whole-number qualities as ints: they name the rows of per_image.csv ("2", not "2.0"), which
    # --anchors and later runs match on.
    qualities = None if args.qualities is None else [int(q) if q.is_integer() else q for q in args.qualities]
    evaluation.evaluate(
        args.folder,
        args.out,
        weights=args.weights,
        qualities=qualities,
        codecs=args.codecs,
        device=args.device,
        anchors=args.anchors,
        refine_steps=args.refine_steps,
        refine_rounds=args.refine_rounds,
        workers=args.workers,
    )
    return 0


def _cmd_bench_rans(args) -> int:
    from .rans_demo import run

    return run(args.repeat, args.seed)


def _cmd_weights(args) -> int:
    """What a weights file is: configuration, size, how it was trained (metadata and lineage)."""
    from ..codec import resolve_model
    from ..models.zoo import DEFAULT_WEIGHTS

    # The codec's own resolution: the default file, or a clear error where it is missing.
    model, wid = resolve_model(args.weights, None)
    path = args.weights or str(DEFAULT_WEIGHTS)
    meta = dict(model.metadata)
    info = {
        "file": os.path.abspath(path),
        "bytes": os.path.getsize(path),
        "model": model.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_id": wid,
        "qualities": model.num_qualities,
        "config": model.config,
        "metadata": meta,
    }
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(
        f"{info['file']}: {model.name!r}, {info['parameters'] / 1e6:.2f} M parameters, "
        f"{info['bytes'] / 1e6:.1f} MB, {model.num_qualities} qualities, weights id {info['weights_id']:#010x}"
    )
    print("configuration: " + ", ".join(f"{k}={v}" for k, v in model.config.items() if k != "lambdas"))
    print("lambdas: " + ", ".join(f"{v:g}" for v in model.config["lambdas"]))
    if "steps" in meta:
        print(
            f"trained: {meta['steps']:,} steps on {meta.get('training_images')} images "
            f"({meta.get('data')}), crop {meta.get('crop')}, batch {meta.get('batch')}"
            + (f"; weights: {meta['weights']}" if meta.get("weights", "trained") != "trained" else "")
        )
    val = meta.get("validation")
    if val:
        print(
            f"validation loss {val['loss']:.4f}: "
            + "  ".join(
                f"q{i} {q['bpp']:.3f} bpp / {q['psnr']:.2f} dB" for i, q in enumerate(val.get("per_quality", []))
            )
        )
    lineage = meta.get("lineage") or []
    if lineage:
        print("lineage (from step: command):")
        for entry in lineage:
            print(f"  {entry.get('step')}: {entry.get('command')}")
    if meta.get("training_command"):
        print(f"last training command: {meta['training_command']}")
    return 0


def _add_refinement(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        metavar="N",
        help=f"optimise the latents {where} with N gradient steps and then a few discrete "
        "rounds (smaller files, a slower encoder, the same decoder; 0 = off)",
    )
    p.add_argument(
        "--refine-rounds",
        type=int,
        default=None,
        metavar="R",
        help="at most R discrete rounds after the gradient steps (default 3 with --refine-steps; "
        "without it, the rounds run alone)",
    )


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="measure N images at once in separate processes, each with 1/N of the threads "
        "(faster on many cores, same bytes; timings are then of a shared machine)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualres",
        description="Learned image compression with DualRes: compress, decompress, compare with classical codecs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="how the native extension was built")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("compress", help="compress an image file (or a folder of them) into .drx bitstreams")
    p.add_argument("input", help="image file (PNG, JPEG, ...; grey and RGBA are handled), or a folder of them")
    p.add_argument("output", help="bitstream file to write (.drx), or the output folder for a folder")
    p.add_argument(
        "--quality",
        "-q",
        type=float,
        default=None,
        help="0 (smallest) .. 5 (best), fractions interpolate (default 3; with --max-bytes or "
        "--max-bpp the highest quality tried, default 5)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="rate control: the best quality whose file is at most this many bytes",
    )
    p.add_argument(
        "--max-bpp",
        type=float,
        default=None,
        help="rate control in bits per pixel (the file at most bpp * width * height / 8 bytes)",
    )
    p.add_argument("--weights", help="checkpoint to use instead of the package's trained weights")
    p.add_argument("--device", help="torch device (default cpu)")
    _add_refinement(p, "for this image")
    p.set_defaults(func=lambda a: _run_codec(_cmd_compress, a))
    p = sub.add_parser("decompress", help="decompress a .drx bitstream (or a folder of them) into image files")
    p.add_argument("input", help="bitstream file (.drx), or a folder of them")
    p.add_argument(
        "output", help="image file to write (format from the extension, e.g. .png), or the output folder for a folder"
    )
    p.add_argument("--format", default="png", help="image format of a folder's outputs (default png)")
    p.add_argument("--weights", help="checkpoint the bitstream was written with (default: the package's)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.set_defaults(func=lambda a: _run_codec(_cmd_decompress, a))
    p = sub.add_parser("demo", help="the main job: compress the bundled photo, compare with JPEG and WebP")
    p.add_argument("--image", help="another image to use instead of the bundled photo")
    p.add_argument("--out", default="dualres_demo", help="folder for reconstructions and side_by_side.png")
    p.add_argument("--qualities", type=int, nargs="+", default=[0, 2, 5])
    p.add_argument("--weights", help="checkpoint to use instead of the package's trained weights")
    _add_refinement(p, "at each quality")
    p.set_defaults(func=lambda a: _run_codec(_cmd_demo, a))
    p = sub.add_parser("eval", help="R-D evaluation over a folder against classical codecs (BD-rate, plot)")
    p.add_argument("folder", help="folder of images (e.g. the 24 Kodak images)")
    p.add_argument("--out", default="results/eval", help="folder for per_image.csv, summary.json, rd.png")
    p.add_argument("--weights", help="checkpoint to use instead of the package's trained weights")
    p.add_argument(
        "--qualities",
        type=float,
        nargs="+",
        default=None,
        metavar="Q",
        help="DualRes qualities to measure (default: every integer quality of the model, "
        "0 .. 5; fractions interpolate)",
    )
    p.add_argument("--codecs", nargs="*", help="classical codecs (default: every one installed)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument(
        "--anchors", help="per_image.csv of an earlier run over the same folder: reuse its classical-codec rows"
    )
    _add_refinement(p, "per image and quality")
    _add_workers(p)
    p.set_defaults(func=lambda a: _run_codec(_cmd_eval, a))
    p = sub.add_parser("weights", help="describe a weights file: configuration, size, training record")
    p.add_argument("--weights", help="weights file (default: the package's trained weights)")
    p.add_argument("--json", action="store_true", help="everything as JSON (configuration, metadata)")
    p.set_defaults(func=lambda a: _run_codec(_cmd_weights, a))
    p = sub.add_parser("bench-rans", help="the rANS coder on a typical 320x48x32 latent (Msym/s, bits/symbol)")
    p.add_argument("--repeat", type=int, default=5, help="timing repetitions (best is shown)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench_rans)
    return parser


def main(argv=None) -> int:
    """Run one command (``argv``: the arguments after the program name; default ``sys.argv[1:]``);
    returns its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)
