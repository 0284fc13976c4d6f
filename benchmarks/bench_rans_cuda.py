"""GPU native rANS vs our CPU coder vs CompressAI's coder (one 320x48x32 latent and a batch of 16).

    PYTHONPATH=src python benchmarks/bench_rans_cuda.py [--device cuda] [--reps 20] [--lanes 0 256 1024]

Workload: y of shape (1, 320, 48, 32) = 491,520 Gaussian symbols, scales log-uniform in
[0.11, 20], CompressAI's Gaussian tables (64 scales, 16-bit); "batch" = 16 such latents.
Timings include the transfers a GPU codec pays: encode goes from symbols/indexes on the GPU to
the stream bytes on the host; decode from host bytes to symbols on the GPU. Our CPU coder and
CompressAI's (RansEncoder/RansDecoder, tensor<->list conversion included, as
GaussianConditional does it) run from/to CPU tensors. Lanes: 0 = the encoder's choice (same rule
as the CPU, byte-identical streams); larger counts give the GPU more threads at some size cost
(reported as % over the default stream). Prints a markdown table; best of --reps runs.
"""

import argparse
import math
import sys

import torch

import dualres_ext
from dualres_ext import ops
from dualres_ext.tools.timing import best_time

N_CH, H, W = 320, 48, 32


def have_compressai():
    try:
        import compressai  # noqa: F401
    except ImportError:
        return False
    return True


def workload(gen):
    """One latent; CompressAI's Gaussian tables, or dualres_ext's equal ones without compressai."""
    lo, hi = math.log(0.11), math.log(20.0)
    scales = torch.exp(torch.rand(1, N_CH, H, W, generator=gen) * (hi - lo) + lo)
    sym = torch.round(torch.randn(1, N_CH, H, W, generator=gen) * scales).int()
    if have_compressai():
        from compressai.entropy_models import GaussianConditional
        from compressai.models.google import get_scale_table

        gc = GaussianConditional(None)
        gc.update_scale_table(get_scale_table())
        return sym, gc.build_indexes(scales).int(), (gc._quantized_cdf.int(), gc._cdf_length.int(), gc._offset.int())
    table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
    cdfs, lengths, offsets = ops.gaussian_cdf_tables(table)
    return sym, ops.build_indexes(scales, table), (cdfs.int(), lengths.int(), offsets.int())


