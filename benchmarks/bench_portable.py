"""Two builds of the extension side by side: the portable default (run-time CPU kernels) against
a ``DUALRES_NATIVE=1`` (-march=native) build, on the CPU kernels the codec spends its time in.

    DUALRES_NATIVE=1 DUALRES_NO_CUDA=1 python setup.py build_ext --inplace   # in a copy at OTHER
    python benchmarks/bench_portable.py --other OTHER/src [--rounds 3] [--repeat 20]

Each build runs in its own process (one thread), the two alternating for ``--rounds`` rounds;
every figure is the best over all rounds, in milliseconds, and the ratio is portable / native.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKLOAD = r"""
import json, math, sys, time
import torch
torch.set_num_threads(1)
import dualres_ext
from dualres_ext import ops
repeat = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
def best(fn):
    fn(); out = math.inf
    for _ in range(repeat):
        t = time.perf_counter(); fn(); out = min(out, time.perf_counter() - t)
    return 1e3 * out
table = torch.exp(torch.linspace(math.log(0.11), math.log(256.0), 64))
cdfs, lengths, offsets = ops.gaussian_cdf_tables(table)
scales = torch.exp(torch.rand(1, 320, 48, 32, generator=g) * math.log(20 / 0.11) + math.log(0.11))
y = torch.randn(1, 320, 48, 32, generator=g) * scales
idx = ops.build_indexes(scales, table)
sym = ops.quantize_symbols(y)
data = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
x = torch.randn(1, 192, 128, 192, generator=g)
beta, gamma = torch.rand(192, generator=g) + 0.5, torch.rand(192, 192, generator=g) * 0.01
print(json.dumps({
    "kernels": dualres_ext.build_info().get("cpu_kernels"),
    "native": dualres_ext.build_info().get("native"),
    "build_indexes": best(lambda: ops.build_indexes(scales, table)),
    "quantize": best(lambda: ops.quantize_symbols(y)),
    "likelihood": best(lambda: ops.gaussian_likelihood(y, scales)),
    "rans_encode": best(lambda: ops.rans_encode(sym, idx, cdfs, lengths, offsets)),
    "rans_decode": best(lambda: ops.rans_decode(data, idx, cdfs, lengths, offsets)),
    "gdn_forward": best(lambda: ops.gdn(x, beta, gamma)),
}))
"""


def run(path: str, repeat: int) -> dict:
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, str(repeat)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="the src/ folder of the -march=native build")
    ap.add_argument(
        "--this",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"),
        help="the src/ folder of the portable build",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    best = {"portable": {}, "native": {}}
    for _ in range(args.rounds):
        for name, path in (("portable", args.this), ("native", args.other)):
            for key, value in run(path, args.repeat).items():
                if isinstance(value, float):
                    best[name][key] = min(value, best[name].get(key, value))
                else:
                    best[name][key] = value
    print(
        f"portable: cpu_kernels={best['portable'].pop('kernels')} native={best['portable'].pop('native')}; "
        f"native: cpu_kernels={best['native'].pop('kernels')} native={best['native'].pop('native')}"
    )
    print("| kernel (1 thread) | portable ms | native ms | portable / native |")
    print("|---|---|---|---|")
    for key, value in best["portable"].items():
        print(f"| {key} | {value:.2f} | {best['native'][key]:.2f} | {value / best['native'][key]:.2f} |")


if __name__ == "__main__":
    main()
