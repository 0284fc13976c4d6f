"""EntropyBottleneck / GaussianConditional against CompressAI 1.2.8: parameters, state dicts,
training forward/backward, coder tables and (with the rANS ops) compressed strings."""
import pytest
import torch

from dualres_ext import entropy_models as ours
from dualres_ext import ops

theirs = pytest.importorskip("compressai.entropy_models")
from compressai.models.google import get_scale_table  # noqa: E402


def _perturbed_bottleneck(channels):
    """A CompressAI EntropyBottleneck with non-trivial (trained-looking) parameters and tables."""
    eb = theirs.EntropyBottleneck(channels)
    with torch.no_grad():
        for p in eb.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        eb.quantiles[:, 0, 0] -= torch.rand(channels) * 20
        eb.quantiles[:, 0, 2] += torch.rand(channels) * 20
    eb.update(force=True)
    return eb


def _log_uniform(shape, lo=0.11, hi=20.0):
    u = torch.rand(shape)
    return torch.exp(u * (torch.log(torch.tensor(hi)) - torch.log(torch.tensor(lo))) + torch.log(torch.tensor(lo)))


# -- structure and state dicts --------------------------------------------------------------

def test_same_state_dict_keys_and_shapes():
    for make_theirs, make_ours in (
        (lambda: theirs.EntropyBottleneck(12, filters=(3, 4)), lambda: ours.EntropyBottleneck(12, filters=(3, 4))),
        (lambda: theirs.GaussianConditional(None), lambda: ours.GaussianConditional(None)),
        (lambda: theirs.GaussianConditional([0.2, 1.0, 5.0]), lambda: ours.GaussianConditional([0.2, 1.0, 5.0])),
    ):
        a, b = make_theirs().state_dict(), make_ours().state_dict()
        assert list(a) == list(b)
        for k in a:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k


def test_compressai_state_dict_loads_strict_both_ways():
    eb = _perturbed_bottleneck(16)
    mine = ours.EntropyBottleneck(16)
    mine.load_state_dict(eb.state_dict(), strict=True)
    for k, v in eb.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k

    gc = theirs.GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    mine_gc = ours.GaussianConditional(None)
    mine_gc.load_state_dict(gc.state_dict(), strict=True)
    for k, v in gc.state_dict().items():
        assert torch.equal(mine_gc.state_dict()[k], v), k

    # Ours -> CompressAI: CompressAI resizes its empty buffers with its own helper, as its models do.
    from compressai.models.utils import update_registered_buffers
    back = theirs.GaussianConditional(None)
    sd = {"gc." + k: v for k, v in mine_gc.state_dict().items()}
    update_registered_buffers(back, "gc", ["_quantized_cdf", "_offset", "_cdf_length", "scale_table"], sd)
    back.load_state_dict(mine_gc.state_dict(), strict=True)
    assert torch.equal(back._quantized_cdf, gc._quantized_cdf)


def test_update_builds_compressai_tables():
    eb = _perturbed_bottleneck(24)
    mine = ours.EntropyBottleneck(24)
    mine.load_state_dict(eb.state_dict())
    assert mine.update(force=False) is False  # tables came with the state dict
    assert mine.update(force=True) is True
    for name in ("_quantized_cdf", "_cdf_length", "_offset"):
        assert torch.equal(getattr(mine, name), getattr(eb, name)), name

    gc = theirs.GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    mine_gc = ours.GaussianConditional(None)
    assert mine_gc.update_scale_table(get_scale_table()) is True
    assert mine_gc.update_scale_table(get_scale_table()) is False
    for name in ("_quantized_cdf", "_cdf_length", "_offset", "scale_table"):
        assert torch.equal(getattr(mine_gc, name), getattr(gc, name)), name


def test_update_quantiles_and_aux_loss_match():
    eb = _perturbed_bottleneck(6)
    mine = ours.EntropyBottleneck(6)
    mine.load_state_dict(eb.state_dict())
    assert torch.equal(mine.loss(), eb.loss())
    eb.update(force=True, update_quantiles=True)
    mine.update(force=True, update_quantiles=True)
    assert torch.equal(mine.quantiles, eb.quantiles)
    assert torch.equal(mine._quantized_cdf, eb._quantized_cdf)


