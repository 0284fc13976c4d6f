"""Gaussian conditional kernels against CompressAI 1.2.8 and float64 references."""

import threading

import pytest
import torch

import dualres_ext
from dualres_ext import ops

compressai_em = pytest.importorskip("compressai.entropy_models")
from compressai.models.google import get_scale_table  # noqa: E402


def _log_uniform(shape, lo=0.11, hi=20.0, dtype=torch.float32, generator=None):
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.exp(u * (torch.log(torch.tensor(hi)) - torch.log(torch.tensor(lo))) + torch.log(torch.tensor(lo))).to(
        dtype
    )


@pytest.fixture(scope="module")
def reference_gc():
    gc = compressai_em.GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    return gc


# -- build_indexes --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 320, 48, 32), (3, 7, 5), (17,), (2, 1)])
def test_build_indexes_matches_compressai(reference_gc, shape):
    scales = _log_uniform(shape, 0.01, 400.0)
    table = reference_gc.scale_table
    flat = scales.view(-1)
    # Exact ties with every table value, values just around them, and the bound itself.
    k = min(flat.numel(), table.numel())
    flat[:k] = table[:k]
    if flat.numel() > 2 * k:
        flat[k : 2 * k] = torch.nextafter(table[:k], torch.tensor(0.0))
    flat[-1] = 0.11
    expected = reference_gc.build_indexes(scales)
    got = ops.build_indexes(scales, table, reference_gc.lower_bound_scale.bound)
    assert got.dtype == torch.int32 and got.shape == scales.shape
    assert torch.equal(got, expected)


def test_build_indexes_float64_and_half(reference_gc):
    table = reference_gc.scale_table
    s64 = _log_uniform((4, 8, 9), 0.05, 300.0, dtype=torch.float64)
    s64.view(-1)[:64] = table.double()
    assert torch.equal(
        ops.build_indexes(s64, table, reference_gc.lower_bound_scale.bound), reference_gc.build_indexes(s64)
    )
    s16 = _log_uniform((4, 8, 9), 0.05, 300.0).half()
    assert torch.equal(
        ops.build_indexes(s16, table, reference_gc.lower_bound_scale.bound), reference_gc.build_indexes(s16)
    )


def test_build_indexes_unsorted_and_custom_tables():
    scales = _log_uniform((1000,), 0.01, 50.0)
    for table in (torch.tensor([0.5, 3.0, 1.0, 20.0, 2.0]), torch.tensor([7.0]), torch.linspace(0.2, 40, 200)):
        expected = torch.full(scales.shape, table.numel() - 1, dtype=torch.int32)
        bounded = torch.max(scales, torch.tensor([0.11]))
        for s in table[:-1]:
            expected -= (bounded <= s).int()
        assert torch.equal(ops.build_indexes(scales, table, 0.11), expected)


