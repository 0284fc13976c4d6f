"""CPU kernel sets chosen at run time (csrc/common/cpu_kernels.h): every set this CPU supports
gives bit-identical results to the default one, and the same results as the references.

A set is forced with the op set_cpu_kernels (in process) or DUALRES_CPU_KERNELS (read by the first
kernel call of a process, checked here in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dualres_ext
from dualres_ext import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_testlib import SUPPORTED, cpu_kernels  # noqa: E402

ALL_SETS = ["scalar", "avx2", "avx512"]


def each_set(fn):
    """fn() under the default set and under every supported one: {"default": ..., name: ...}."""
    out = {"default": fn()}
    for name in SUPPORTED:
        with cpu_kernels(name):
            assert dualres_ext.build_info()["cpu_kernels"] == name
            out[name] = fn()
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bitwise (NaN payloads, signed zeros included)."""
    t = t.detach().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else (t.view(torch.int64) if t.dtype == torch.float64 else t)


def assert_all_identical(results):
    ref = results["default"]
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for name, got in results.items():
        got = got if isinstance(got, (tuple, list)) else (got,)
        for i, (a, b) in enumerate(zip(ref, got)):
            assert torch.equal(bits(a), bits(b)), f"kernel set {name}: output {i} differs from the default set's"


def _log_uniform(shape, lo, hi, gen, dtype=torch.float32):
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.exp(torch.log(torch.tensor(lo)) + u * (torch.log(torch.tensor(hi)) - torch.log(torch.tensor(lo)))).to(
        dtype
    )


def _scale_table():
    # CompressAI's default table (compressai.models.google.get_scale_table): 64 entries.
    return torch.exp(torch.linspace(torch.log(torch.tensor(0.11)), torch.log(torch.tensor(256.0)), 64))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def test_default_is_the_best_supported_set():
    info = dualres_ext.build_info()
    assert SUPPORTED[0] == "scalar" and set(SUPPORTED) <= set(ALL_SETS)
    if not os.environ.get("DUALRES_CPU_KERNELS"):
        assert info["cpu_kernels"] == SUPPORTED[-1]
    assert isinstance(info["native"], bool) and info["compiler"]


def test_unknown_or_unsupported_sets_raise():
    with pytest.raises(ValueError, match="unknown CPU kernel set"):
        torch.ops.dualres_ext.set_cpu_kernels("avx1024")
    for name in ALL_SETS:
        if name not in SUPPORTED:
            with pytest.raises(ValueError, match="cannot run"):
                torch.ops.dualres_ext.set_cpu_kernels(name)
    assert dualres_ext.build_info()["cpu_kernels"] in SUPPORTED


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_indexes_and_quantisation(gen, dtype):
    n = 16 * 4099 + 13  # vector blocks, several parallel chunks and a tail
    table = _scale_table()
    scales = _log_uniform((n,), 0.05, 400.0, gen, dtype)
    scales[5::101] = float("inf")
    scales[7::103] = -1.0
    nan_scales = scales.clone()
    nan_scales[::97] = float("nan")  # the op itself can be told not to raise (check=0)
    y = torch.randn(n, generator=gen, dtype=dtype) * 30
    means = torch.randn(n, generator=gen, dtype=dtype) * 5
    unsorted = table[torch.randperm(64, generator=gen)]
    res = each_set(
        lambda: (
            ops.build_indexes(scales, table, strict=False),
            ops.build_indexes(scales, unsorted, strict=False),
            torch.ops.dualres_ext.gaussian_build_indexes(nan_scales, table.to(dtype), 0.11, 0),
            ops.quantize_symbols(y, means),
            ops.quantize_symbols(y),
            *ops.quantize_and_index(y, scales, table, means, strict=False),
            ops.dequantize(ops.quantize_symbols(y), means, dtype),
        )
    )
    assert_all_identical(res)
    # Against the plain PyTorch expressions (CompressAI's).
    idx, _, idx_nan, q, _, _, _, deq = res["default"]
    s = torch.maximum(nan_scales, torch.tensor(0.11, dtype=dtype))
    expected = (~(s.unsqueeze(1) <= table[:-1].to(dtype))).sum(1).int()  # NaN: every entry
    assert torch.equal(idx_nan, expected)
    if dtype == torch.float32:  # ops.build_indexes prepares the table in the scales' dtype from float32
        nan = torch.isnan(nan_scales)
        assert torch.equal(idx[~nan], expected[~nan])
    assert torch.equal(q, torch.round(y - means).int())
    assert torch.equal(deq, torch.round(y).int().to(dtype) + means)