# -- training path --------------------------------------------------------------------------

@pytest.mark.parametrize("with_means", [True, False])
def test_gaussian_conditional_forward_backward(with_means):
    ref = theirs.GaussianConditional(None).double()
    mine = ours.GaussianConditional(None).double()
    y = (torch.randn(2, 12, 7, 5, dtype=torch.float64) * 4).requires_grad_()
    scales = torch.rand(2, 12, 7, 5, dtype=torch.float64).mul(5).requires_grad_()  # some below the bound
    means = torch.randn(2, 12, 7, 5, dtype=torch.float64).requires_grad_() if with_means else None
    inputs = [t for t in (y, scales, means) if t is not None]
    out_ref, lik_ref = ref(y, scales, means, training=False)
    out_mine, lik_mine = mine(y, scales, means, training=False)
    assert torch.equal(out_mine, out_ref)
    torch.testing.assert_close(lik_mine, lik_ref, rtol=1e-12, atol=1e-15)
    g = torch.randn_like(lik_ref)
    for a, b in zip(torch.autograd.grad(lik_mine, inputs, g), torch.autograd.grad(lik_ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # training=True adds uniform noise in [-0.5, 0.5).
    noisy, lik = mine(y, scales, means, training=True)
    assert ((noisy - y).abs() <= 0.5).all() and not torch.equal(noisy, y)
    assert (lik >= 1e-9 * (1 - 1e-6)).all() and (lik <= 1).all()


def test_gaussian_conditional_float32_forward_close_to_compressai():
    ref, mine = theirs.GaussianConditional(None), ours.GaussianConditional(None)
    y, scales, means = torch.randn(1, 32, 16, 16) * 3, _log_uniform((1, 32, 16, 16)), torch.randn(1, 32, 16, 16)
    _, a = ref(y, scales, means, training=False)
    _, b = mine(y, scales, means, training=False)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_entropy_bottleneck_forward_backward():
    eb = _perturbed_bottleneck(8).double()
    mine = ours.EntropyBottleneck(8).double()
    mine.load_state_dict(eb.state_dict())
    x = (torch.randn(2, 8, 6, 5, dtype=torch.float64) * 5).requires_grad_()
    for training in (False, True):
        torch.manual_seed(7)
        out_ref, lik_ref = eb(x, training=training)
        torch.manual_seed(7)
        out_mine, lik_mine = mine(x, training=training)
        assert torch.equal(out_mine, out_ref) and torch.equal(lik_mine, lik_ref)
        g = torch.randn_like(lik_ref)
        params_ref = [x] + list(eb.parameters())
        params_mine = [x] + list(mine.parameters())
        for a, b in zip(torch.autograd.grad(lik_mine, params_mine, g, allow_unused=True),
                        torch.autograd.grad(lik_ref, params_ref, g, allow_unused=True)):
            assert (a is None and b is None) or torch.equal(a, b)


def test_build_indexes_module(tmp_path):
    gc = theirs.GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    mine = ours.GaussianConditional(None)
    mine.load_state_dict(gc.state_dict())
    scales = _log_uniform((2, 40, 9, 7), 0.01, 300)
    scales[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, float("inf")])  # clamped like CompressAI
    assert torch.equal(mine.build_indexes(scales), gc.build_indexes(scales))
    y, means = torch.randn(scales.shape) * 10, torch.randn(scales.shape)
    symbols, indexes = mine.quantize_and_index(y, scales, means)
    assert torch.equal(indexes, gc.build_indexes(scales))
    assert torch.equal(symbols, gc.quantize(y, "symbols", means))


def test_constructor_validation():
    with pytest.raises(ValueError):
        ours.GaussianConditional([3.0, 1.0])
    with pytest.raises(ValueError):
        ours.GaussianConditional([])
    with pytest.raises(ValueError):
        ours.GaussianConditional(None, scale_bound=0)
    with pytest.raises(ValueError, match="coder"):
        ours.EntropyBottleneck(4, entropy_coder="rangecoder")
    with pytest.raises(ValueError, match="lanes"):
        ours.EntropyBottleneck(4, lanes=0)
    with pytest.raises(ValueError, match="update"):
        ours.GaussianConditional(None).compress(torch.randn(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.int32))
