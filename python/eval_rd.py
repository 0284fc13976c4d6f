"""R-D evaluation of DualRes against classical codecs over a folder of images: the command
``python -m dualres_ext eval`` (the same options, the same implementation).

  python python/eval_rd.py FOLDER --out results/kodak [--weights W] [--qualities 0 1 2] [--codecs jpeg420 webp avif]

Writes per_image.csv, summary.json (dataset-average curves, BD-rates) and rd.png into --out.
``python python/eval_rd.py --help`` lists every option.
"""

from __future__ import annotations

import sys

from dualres_ext.tools.cli import main as cli_main


def main(argv=None) -> int:
    """``dualres eval`` with ``argv`` (default: this script's arguments)."""
    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