def test_build_indexes_bad_scales_raise(reference_gc):
    table = reference_gc.scale_table
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (-1.0, "negative")):
        s = _log_uniform((3, 40))
        s[1, 17] = bad
        with pytest.raises(ValueError, match=word):
            ops.build_indexes(s, table)
    # Non-strict mode clamps negative / infinite scales exactly like CompressAI, NaN still raises.
    s = _log_uniform((3, 40))
    s[0, 3], s[2, 5] = -4.0, float("inf")
    assert torch.equal(ops.build_indexes(s, table, strict=False), reference_gc.build_indexes(s))
    s[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.build_indexes(s, table, strict=False)
    with pytest.raises(TypeError, match="scales"):
        ops.build_indexes(torch.ones(3, dtype=torch.int32), table)
    with pytest.raises(ValueError, match="scale_table"):
        ops.build_indexes(torch.ones(3), torch.ones(2, 2))


# -- quantisation ---------------------------------------------------------------------------


def _halfway_inputs(shape):
    y = torch.randn(shape) * 30
    means = torch.randn(shape) * 3
    # Exact .5 differences: round half to even must match torch.round.
    y.view(-1)[:200] = means.view(-1)[:200] + (torch.arange(200) - 100).float() + 0.5
    return y, means


@pytest.mark.parametrize("shape", [(1, 320, 48, 32), (2, 3, 5, 7)])
def test_quantize_symbols_matches_compressai(reference_gc, shape):
    y, means = _halfway_inputs(shape)
    assert torch.equal(ops.quantize_symbols(y, means), reference_gc.quantize(y, "symbols", means))
    assert torch.equal(ops.quantize_symbols(y), reference_gc.quantize(y, "symbols"))
    # Broadcast means (as EntropyBottleneck uses them) and mixed dtypes.
    m = torch.randn(1, shape[1], *([1] * (len(shape) - 2)))
    assert torch.equal(ops.quantize_symbols(y, m), reference_gc.quantize(y, "symbols", m))
    assert torch.equal(ops.quantize_symbols(y, means.double()), reference_gc.quantize(y, "symbols", means.double()))
    assert torch.equal(
        ops.quantize_symbols(y.double(), means.double()), reference_gc.quantize(y.double(), "symbols", means.double())
    )


def test_quantize_and_index_fused(reference_gc):
    y, means = _halfway_inputs((2, 64, 9, 11))
    scales = _log_uniform(y.shape)
    symbols, indexes = ops.quantize_and_index(y, scales, reference_gc.scale_table, means)
    assert torch.equal(symbols, reference_gc.quantize(y, "symbols", means))
    assert torch.equal(indexes, reference_gc.build_indexes(scales))
    symbols, indexes = ops.quantize_and_index(y.double(), scales, reference_gc.scale_table)
    assert torch.equal(symbols, reference_gc.quantize(y.double(), "symbols"))
    assert torch.equal(indexes, reference_gc.build_indexes(scales))


def test_scale_table_object_equals_the_functions(reference_gc):
    """ops.ScaleTable validates a table once and indexes like build_indexes / quantize_and_index."""
    table = ops.ScaleTable(reference_gc.scale_table, reference_gc.lower_bound_scale.bound)
    y, means = _halfway_inputs((1, 16, 5, 7))
    scales = _log_uniform(y.shape)
    assert torch.equal(table.build_indexes(scales), reference_gc.build_indexes(scales))
    assert torch.equal(table.build_indexes(scales.double()), reference_gc.build_indexes(scales.double()))
    symbols, indexes = table.quantize_and_index(y, scales, means)
    assert torch.equal(symbols, reference_gc.quantize(y, "symbols", means))
    assert torch.equal(indexes, reference_gc.build_indexes(scales))
    with pytest.raises(ValueError, match="scale_table"):
        ops.ScaleTable(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="scale_bound"):
        ops.ScaleTable(torch.tensor([0.5, 1.0]), float("nan"))
    with pytest.raises(TypeError, match="scales"):
        table.build_indexes([1.0])


def test_quantize_bad_values_raise(reference_gc):
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (3e9, "int32")):
        y = torch.randn(4, 50)
        y[2, 33] = bad
        with pytest.raises(ValueError, match=word):
            ops.quantize_symbols(y)
        with pytest.raises(ValueError, match=word):
            ops.quantize_and_index(y, _log_uniform(y.shape), reference_gc.scale_table)
    with pytest.raises(ValueError, match="broadcast"):
        ops.quantize_symbols(torch.randn(4, 5), torch.randn(3))
    with pytest.raises(TypeError, match="y"):
        ops.quantize_symbols(torch.ones(4, dtype=torch.int64))


def test_dequantize_matches_compressai():
    symbols = torch.randint(-300, 300, (2, 8, 6, 5), dtype=torch.int32)
    means = torch.randn(2, 8, 6, 5)
    ref = compressai_em.EntropyModel.dequantize
    assert torch.equal(ops.dequantize(symbols, means), ref(symbols, means))
    m1 = torch.randn(2, 8, 1, 1, dtype=torch.float64)
    assert torch.equal(ops.dequantize(symbols, m1), ref(symbols, m1))
    assert torch.equal(ops.dequantize(symbols, dtype=torch.float64), ref(symbols, None, torch.float64))


# -- CDF tables -----------------------------------------------------------------------------


def test_gaussian_cdf_tables_match_compressai(reference_gc):
    cdf, lengths, offsets = ops.gaussian_cdf_tables(reference_gc.scale_table)
    assert torch.equal(cdf, reference_gc._quantized_cdf)
    assert torch.equal(lengths, reference_gc._cdf_length)
    assert torch.equal(offsets, reference_gc._offset)


@pytest.mark.parametrize("tail_mass,precision", [(1e-6, 16), (1e-9, 14), (1e-3, 12)])
def test_gaussian_cdf_tables_random_tables(tail_mass, precision):
    table = torch.sort(_log_uniform((23,), 0.05, 30.0)).values.tolist()
    gc = compressai_em.GaussianConditional(table, tail_mass=tail_mass, entropy_coder_precision=precision)
    gc.update()
    cdf, lengths, offsets = ops.gaussian_cdf_tables(gc.scale_table, tail_mass, precision)
    assert torch.equal(cdf, gc._quantized_cdf)
    assert torch.equal(lengths, gc._cdf_length) and torch.equal(offsets, gc._offset)


