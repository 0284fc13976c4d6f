"""Interleaved rANS stream (v2) vs torch_ans 0.4.0, our native stream, CompressAI and constriction.

Workloads (one process, same symbols for every coder):
  * "latent": a typical latent, 320 x 48 x 32 = 491,520 symbols on CompressAI's 64 Gaussian
    scale tables (tests/rans_testlib.py gaussian_workload), scales log-uniform in [0.11, 20];
  * "low-rate": 48 x 32 x 48 = 73,728 symbols with small scales (log-uniform in [0.5, 6]): a ~25 KB latent at a low rate.

torch_ans runs in its fastest CPU configuration (rans64, 4 interleaved states, 8 parallel
streams, a 2^8-entry inverse-CDF table per row) with CompressAI's own quantized tables given
through set_cdfs (its init_params overflows on probabilities >= 0.5 at 16 bits), timed on its
stream-tensor core (encode() -> int32 stream tensor, decode(stream) -> symbols; a fresh copy of the
stream per decode, made outside the timing, because decoding consumes it).

Timing: the machine is shared and noisy, so coders are measured interleaved (one run of each in
turn, repeated), best of --repeat, and the ratios (peer time / ours) come from the same process.

    PYTHONPATH=src python benchmarks/bench_rans_interleaved.py [--repeat 25] [--threads 1 2]

--device cuda (a CUDA build and a GPU): the same workloads on the GPU. Ours: the warp kernels
(one warp per group; --groups, the reference is the last value), encode from GPU tensors to the
stream bytes on the host, decode from host bytes to symbols on the GPU, plus the native v1 stream
from GPU tensors. torch_ans: rans32_16 with 32 interleaved states (its warp kernels) and rans64 i4,
--groups parallel streams, tables on the GPU, timed on its stream-tensor core (stream tensor stays
on the GPU: no host transfer is counted for it). Every call is followed by a synchronisation.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from rans_testlib import ideal_bits  # noqa: E402

from dualres_ext import ops  # noqa: E402
from dualres_ext.ops import rans_interleaved as iv  # noqa: E402


def workload(seed, n_ch, h, w, lo, hi):
    """CompressAI's Gaussian tables, or dualres_ext's equal ones where compressai is not installed."""
    g = torch.Generator().manual_seed(seed)
    try:
        from compressai.entropy_models import GaussianConditional
        from compressai.models.google import get_scale_table
    except ImportError:
        table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
        cdfs, lengths, offsets = ops.gaussian_cdf_tables(table)
        scales = torch.exp(torch.rand(1, n_ch, h, w, generator=g) * (math.log(hi) - math.log(lo)) + math.log(lo))
        sym = torch.round(torch.randn(1, n_ch, h, w, generator=g) * scales).int()
        return sym, ops.build_indexes(scales, table), cdfs.int(), lengths.int(), offsets.int(), scales
    gc = GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    scales = torch.exp(torch.rand(1, n_ch, h, w, generator=g) * (math.log(hi) - math.log(lo)) + math.log(lo))
    sym = torch.round(torch.randn(1, n_ch, h, w, generator=g) * scales).int()
    idx = gc.build_indexes(scales).int()
    return sym, idx, gc._quantized_cdf.int(), gc._cdf_length.int(), gc._offset.int(), scales


def make_cuda_coders(sym, idx, cdfs, lengths, offsets, groups_list):
    """The --device cuda coders: name -> (encode, decode, size, check), as make_coders."""
    coders = {}
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    g_sym, g_idx = sym.cuda(), idx.cuda()
    g_tables = [t.cuda() for t in (cdfs, lengths, offsets)]
    for groups in groups_list:
        coders[f"ours v2 GPU W=32 groups={groups}"] = (
            lambda g=groups: iv.encode(g_sym, g_idx, tables=tb, groups=g),
            lambda d: iv.decode(d, g_idx, tables=tb),
            len,
            lambda o: torch.equal(o, g_sym),
        )
    coders["ours native v1 GPU (ops.rans_encode)"] = (
        lambda: ops.rans_encode(g_sym, g_idx, *g_tables),
        lambda d: ops.rans_decode(d, g_idx, *g_tables),
        len,
        lambda o: torch.equal(o, g_sym),
    )
    try:
        from torch_ans.utils import TorchANSInterface
    except ImportError:
        print("torch_ans not installed: skipped")
        return coders
    flat, i_flat = g_sym.reshape(-1), g_idx.reshape(-1)
    for impl, inter, inv in (("rans32_16", 32, None), ("rans32_16", 32, "auto"), ("rans64", 4, None)):
        for groups in groups_list:
            name = f"torch_ans GPU {impl} i{inter} x{groups} invcdf={inv} (stream tensor)"
            try:
                ta = TorchANSInterface(
                    impl=impl,
                    num_interleaves=inter,
                    num_parallel_states=groups,
                    inverse_cdf_precision=inv,
                    bypass_coding=True,
                    freq_precision=16,
                    device="cuda",
                )
                ta.set_cdfs(*(t.cuda() for t in (cdfs, lengths, offsets)))
                back = ta.decode(ta.encode(flat, dist_indexes=i_flat), dist_indexes=i_flat)
            except Exception as e:  # a configuration this torch_ans build or GPU does not run
                print(f"{name}: skipped ({type(e).__name__}: {str(e)[:120]})")
                continue
            if not torch.equal(back.reshape(-1).to(flat), flat):
                # torch_ans 0.4.0's rans32_16 does not round-trip CompressAI's 16-bit tables on the CPU.
                print(f"{name}: skipped (its decode does not return the symbols on these tables)")
                continue
            coders[name] = (
                lambda ta=ta: ta.encode(flat, dist_indexes=i_flat),
                lambda stream, ta=ta: ta.decode(stream.clone(), dist_indexes=i_flat),
                lambda stream, ta=ta: len(ta.encode_with_indexes(flat, i_flat)),  # serialised bytes
                lambda o: torch.equal(o.reshape(-1).to(flat), flat),
            )
    return coders


def make_coders(sym, idx, cdfs, lengths, offsets, scales, threads):
    """name -> (encode() -> payload, decode(payload) -> tensor/array, size(payload), check(out))."""
    coders = {}
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    flat = sym.reshape(-1)
    for groups in sorted({1, threads}):
        coders[f"ours v2 W=32 groups={groups}"] = (
            lambda g=groups: iv.encode(sym, idx, tables=tb, groups=g),
            lambda d: iv.decode(d, idx, tables=tb),
            len,
            lambda o: torch.equal(o, sym),
        )
    coders["ours v2 W=16 groups=%d" % threads] = (
        lambda: iv.encode(sym, idx, tables=tb, width=16, groups=threads),
        lambda d: iv.decode(d, idx, tables=tb),
        len,
        lambda o: torch.equal(o, sym),
    )
    coders["ours native v1 (ops.rans_encode)"] = (
        lambda: ops.rans_encode(sym, idx, cdfs, lengths, offsets),
        lambda d: ops.rans_decode(d, idx, cdfs, lengths, offsets),
        len,
        lambda o: torch.equal(o, sym),
    )
    try:
        from torch_ans.utils import TorchANSInterface, build_cdf_with_inverse_table

        i_flat = idx.reshape(-1)
        # Two configurations: the inverse-CDF table (2^8 entries a row; its fastest CPU decoder on
        # its own tables) and the default search, which decodes CompressAI's zero-padded rows faster.
        for label, inv in (("invcdf8", 8), ("search", None)):
            ta = TorchANSInterface(
                impl="rans64",
                num_interleaves=4,
                num_parallel_states=8,
                inverse_cdf_precision=inv,
                bypass_coding=True,
                freq_precision=16,
            )
            ta.set_cdfs(build_cdf_with_inverse_table(cdfs, 16, 8, native=ta._native) if inv else cdfs, lengths, offsets)

            def ta_nbytes(stream, ta=ta):
                return len(ta.encode_with_indexes(flat, i_flat))

            coders[f"torch_ans rans64 i4 x8 {label} (stream tensor)"] = (
                lambda ta=ta: ta.encode(flat, dist_indexes=i_flat),
                lambda stream, ta=ta: ta.decode(stream.clone(), dist_indexes=i_flat),
                ta_nbytes,
                lambda o: torch.equal(o, flat),
            )
    except ImportError:
        print("torch_ans not installed: skipped")
    try:
        from compressai.ans import RansDecoder, RansEncoder

        lists = (flat.tolist(), idx.reshape(-1).tolist(), cdfs.tolist(), lengths.tolist(), offsets.tolist())
        coders["CompressAI 1.2.8 (lists given)"] = (
            lambda: RansEncoder().encode_with_indexes(*lists),
            lambda d: RansDecoder().decode_with_indexes(d, *lists[1:]),
            len,
            lambda o: o == lists[0],
        )
    except ImportError:
        pass
    try:
        import constriction
        import numpy as np

        s_np = flat.numpy().astype(np.int32)
        std = scales.reshape(-1).double().numpy()
        mean = np.zeros_like(std)
        bound = int(np.abs(s_np).max()) + 1
        model = constriction.stream.model.QuantizedGaussian(-bound, bound)

        def c_enc():
            c = constriction.stream.stack.AnsCoder()
            c.encode_reverse(s_np, model, mean, std)
            return c.get_compressed()

        coders["constriction AnsCoder (exact Gaussian)"] = (
            c_enc,
            lambda d: constriction.stream.stack.AnsCoder(d).decode(model, mean, std),
            lambda d: d.nbytes,
            lambda o: np.array_equal(o, s_np),
        )
    except ImportError:
        pass
    return coders


def measure(coders, repeat, sync=lambda: None):
    payload = {name: c[0]() for name, c in coders.items()}
    for name, c in coders.items():
        assert c[3](c[1](payload[name])), f"{name}: round trip failed"
    enc = {name: float("inf") for name in coders}
    dec = dict(enc)
    for _ in range(repeat):  # interleaved: every coder once per round
        for name, c in coders.items():
            sync()
            t0 = time.perf_counter()
            c[0]()
            sync()
            enc[name] = min(enc[name], time.perf_counter() - t0)
            p = payload[name]
            t0 = time.perf_counter()
            c[1](p)
            sync()
            dec[name] = min(dec[name], time.perf_counter() - t0)
    return enc, dec, {name: coders[name][2](payload[name]) for name in coders}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-slow", action="store_true", help="skip CompressAI and constriction")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--groups",
        type=int,
        nargs="+",
        default=[64, 256],
        help="--device cuda: groups (ours) and parallel streams (torch_ans) to measure",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return main_cuda(args)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {os.cpu_count()} cores, "
        f"isa {iv.isa()}; best of {args.repeat}, coders interleaved"
    )
    loads = {"latent 320x48x32": (0, 320, 48, 32, 0.11, 20.0), "low-rate 48x32x48": (1, 48, 32, 48, 0.5, 6.0)}
    for wname, spec in loads.items():
        sym, idx, cdfs, lengths, offsets, scales = workload(*spec)
        n = sym.numel()
        ideal = ideal_bits(sym, idx, cdfs, lengths, offsets) / 8
        for threads in args.threads:
            torch.set_num_threads(threads)
            coders = make_coders(sym, idx, cdfs, lengths, offsets, scales, threads)
            if args.no_slow:
                coders = {k: v for k, v in coders.items() if not k.startswith(("CompressAI", "constriction"))}
            enc, dec, size = measure(coders, args.repeat)
            print(f"\n### {wname}: {n} symbols, ideal {ideal:.0f} bytes, {threads} thread(s)\n")
            print("| coder | encode ms | Msym/s | decode ms | Msym/s | bytes | vs ideal |")
            print("|---|---|---|---|---|---|---|")
            for name in coders:
                print(
                    f"| {name} | {enc[name] * 1e3:.3f} | {n / enc[name] / 1e6:.0f} | {dec[name] * 1e3:.3f} | "
                    f"{n / dec[name] / 1e6:.0f} | {size[name]} | {100 * (size[name] / ideal - 1):+.3f}% |"
                )
            ours = f"ours v2 W=32 groups={threads}"
            print(f"\nratios, peer time / {ours} time (>1: ours faster):\n")
            print("| peer | encode | decode |")
            print("|---|---|---|")
            for name in coders:
                if name != ours:
                    print(f"| {name} | {enc[name] / enc[ours]:.2f}x | {dec[name] / dec[ours]:.2f}x |")
            ta = [k for k in coders if k.startswith("torch_ans")]
            if ta:
                print(
                    f"| torch_ans, fastest of its configurations | {min(enc[k] for k in ta) / enc[ours]:.2f}x | "
                    f"{min(dec[k] for k in ta) / dec[ours]:.2f}x |"
                )


def main_cuda(args):
    import dualres_ext

    if not dualres_ext.build_info()["cuda"] or not torch.cuda.is_available():
        sys.exit("bench_rans_interleaved --device cuda: needs a CUDA build of dualres_ext and a visible GPU")
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; best of {args.repeat}, coders interleaved, "
        "every call synchronised"
    )
    loads = {"latent 320x48x32": (0, 320, 48, 32, 0.11, 20.0), "low-rate 48x32x48": (1, 48, 32, 48, 0.5, 6.0)}
    for wname, spec in loads.items():
        sym, idx, cdfs, lengths, offsets, _ = workload(*spec)
        n = sym.numel()
        coders = make_cuda_coders(sym, idx, cdfs, lengths, offsets, args.groups)
        enc, dec, size = measure(coders, args.repeat, torch.cuda.synchronize)
        ours = f"ours v2 GPU W=32 groups={args.groups[-1]}"
        print(f"\n### GPU {wname}: {n} symbols\n")
        print("| coder | encode ms | Msym/s | decode ms | Msym/s | bytes | enc: peer/ours | dec: peer/ours |")
        print("|---|---|---|---|---|---|---|---|")
        for name in coders:
            print(
                f"| {name} | {enc[name] * 1e3:.3f} | {n / enc[name] / 1e6:.0f} | {dec[name] * 1e3:.3f} | "
                f"{n / dec[name] / 1e6:.0f} | {size[name]} | {enc[name] / enc[ours]:.2f}x | "
                f"{dec[name] / dec[ours]:.2f}x |"
            )


if __name__ == "__main__":
    main()
