"""CUDA ops on a busy side stream and on a second device (skipped without a GPU).

Each test makes the op's inputs asynchronously on a side stream held back by torch.cuda._sleep and
calls the op under ``torch.cuda.stream(side)``: an op that launches on the default stream, or
copies to the host without ordering after the current stream, reads unfinished inputs and gives
wrong results. The second-device tests put every tensor on cuda:1 while cuda:0 is current: an op
without a device guard launches on the wrong GPU.
"""

import math
import os
import sys

import pytest
import torch

from dualres_ext import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rans_testlib import random_symbols, random_tables  # noqa: E402

SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU time ahead of the inputs

pytestmark = pytest.mark.cuda

second_device = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def late(t, side):
    """``t`` copied to the GPU on ``side`` behind a long sleep (the copy lands ~0.1 s later)."""
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        return t.pin_memory().to("cuda", non_blocking=True)


def gaussian_inputs(gen, n=100_000):
    table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
    scales = torch.exp(torch.rand(n, generator=gen) * (math.log(20.0) - math.log(0.11)) + math.log(0.11))
    y = torch.randn(n, generator=gen) * 7
    means = torch.randn(n, generator=gen)
    return y, means, scales, table


def test_rans_side_stream(gen):
    cdfs, lengths, offsets = random_tables(gen, 8, 16)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (3, 70001))
    ref = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        g_tables = [late(t, side) for t in (cdfs, lengths, offsets)]
        data = ops.rans_encode(late(sym, side), late(idx, side), *g_tables)
        out = ops.rans_decode(ref, late(idx, side), *g_tables).cpu()
        batch = ops.rans_encode_batch(
            [late(sym[0], side), late(sym[1], side)], [late(idx[0], side), late(idx[1], side)], *g_tables
        )
        outs = [o.cpu() for o in ops.rans_decode_batch(batch, [late(idx[0], side), late(idx[1], side)], *g_tables)]
    assert data == ref
    assert torch.equal(out, sym)
    assert batch == [ops.rans_encode(sym[k], idx[k], cdfs, lengths, offsets) for k in range(2)]
    assert all(torch.equal(o, sym[k]) for k, o in enumerate(outs))


def test_gaussian_side_stream(gen):
    y, means, scales, table = gaussian_inputs(gen)
    ref_idx = ops.build_indexes(scales, table)
    ref_sym, ref_idx2 = ops.quantize_and_index(y, scales, table, means)
    ref_q = ops.quantize_symbols(y, means)
    ref_lik = ops.gaussian_likelihood(y, scales, means)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        g_table = late(table, side)
        idx = ops.build_indexes(late(scales, side), g_table).cpu()
        sym, idx2 = (
            t.cpu() for t in ops.quantize_and_index(late(y, side), late(scales, side), g_table, late(means, side))
        )
        q = ops.quantize_symbols(late(y, side), late(means, side)).cpu()
        deq = ops.dequantize(late(ref_q, side), late(means, side)).cpu()
        lik = ops.gaussian_likelihood(late(y, side), late(scales, side), late(means, side)).cpu()
    assert torch.equal(idx, ref_idx) and torch.equal(idx2, ref_idx2)
    assert torch.equal(sym, ref_sym) and torch.equal(q, ref_q)
    assert torch.equal(deq, ops.dequantize(ref_q, means))
    assert torch.allclose(lik, ref_lik, rtol=1e-5, atol=1e-7)


def test_gaussian_side_stream_still_raises(gen):
    """The status word is read after the kernel on the current stream: a NaN made late is seen."""
    y, means, scales, table = gaussian_inputs(gen, 10_000)
    scales[1234] = float("nan")
    y[77] = float("nan")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        with pytest.raises(ValueError):
            ops.build_indexes(late(scales, side), late(table, side))
        with pytest.raises(ValueError):
            ops.quantize_symbols(late(y, side))


def test_gdn_side_stream(gen):
    c = 64
    x = torch.randn(2, c, 17, 19, generator=gen)
    beta = 0.2 + torch.rand(c, generator=gen)
    gamma = 0.3 * torch.rand(c, c, generator=gen) / c**0.5
    ref = ops.gdn(x, beta, gamma)
    side = torch.cuda.Stream()
    for fmt in (torch.contiguous_format, torch.channels_last):
        with torch.cuda.stream(side):
            xg = late(x, side).contiguous(memory_format=fmt).requires_grad_()
            y = ops.gdn(xg, late(beta, side), late(gamma, side))
            y.backward(late(torch.ones_like(x), side).contiguous(memory_format=fmt))
            res, gx = y.cpu(), xg.grad.cpu()
        assert torch.allclose(res, ref, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(gx).all()


@second_device
def test_rans_second_device(gen):
    cdfs, lengths, offsets = random_tables(gen, 8, 16)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (70001,))
    ref = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
    dev = torch.device("cuda", 1)
    g_tables = [t.to(dev) for t in (cdfs, lengths, offsets)]
    with torch.cuda.device(0):
        assert ops.rans_encode(sym.to(dev), idx.to(dev), *g_tables) == ref
        out = ops.rans_decode(ref, idx.to(dev), *g_tables)
        assert out.device == dev and torch.equal(out.cpu(), sym)


@second_device
def test_gaussian_and_gdn_second_device(gen):
    y, means, scales, table = gaussian_inputs(gen)
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        idx = ops.build_indexes(scales.to(dev), table.to(dev))
        assert idx.device == dev and torch.equal(idx.cpu(), ops.build_indexes(scales, table))
        sym, idx2 = ops.quantize_and_index(y.to(dev), scales.to(dev), table.to(dev), means.to(dev))
        ref_sym, ref_idx = ops.quantize_and_index(y, scales, table, means)
        assert torch.equal(sym.cpu(), ref_sym) and torch.equal(idx2.cpu(), ref_idx)
        lik = ops.gaussian_likelihood(y.to(dev), scales.to(dev), means.to(dev))
        assert torch.allclose(lik.cpu(), ops.gaussian_likelihood(y, scales, means), rtol=1e-5, atol=1e-7)
        x = torch.randn(1, 16, 9, 9, generator=gen)
        beta, gamma = 0.2 + torch.rand(16, generator=gen), 0.05 * torch.rand(16, 16, generator=gen)
        out = ops.gdn(x.to(dev), beta.to(dev), gamma.to(dev))
        assert out.device == dev and torch.allclose(out.cpu(), ops.gdn(x, beta, gamma), rtol=1e-5, atol=1e-6)