def test_pmf_to_quantized_cdf_matches_compressai():
    from compressai._CXX import pmf_to_quantized_cdf as reference

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    rows, lengths = [], []
    for _ in range(40):
        n = int(torch.randint(2, 300, (1,), generator=gen))
        p = torch.rand(n, generator=gen) ** 6  # many tiny probabilities: exercises the stealing
        p[torch.rand(n, generator=gen) < 0.2] = 0.0
        p[0] += 1e-3
        rows.append(p / p.sum())
        lengths.append(n)
    pmf = torch.zeros(len(rows), max(lengths))
    for i, p in enumerate(rows):
        pmf[i, : p.numel()] = p
    for precision in (16, 12):
        got = ops.pmf_to_quantized_cdf(pmf, torch.tensor(lengths), precision)
        for i, p in enumerate(rows):
            expected = torch.tensor(reference(p.tolist(), precision), dtype=torch.int32)
            assert torch.equal(got[i, : lengths[i] + 1], expected)
            assert not got[i, lengths[i] + 1 :].any()
    with pytest.raises(ValueError, match="finite"):
        ops.pmf_to_quantized_cdf(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="precision"):
        ops.pmf_to_quantized_cdf(torch.tensor([0.5, 0.5]), precision=0)


def test_standardized_quantile_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    from dualres_ext.entropy_models import GaussianConditional

    for q in (5e-10, 1e-6 / 2, 0.01, 0.3):
        assert GaussianConditional._standardized_quantile(q) == scipy_stats.norm.ppf(q)


# -- likelihood -----------------------------------------------------------------------------


def _reference_likelihood(x, scales, means, scale_bound=0.11, likelihood_bound=1e-9):
    """CompressAI's _likelihood + LowerBound, composed from its own modules (float64 inputs)."""
    from compressai.ops import LowerBound

    v = torch.abs(x - means) if means is not None else torch.abs(x)
    s = LowerBound(scale_bound).double()(scales)
    cum = lambda t: 0.5 * torch.erfc(-(2**-0.5) * t)  # noqa: E731
    lik = cum((0.5 - v) / s) - cum((-0.5 - v) / s)
    return LowerBound(likelihood_bound).double()(lik) if likelihood_bound is not None else lik


def _likelihood_inputs(shape, dtype):
    x = (torch.randn(shape, dtype=torch.float64) * 6).round()  # integer bins, like dequantised y
    x += torch.rand(shape, dtype=torch.float64) - 0.5  # and noisy ones
    means = torch.randn(shape, dtype=torch.float64) * 2
    scales = _log_uniform(shape, 0.02, 30.0, dtype=torch.float64)
    scales.view(-1)[:10] = 0.11  # exactly at the scale bound
    x.view(-1)[10:20] = means.view(-1)[10:20] + 60.0  # likelihood at its lower bound
    return [t.to(dtype).requires_grad_() for t in (x, scales, means)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_likelihood_forward_backward_vs_float64(dtype, tol):
    x, scales, means = _likelihood_inputs((2, 16, 12, 9), dtype)
    got = ops.gaussian_likelihood(x, scales, means)
    x64, s64, m64 = (t.detach().double().requires_grad_() for t in (x, scales, means))
    ref = _reference_likelihood(x64, s64, m64)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, rtol=tol * 10, atol=tol)
    # Mixed-sign upstream gradients exercise both LowerBound rules.
    grad = torch.randn_like(ref)
    got_grads = torch.autograd.grad(got, (x, scales, means), grad.to(dtype))
    ref_grads = torch.autograd.grad(ref, (x64, s64, m64), grad)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=tol * 100, atol=tol * 10)
    # The bound rules really did cut gradients somewhere (the test would be vacuous otherwise).
    assert (ref_grads[1] == 0).any() and (ref_grads[0] == 0).any()


