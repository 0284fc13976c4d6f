"""Command line: ``python -m dualres_ext <command>`` (also installed as ``dualres``)."""
from __future__ import annotations

import argparse
import importlib
import sys


def _cmd_info(args) -> int:
    import dualres_ext

    print(f"dualres_ext {dualres_ext.__version__}: {dualres_ext.build_info()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualres", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="how the native extension was built")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="the main job: a short demonstration of the package (rANS coder for now)")
    p.add_argument("--repeat", type=int, default=5, help="timing repetitions (best is shown)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: importlib.import_module("dualres_ext.demo").run(a.repeat, a.seed))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
