"""GDN: dualres_ext's fused kernels against compressai.layers.GDN, side by side in one process.

    PYTHONPATH=src python benchmarks/bench_gdn.py [--repeat 5] [--threads N] [--device cpu|cuda]

For each shape: no_grad forward (compressai / ours / ours in place, i.e. what a GDN after a
convolution may do with the convolution's output) and a training step (forward + backward w.r.t. x and
the parameters). Times are the best of --repeat runs after one warm-up, in milliseconds.
"""

import argparse
import time

import torch
from compressai.layers import GDN as CompressAIGDN

import dualres_ext
from dualres_ext import layers
from dualres_ext.tools.timing import best_ms, sync_device

SHAPES = [(1, 192, 256, 384), (1, 192, 128, 192), (1, 192, 64, 96), (8, 128, 64, 64)]


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def timed_ms(fn, repeat, device):
    """Best of ``repeat`` runs after a warm-up, in ms, the device synchronised, on CLOCK."""
    return best_ms(fn, repeat, sync=lambda: sync_device(device), clock=CLOCK)


def make_pair(c, device, dtype, inverse=False):
    theirs = CompressAIGDN(c, inverse=inverse)
    with torch.no_grad():  # a trained-looking, dense gamma
        theirs.gamma.uniform_(0.0, 0.1)
    ours = layers.GDN(c, inverse=inverse)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(device, dtype), ours.to(device, dtype)


def train_step(module, x):
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    module(x).sum().backward()


def bench_layers(args, device, dtype):
    clock = "CPU time" if CLOCK is time.process_time else "wall time"
    print(
        f"\n### GDN layer, {device} {str(dtype).replace('torch.', '')}, "
        f"threads={torch.get_num_threads()}, best of {args.repeat}, {clock}, ms\n"
    )
    print(
        "| shape | layout | CompressAI fwd | ours fwd | ours fwd in place | fwd speed-up (in place) "
        "| CompressAI train step | ours train step | train speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        theirs, ours = make_pair(shape[1], device, dtype)
        x = torch.randn(shape, device=device, dtype=dtype)
        for layout in ("nchw", "nhwc"):
            if layout == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
            scratch = x.clone()
            with torch.no_grad():
                t_ref = timed_ms(lambda: theirs(x), args.repeat, device)
                t_ours = timed_ms(lambda: ours(x), args.repeat, device)
                # In place on a scratch copy, as the conv blocks do (the values drift between
                # runs, which does not change the work done).
                t_inpl = timed_ms(lambda: ours(scratch, inplace=True), args.repeat, device)
            t_ref_tr = timed_ms(lambda: train_step(theirs, x), args.repeat, device)
            t_ours_tr = timed_ms(lambda: train_step(ours, x), args.repeat, device)
            print(
                f"| {tuple(shape)} | {layout} | {t_ref:.1f} | {t_ours:.1f} | {t_inpl:.1f} "
                f"| {t_ref / t_ours:.2f}x ({t_ref / t_inpl:.2f}x) | {t_ref_tr:.1f} | {t_ours_tr:.1f} "
                f"| {t_ref_tr / t_ours_tr:.2f}x |"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU: time with process_time (CPU seconds of this process), for a machine shared "
        "with other jobs; meaningful with --threads 1",
    )
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, dualres_ext {dualres_ext.__version__} {dualres_ext.build_info()}")
    dtypes = [torch.float32] + ([torch.float16] if args.device == "cuda" else [])
    for dtype in dtypes:
        bench_layers(args, args.device, dtype)


if __name__ == "__main__":
    main()