def test_likelihood_broadcast_and_no_means():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    scales = _log_uniform((1, 4, 1, 1), 0.05, 5.0, dtype=torch.float64).requires_grad_()
    got = ops.gaussian_likelihood(x, scales, likelihood_bound=None)
    ref = _reference_likelihood(x, scales, None, likelihood_bound=None)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    g = torch.rand_like(ref)
    for a, b in zip(torch.autograd.grad(got, (x, scales), g), torch.autograd.grad(ref, (x, scales), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_likelihood_gradcheck():
    x, scales, means = (
        t.detach()[:1, :2, :3, :3].clone().requires_grad_() for t in _likelihood_inputs((1, 2, 3, 3), torch.float64)
    )
    with torch.no_grad():
        scales.clamp_(min=0.3)  # stay away from the bound's kink, where finite differences break
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.gaussian_likelihood(a, b, c, likelihood_bound=None), (x, scales, means)
    )


def test_likelihood_bad_inputs():
    with pytest.raises(ValueError, match="broadcast"):
        ops.gaussian_likelihood(torch.randn(3, 4), torch.rand(5))
    with pytest.raises(TypeError, match="scales"):
        ops.gaussian_likelihood(torch.randn(3), torch.ones(3, dtype=torch.int64))


def test_build_indexes_concurrent_calls(reference_gc):
    # Two Python threads calling the op at once get correct results. (The op keeps the GIL: torch.ops
    # calls do not release it and these kernels take well under a millisecond.)
    scales = _log_uniform((1, 320, 48, 32))
    expected = reference_gc.build_indexes(scales)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ops.build_indexes(scales, reference_gc.scale_table)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(torch.equal(r, expected) for r in results)


# -- CUDA (run only where a GPU exists) -----------------------------------------------------


@pytest.mark.cuda
def test_cuda_kernels_match_cpu(reference_gc):
    assert dualres_ext.build_info()["cuda"]
    table = reference_gc.scale_table
    y, means = _halfway_inputs((2, 96, 33, 17))
    scales = _log_uniform(y.shape, 0.01, 400.0)
    scales.view(-1)[:64] = table
    dev = torch.device("cuda")
    assert torch.equal(ops.build_indexes(scales.to(dev), table.to(dev)).cpu(), ops.build_indexes(scales, table))
    assert torch.equal(ops.quantize_symbols(y.to(dev), means.to(dev)).cpu(), ops.quantize_symbols(y, means))
    s_cuda, i_cuda = ops.quantize_and_index(y.to(dev), scales.to(dev), table.to(dev), means.to(dev))
    s_cpu, i_cpu = ops.quantize_and_index(y, scales, table, means)
    assert torch.equal(s_cuda.cpu(), s_cpu) and torch.equal(i_cuda.cpu(), i_cpu)
    assert torch.equal(ops.dequantize(s_cpu.to(dev), means.to(dev)).cpu(), ops.dequantize(s_cpu, means))
    bad = scales.to(dev)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.build_indexes(bad, table.to(dev))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        x, s, m = _likelihood_inputs((2, 16, 12, 9), dtype)
        xc, sc, mc = (t.detach().to(dev).requires_grad_() for t in (x, s, m))
        got = ops.gaussian_likelihood(xc, sc, mc)
        x64, s64, m64 = (t.detach().double().requires_grad_() for t in (x, s, m))
        ref = _reference_likelihood(x64, s64, m64)
        torch.testing.assert_close(got.cpu().double(), ref.detach(), rtol=tol * 10, atol=tol)
        g = torch.randn_like(ref)
        for a, b in zip(
            torch.autograd.grad(got, (xc, sc, mc), g.to(dev, dtype)), torch.autograd.grad(ref, (x64, s64, m64), g)
        ):
            torch.testing.assert_close(a.cpu().double(), b, rtol=tol * 100, atol=tol * 10)


def test_raw_ops_check_their_own_arguments():
    """torch.ops.dualres_ext.* can be called without the Python wrappers: the kernels still refuse
    shapes, dtypes and layouts they would otherwise read out of bounds (gaussian_checks.h)."""
    o = torch.ops.dualres_ext
    y = torch.randn(6, 5)
    table = torch.tensor([0.11, 0.5, 2.0])
    bad_calls = {
        "means dtypes": lambda: o.gaussian_quantize(y, y.double()),
        "y must be contiguous": lambda: o.gaussian_quantize(y.t(), None),
        "same shape": lambda: o.gaussian_quantize_indexes(y, None, torch.rand(6, 4), table, 0.11, 7),
        "scale_table must be 1-D": lambda: o.gaussian_build_indexes(y.abs(), table[None], 0.11, 7),
        "scale_table dtypes": lambda: o.gaussian_build_indexes(y.abs(), table.double(), 0.11, 7),
        "symbols must be int32": lambda: o.gaussian_dequantize(y, None, torch.float32),
        "scales dtypes": lambda: o.gaussian_likelihood(y, None, y.abs().double(), 0.11, 1e-9),
        "grad dtypes": lambda: o.gaussian_likelihood_backward(y.double(), y, None, y.abs(), 0.11, 1e-9),
    }
    for words, call in bad_calls.items():
        with pytest.raises(RuntimeError, match=words):
            call()
    # The same ops accept the well-formed versions of those calls.
    assert o.gaussian_quantize(y, y + 0.3).dtype == torch.int32
    assert o.gaussian_build_indexes(y.abs(), table, 0.11, 7).shape == y.shape
