"""Every CUDA op of dualres_ext once, on small inputs, checked against the CPU: the workload that
benchmarks/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck). Exits non-zero on a
mismatch; prints one line per op.

    PYTHONPATH=src python benchmarks/gpu_smoke.py
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from rans_testlib import random_symbols, random_tables  # noqa: E402

import dualres_ext  # noqa: E402
from dualres_ext import ops  # noqa: E402
from dualres_ext.ops import rans_interleaved as iv  # noqa: E402


def check(name, ok):
    print(f"{name}: {'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        check.failed = True


check.failed = False


def main():
    if not dualres_ext.build_info()["cuda"] or not torch.cuda.is_available():
        sys.exit("gpu_smoke: needs a CUDA build of dualres_ext and a visible GPU")
    gen = torch.Generator().manual_seed(3)
    dev = torch.device("cuda")

    # rANS v1 (native stream): single and batch, several lane counts.
    cdfs, lengths, offsets = random_tables(gen, 6, 16)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (4099,))
    g_tables = [t.to(dev) for t in (cdfs, lengths, offsets)]
    for lanes in (None, 1, 64):
        ref = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=lanes)
        data = ops.rans_encode(sym.to(dev), idx.to(dev), *g_tables, lanes=lanes)
        out = ops.rans_decode(ref, idx.to(dev), *g_tables)
        check(f"rans v1 lanes={lanes}", data == ref and torch.equal(out.cpu(), sym))
    batch = ops.rans_encode_batch([sym.to(dev), sym[:1000].to(dev)], [idx.to(dev), idx[:1000].to(dev)], *g_tables)
    outs = ops.rans_decode_batch(batch, [idx.to(dev), idx[:1000].to(dev)], *g_tables)
    check("rans v1 batch", torch.equal(outs[0].cpu(), sym) and torch.equal(outs[1].cpu(), sym[:1000]))

    # Interleaved v2: widths, groups, split points.
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    for width, groups, chained in ((32, 1, False), (16, 5, False), (32, 7, True), (8, 3, False), (1, 2, True)):
        ref = iv.encode(sym, idx, tables=tb, width=width, groups=groups, chained=chained)
        data = iv.encode(sym.to(dev), idx.to(dev), tables=tb, width=width, groups=groups, chained=chained)
        out = iv.decode(ref, idx.to(dev), tables=tb)
        deferred, status = iv.decode_deferred(ref, idx.to(dev), tables=tb)
        iv.check_statuses([status])
        check(
            f"rans v2 W={width} groups={groups} chained={chained}",
            data == ref and torch.equal(out.cpu(), sym) and torch.equal(deferred.cpu(), sym),
        )
    bad = bytearray(iv.encode(sym, idx, tables=tb, width=16, groups=4))
    bad[-7] ^= 0x5A  # payload damage; the CRC is not re-sealed, so the host check refuses it
    try:
        iv.decode_deferred(bytes(bad), idx.to(dev), tables=tb)
        check("rans v2 deferred refuses a damaged stream", False)
    except ValueError:
        check("rans v2 deferred refuses a damaged stream", True)

    # Gaussian ops.
    table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
    n = 5000
    scales = torch.exp(torch.rand(n, generator=gen) * 5 - 2)
    y, means = torch.randn(n, generator=gen) * 5, torch.randn(n, generator=gen)
    gs, gy, gm, gt = (t.to(dev) for t in (scales, y, means, table))
    check("build_indexes", torch.equal(ops.build_indexes(gs, gt).cpu(), ops.build_indexes(scales, table)))
    check("quantize_symbols", torch.equal(ops.quantize_symbols(gy, gm).cpu(), ops.quantize_symbols(y, means)))
    a, b = ops.quantize_and_index(gy, gs, gt, gm)
    ra, rb = ops.quantize_and_index(y, scales, table, means)
    check("quantize_and_index", torch.equal(a.cpu(), ra) and torch.equal(b.cpu(), rb))
    check("dequantize", torch.equal(ops.dequantize(a, gm).cpu(), ops.dequantize(ra, means)))
    ys, ss = gy.clone().requires_grad_(), gs.clone().requires_grad_()
    lik = ops.gaussian_likelihood(ys, ss, gm)
    lik.sum().backward()
    yc, sc = y.clone().requires_grad_(), scales.clone().requires_grad_()
    likc = ops.gaussian_likelihood(yc, sc, means)
    likc.sum().backward()
    check(
        "gaussian_likelihood fwd/bwd",
        torch.allclose(lik.cpu(), likc, rtol=1e-4, atol=1e-6)
        and torch.allclose(ys.grad.cpu(), yc.grad, rtol=1e-3, atol=1e-5),
    )

    # GDN forward / backward, both layouts, and the empty-channel case.
    for c, fmt in ((8, torch.contiguous_format), (24, torch.channels_last), (0, torch.contiguous_format)):
        x = torch.randn(2, c, 5, 7, generator=gen)
        beta, gamma = 0.2 + torch.rand(c, generator=gen), 0.1 * torch.rand(c, c, generator=gen)
        xg = x.to(dev).contiguous(memory_format=fmt).requires_grad_()
        yg = ops.gdn(xg, beta.to(dev), gamma.to(dev))
        yg.sum().backward()
        xc = x.clone().requires_grad_()
        yc = ops.gdn(xc, beta, gamma)
        yc.sum().backward()
        check(
            f"gdn C={c} {'nhwc' if fmt is torch.channels_last else 'nchw'} fwd/bwd",
            torch.allclose(yg.cpu(), yc, rtol=1e-5, atol=1e-6)
            and torch.allclose(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-5),
        )
    torch.cuda.synchronize()
    if check.failed:
        sys.exit(1)
    print("gpu_smoke: all ops ok")


if __name__ == "__main__":
    main()
