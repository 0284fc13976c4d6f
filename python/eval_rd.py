"""R-D evaluation of DualRes against classical codecs over a folder of images.

  python python/eval_rd.py ../shared/data/kodak --out results/kodak [--weights W] [--codecs jpeg420 webp avif]

Writes per_image.csv, summary.json (dataset-average curves, BD-rates) and rd.png into --out.
The same runs as ``python -m dualres_ext eval DIR``.
"""
from __future__ import annotations

import argparse
import sys

from dualres_ext.evaluation import evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--out", default="results/eval")
    ap.add_argument("--weights", default=None, help="a weights file (default: the package's trained weights)")
    ap.add_argument("--qualities", type=float, nargs="*", default=None)
    ap.add_argument("--codecs", nargs="*", default=None, help="classical codecs (default: all installed)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--anchors", default=None,
                    help="per_image.csv of an earlier run over the same folder: reuse its classical-codec rows")
    ap.add_argument("--refine-steps", type=int, default=0, help="DualRes encodes with latent refinement (0: off)")
    ap.add_argument("--refine-rounds", type=int, default=None,
                    help="discrete rounds after the steps (default 3 with --refine-steps; alone without)")
    ap.add_argument("--workers", type=int, default=1, help="images measured at once, in separate processes")
    args = ap.parse_args(argv)
    qualities = None if args.qualities is None else [int(q) if float(q).is_integer() else q for q in args.qualities]
    evaluate(args.folder, args.out, weights=args.weights, qualities=qualities, codecs=args.codecs, device=args.device,
             anchors=args.anchors, refine_steps=args.refine_steps, refine_rounds=args.refine_rounds,
             workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