def test_gaussian_errors_in_every_set(gen):
    y = torch.randn(1000, generator=gen)
    y[777] = float("nan")
    for name in SUPPORTED:
        with cpu_kernels(name), pytest.raises(ValueError):
            ops.quantize_symbols(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_likelihood_and_backward(gen, dtype):
    n = 4096 * 3 + 29
    x = (torch.randn(n, generator=gen, dtype=dtype) * 10).requires_grad_()
    means = torch.randn(n, generator=gen, dtype=dtype)
    scales = _log_uniform((n,), 0.05, 50.0, gen, dtype).requires_grad_()
    grad = torch.randn(n, generator=gen, dtype=dtype)

    def run():
        lik = ops.gaussian_likelihood(x, scales, means)
        gx, gs = torch.autograd.grad(lik, (x, scales), grad)
        return lik.detach(), gx, gs

    res = each_set(run)
    assert_all_identical(res)
    # float64 reference (CompressAI's expression).
    x64, m64, s64 = x.detach().double(), means.double(), torch.clamp(scales.detach().double(), min=0.11)
    v = (x64 - m64).abs()

    def cdf(t):
        return 0.5 * torch.special.erfc(-(2**-0.5) * t)

    ref = torch.clamp(cdf((0.5 - v) / s64) - cdf((-0.5 - v) / s64), min=1e-9)
    lik = res["default"][0].double()
    assert torch.allclose(
        lik, ref, rtol=1e-4 if dtype == torch.float32 else 1e-6, atol=1e-7 if dtype == torch.float32 else 1e-12
    )


@pytest.mark.parametrize("inverse,simplified", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gdn_forward_backward(gen, inverse, simplified, channels_last):
    c = 19  # spans of 19 channels (NHWC) or pixel rows with tails (NCHW)
    x = torch.randn(2, c, 13, 29, generator=gen)
    if simplified:
        x = x.abs() + 0.1
    beta = torch.rand(c, generator=gen) + 0.5
    gamma = torch.rand(c, c, generator=gen) * 0.1
    bias = torch.randn(c, generator=gen) * 0.1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=gen)
    g = g.contiguous(memory_format=torch.channels_last) if channels_last else g
    dr = torch.ops.dualres_ext

    def run():
        y = dr.gdn_forward(x, beta, gamma, bias, inverse, simplified)
        y2, s = dr.gdn_forward_save(x, beta, gamma, bias, inverse, simplified)
        y3 = x.clone()
        dr.gdn_forward_(y3, beta, gamma, bias, inverse, simplified)
        b1 = dr.gdn_backward(g, x, beta, gamma, bias, None, inverse, simplified)
        b2 = dr.gdn_backward(g, x, beta, gamma, bias, s, inverse, simplified)
        return (y, y2, s, y3, *b1, *b2)

    res = each_set(run)
    assert_all_identical(res)
    y = res["default"][0]
    ref = ops.gdn_reference(x.double(), beta.double(), gamma.double(), bias.double(), inverse, simplified)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)


def _crc(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_rans_streams_and_crc(gen):
    table = _scale_table()
    cdfs, lengths, offsets = ops.gaussian_cdf_tables(table)
    n = 50000 + int(torch.randint(0, 1000, (1,), generator=gen))
    scales = _log_uniform((n,), 0.11, 30.0, gen)
    sym, idx = ops.quantize_and_index(torch.randn(n, generator=gen) * scales, scales, table)
    res = each_set(lambda: ops.rans_encode(sym, idx, cdfs, lengths, offsets))
    streams = set(res.values())
    assert len(streams) == 1
    data = streams.pop()
    for name in SUPPORTED:
        with cpu_kernels(name):
            assert ops.rans_decode(data, idx, cdfs, lengths, offsets).equal(sym)
    # The stored CRC-32C (bytes 5..8, over the body from byte 9; SSE4.2 where the CPU has it)
    # against a bitwise reference.
    assert _crc(b"123456789") == 0xE3069283
    assert int.from_bytes(data[5:9], "little") == _crc(data[9:])


@pytest.mark.parametrize("name", ALL_SETS + ["bogus"])
def test_environment_variable(name, package_env):
    code = (
        "import torch, dualres_ext\n"
        "from dualres_ext import ops\n"
        "print(ops.quantize_symbols(torch.arange(40.0) / 3).sum().item(), dualres_ext.build_info()['cpu_kernels'])\n"
    )
    env = dict(package_env, DUALRES_CPU_KERNELS=name)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if name in SUPPORTED:
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[-2:] == [str(int(torch.round(torch.arange(40.0) / 3).sum())), name]
    else:
        assert r.returncode != 0
        assert "DUALRES_CPU_KERNELS" in r.stderr and ("unknown CPU kernel set" in r.stderr or "cannot run" in r.stderr)