def best_of(fn, reps, sync=None):
    """Best seconds of ``reps`` runs after a warm-up (allocator, tables, lazy initialisation)."""
    return best_time(fn, reps, sync=sync)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda"], help="the GPU path is what this script measures")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--lanes",
        type=int,
        nargs="+",
        default=[0, 256, 1024, 4096],
        help="GPU lane counts per latent to measure (0 = encoder's choice)",
    )
    ap.add_argument("--no-compressai", action="store_true", help="skip CompressAI's (slow) coder")
    args = ap.parse_args()

    if not dualres_ext.build_info()["cuda"]:
        sys.exit(
            "bench_rans_cuda: this dualres_ext build has no CUDA kernels "
            "(rebuild with FORCE_CUDA=1 on a machine with the CUDA toolkit)"
        )
    if not torch.cuda.is_available():
        sys.exit("bench_rans_cuda: no CUDA GPU visible (torch.cuda.is_available() is False)")

    gen = torch.Generator().manual_seed(1)
    latents = [workload(gen) for _ in range(args.batch)]
    cdfs, lengths, offsets = latents[0][2]
    syms = [s for s, _, _ in latents]
    idxs = [i for _, i, _ in latents]
    n1 = syms[0].numel()
    nb = n1 * args.batch
    sync = torch.cuda.synchronize
    g_tables = [t.cuda() for t in (cdfs, lengths, offsets)]
    g_syms = [s.cuda() for s in syms]
    g_idxs = [i.cuda() for i in idxs]

    rows = []  # (what, symbols, enc_s, dec_s, bytes)

    # Our CPU coder (encoder's lane choice), single latent and the batch as a loop.
    cpu_data = [ops.rans_encode(s, i, cdfs, lengths, offsets) for s, i in zip(syms, idxs)]
    t_e = best_of(lambda: ops.rans_encode(syms[0], idxs[0], cdfs, lengths, offsets), args.reps)
    t_d = best_of(lambda: ops.rans_decode(cpu_data[0], idxs[0], cdfs, lengths, offsets), args.reps)
    rows.append(("ours CPU (%d threads), 1 latent" % torch.get_num_threads(), n1, t_e, t_d, len(cpu_data[0])))
    reps_b = max(1, args.reps // 4)
    t_e = best_of(lambda: [ops.rans_encode(s, i, cdfs, lengths, offsets) for s, i in zip(syms, idxs)], reps_b)
    t_d = best_of(lambda: [ops.rans_decode(d, i, cdfs, lengths, offsets) for d, i in zip(cpu_data, idxs)], reps_b)
    cpu_batch = (t_e, t_d)
    rows.append((f"ours CPU, batch of {args.batch} (loop)", nb, t_e, t_d, sum(map(len, cpu_data))))

    if not args.no_compressai and not have_compressai():
        print("(compressai is not installed: its coder is left out)\n")
    elif not args.no_compressai:
        from compressai.ans import RansDecoder, RansEncoder

        cl = [cdfs.tolist(), lengths.reshape(-1).tolist(), offsets.reshape(-1).tolist()]
        enc, dec = RansEncoder(), RansDecoder()
        ca_data = enc.encode_with_indexes(syms[0].reshape(-1).tolist(), idxs[0].reshape(-1).tolist(), *cl)
        t_e = best_of(
            lambda: enc.encode_with_indexes(syms[0].reshape(-1).tolist(), idxs[0].reshape(-1).tolist(), *cl),
            max(1, args.reps // 4),
        )
        t_d = best_of(
            lambda: torch.tensor(dec.decode_with_indexes(ca_data, idxs[0].reshape(-1).tolist(), *cl)),
            max(1, args.reps // 4),
        )
        rows.append(("CompressAI 1.2.8 coder, 1 latent", n1, t_e, t_d, len(ca_data)))

    for lanes in args.lanes:
        lanes_arg = lanes if lanes > 0 else None
        label = "encoder's choice" if lanes == 0 else f"{lanes} lanes"
        data1 = ops.rans_encode(g_syms[0], g_idxs[0], *g_tables, lanes=lanes_arg)
        if lanes == 0:
            assert data1 == cpu_data[0], "GPU stream differs from the CPU stream"
        out = ops.rans_decode(data1, g_idxs[0], *g_tables)
        assert torch.equal(out.cpu(), syms[0]), "GPU round trip failed"
        t_e = best_of(lambda: ops.rans_encode(g_syms[0], g_idxs[0], *g_tables, lanes=lanes_arg), args.reps, sync)
        t_d = best_of(lambda: ops.rans_decode(data1, g_idxs[0], *g_tables), args.reps, sync)
        rows.append((f"ours GPU, 1 latent, {label}", n1, t_e, t_d, len(data1)))
        datab = ops.rans_encode_batch(g_syms, g_idxs, *g_tables, lanes=lanes_arg)
        outs = ops.rans_decode_batch(datab, g_idxs, *g_tables)
        assert all(torch.equal(o.cpu(), s) for o, s in zip(outs, syms)), "GPU batch round trip failed"
        t_e = best_of(lambda: ops.rans_encode_batch(g_syms, g_idxs, *g_tables, lanes=lanes_arg), args.reps, sync)
        t_d = best_of(lambda: ops.rans_decode_batch(datab, g_idxs, *g_tables), args.reps, sync)
        rows.append((f"ours GPU, batch of {args.batch}, {label}", nb, t_e, t_d, sum(map(len, datab))))

    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"CPU threads {torch.get_num_threads()}, best of {args.reps} (batch CPU/CompressAI: fewer)\n"
    )
    print("| coder | symbols | encode ms | enc Msym/s | decode ms | dec Msym/s | bytes | size vs CPU default |")
    print("|---|---|---|---|---|---|---|---|")
    for what, n, te, td, size in rows:
        ref = len(cpu_data[0]) if n == n1 else sum(map(len, cpu_data))
        print(
            f"| {what} | {n} | {te * 1e3:.2f} | {n / te / 1e6:.0f} | {td * 1e3:.2f} | {n / td / 1e6:.0f} | "
            f"{size} | {100 * (size / ref - 1):+.2f}% |"
        )
    print()
    for what, n, te, td, _ in rows:
        if what.startswith("ours GPU, batch"):
            print(f"{what}: {cpu_batch[0] / te:.1f}x encode, {cpu_batch[1] / td:.1f}x decode vs our CPU batch loop")


if __name__ == "__main__":
    main()
