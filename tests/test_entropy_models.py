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
    # Both are float32 approximations of erfc (ours vectorised, ~1e-7 absolute): a few 1e-7 apart.
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


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
        for a, b in zip(
            torch.autograd.grad(lik_mine, params_mine, g, allow_unused=True),
            torch.autograd.grad(lik_ref, params_ref, g, allow_unused=True),
        ):
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
    with pytest.raises(ValueError, match="lanes"):
        ours.EntropyBottleneck(4, lanes="fast")
    with pytest.raises(TypeError, match="lanes"):
        ours.EntropyBottleneck(4, lanes=2.0)
    with pytest.raises(ValueError, match="update"):
        ours.GaussianConditional(None).compress(torch.randn(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.int32))


# -- compress / decompress ------------------------------------------------------------------


def _gaussian_pair(**kwargs):
    ref = theirs.GaussianConditional(None)
    ref.update_scale_table(get_scale_table())
    mine = ours.GaussianConditional(None, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _latent(shape, escapes=True):
    y = torch.randn(shape) * 6
    means = torch.randn(shape) * 2
    scales = _log_uniform(shape, 0.05, 30.0)
    if escapes:  # values far outside the tables take CompressAI's bypass path
        flat = y.view(-1)
        pick = torch.randperm(flat.numel())[:40]
        flat[pick] = torch.randn(40) * 3000
    return y, means, scales


@pytest.mark.parametrize("shape", [(1, 64, 13, 9), (3, 5, 4, 6), (2, 3, 7)])
def test_gaussian_compress_byte_identical_to_compressai(shape):
    ref, mine = _gaussian_pair()
    y, means, scales = _latent(shape)
    indexes = ref.build_indexes(scales)
    for m in (means, None):
        strings = mine.compress(y, indexes, m)
        assert strings == ref.compress(y, indexes, m)
        decoded = mine.decompress(strings, indexes, means=m)
        expected = ref.decompress(strings, indexes, means=m)
        assert decoded.dtype == expected.dtype and torch.equal(decoded, expected)
    # CompressAI decodes our strings and we decode its strings (same thing, but say it).
    assert torch.equal(
        mine.decompress(ref.compress(y, indexes, means), indexes, means=means),
        ref.decompress(mine.compress(y, indexes, means), indexes, means=means),
    )
    # dtype argument without means, broadcast means with size-1 spatial dims.
    strings = mine.compress(y, indexes)
    assert torch.equal(
        mine.decompress(strings, indexes, dtype=torch.float64), ref.decompress(strings, indexes, dtype=torch.float64)
    )
    if len(shape) == 4:
        m1 = torch.randn(shape[0], shape[1], 1, 1)
        s1 = mine.compress(y, indexes, m1.expand(shape))
        assert torch.equal(mine.decompress(s1, indexes, means=m1), ref.decompress(s1, indexes, means=m1))
    # Means the decoder dequantises with in its own pass (float64, non-contiguous) or that it leaves
    # to dequantize (half, or needing a gradient): the same values as CompressAI's either way.
    strings = mine.compress(y, indexes, means)
    for m in (means.double(), means.transpose(0, 1).contiguous().transpose(0, 1), means.half(), means.requires_grad_()):
        decoded = mine.decompress(strings, indexes, means=m)
        expected = ref.decompress(strings, indexes, means=m)
        assert decoded.dtype == expected.dtype and torch.equal(decoded, expected)
    means.requires_grad_(False)


@pytest.mark.parametrize("lanes", ["auto", 1, 7])
def test_gaussian_native_lanes_round_trip(lanes):
    ref, mine = _gaussian_pair(lanes=lanes)
    y, means, scales = _latent((2, 48, 20, 14))
    indexes = mine.build_indexes(scales)
    strings = mine.compress(y, indexes, means)
    assert len(strings) == 2 and all(isinstance(s, bytes) for s in strings)
    expected = ref.dequantize(ref.quantize(y, "symbols", means), means)
    assert torch.equal(mine.decompress(strings, indexes, means=means), expected)
    # Size stays close to CompressAI's single-lane stream (lanes cost a few bytes each).
    compat = ref.compress(y, indexes, means)
    assert sum(map(len, strings)) <= 1.01 * sum(map(len, compat)) + 64 * (1 if lanes == "auto" else lanes) * 2
    # A decoder whose lanes setting differs still reads the stream (the lane count is in it).
    other = ours.GaussianConditional(None, lanes=3)
    other.load_state_dict(mine.state_dict())
    assert torch.equal(other.decompress(strings, indexes, means=means), expected)


@pytest.mark.parametrize("lanes", [None, "auto"])
def test_entropy_bottleneck_compress(lanes):
    eb = _perturbed_bottleneck(12)
    mine = ours.EntropyBottleneck(12, lanes=lanes)
    mine.load_state_dict(eb.state_dict())
    z = torch.randn(2, 12, 6, 5) * 8
    z[0, 3, 2, 1] = 4000.0  # escape
    strings = mine.compress(z)
    if lanes is None:
        assert strings == eb.compress(z)
    decoded = mine.decompress(strings, z.shape[2:])
    assert torch.equal(decoded, eb.decompress(eb.compress(z), z.shape[2:]))


def test_compress_rejects_bad_arguments():
    _, mine = _gaussian_pair()
    y, means, scales = _latent((1, 4, 3, 3), escapes=False)
    indexes = mine.build_indexes(scales)
    with pytest.raises(ValueError, match="same size"):
        mine.compress(y, indexes[:, :2])
    with pytest.raises(ValueError, match="at least 2"):
        mine.compress(y.view(-1), indexes.view(-1))
    with pytest.raises(ValueError):
        mine.compress(y, indexes + 100)  # outside the tables
    y_bad = y.clone()
    y_bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mine.compress(y_bad, indexes)
    strings = mine.compress(y, indexes)
    with pytest.raises(ValueError):
        mine.decompress("not a list", indexes)
    with pytest.raises(ValueError):
        mine.decompress(strings * 2, indexes)
    with pytest.raises(ValueError, match="means"):
        mine.decompress(strings, indexes, means=torch.zeros(1, 4, 3, 2))
    with pytest.raises(ValueError):
        mine.decompress([strings[0][: len(strings[0]) // 2]], indexes)  # truncated


def test_loaded_bounds_are_used():
    # The bounds come from buffers; a state dict with other bounds must change the results.
    src = theirs.GaussianConditional(None, scale_bound=0.5, likelihood_bound=1e-3)
    mine = ours.GaussianConditional(None)
    y, scales = torch.randn(1, 4, 5, 5) * 20, torch.rand(1, 4, 5, 5)
    mine(y, scales, training=False)  # caches the default bounds
    mine.load_state_dict(src.state_dict())
    _, expected = src(y, scales, training=False)
    _, got = mine(y, scales, training=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (got >= 1e-3 * (1 - 1e-6)).all()


def test_derived_state_follows_the_buffers():
    """Coder tables, scale tables and bound values are derived from buffers: replacing a buffer
    (update, load_state_dict, update_scale_table) or writing it in place is seen at the next call."""
    eb_a, eb_b = _perturbed_bottleneck(6), _perturbed_bottleneck(6)
    mine = ours.EntropyBottleneck(6)
    mine.load_state_dict(eb_a.state_dict())
    z = torch.randn(1, 6, 5, 4) * 5
    assert mine.compress(z) == eb_a.compress(z)
    mine.load_state_dict(eb_b.state_dict())  # same shapes: written in place
    assert mine.compress(z) == eb_b.compress(z)
    for _ in range(3):  # replaced buffers of the same shape, possibly at a freed address
        with torch.no_grad():
            mine.quantiles.add_(torch.randn_like(mine.quantiles) * 0.01)
        mine.update(force=True)
        fresh = ours.EntropyBottleneck(6)  # a module that never saw the earlier tables
        fresh.load_state_dict(mine.state_dict())
        assert mine.compress(z) == fresh.compress(z)

    _, gc = _gaussian_pair()
    scales = _log_uniform((1, 4, 6, 6))
    before = gc.build_indexes(scales)
    assert torch.equal(before, ops.build_indexes(scales, gc.scale_table, gc.lower_bound_scale.bound, strict=False))
    y = torch.randn(1, 4, 6, 6) * scales * 2
    ref = theirs.GaussianConditional(None)
    ref.update_scale_table(get_scale_table())
    assert gc.compress(y, before) == ref.compress(y, before)
    assert torch.equal(gc.decompress(ref.compress(y, before), before), ref.decompress(ref.compress(y, before), before))
    gc.update_scale_table(get_scale_table()[::2], force=True)
    assert torch.equal(gc.build_indexes(scales), ops.build_indexes(scales, gc.scale_table, 0.11, strict=False))
    # The coder's prepared tables follow the rebuilt ones.
    ref.update_scale_table(get_scale_table()[::2], force=True)
    indexes = gc.build_indexes(scales)
    strings = ref.compress(y, indexes)
    assert gc.compress(y, indexes) == strings
    assert torch.equal(gc.decompress(strings, indexes), ref.decompress(strings, indexes))
    with torch.no_grad():
        gc.scale_table.mul_(2.0)
        gc.lower_bound_scale.bound.fill_(0.5)
    assert gc.lower_bound_scale.value() == float(torch.tensor(0.5))
    assert torch.equal(gc.build_indexes(scales), ops.build_indexes(scales, gc.scale_table, 0.5, strict=False))
    gc.lower_bound_scale.bound = torch.tensor([0.25])
    assert gc.lower_bound_scale.value() == 0.25


def test_per_call_lanes_and_native_detection():
    ref, mine = _gaussian_pair()  # module in CompressAI mode
    y, means, scales = _latent((1, 32, 16, 12))
    indexes = mine.build_indexes(scales)
    expected = ref.dequantize(ref.quantize(y, "symbols", means), means)
    native = mine.compress(y, indexes, means, lanes=4)
    assert native != ref.compress(y, indexes, means)
    assert native[0][:3] == b"\xd7R\x01"
    # A plain decompress recognises the native header; an explicit lanes works too.
    assert torch.equal(mine.decompress(native, indexes, means=means), expected)
    assert torch.equal(mine.decompress(native, indexes, means=means, lanes="auto"), expected)
    # Compat strings still decode, also with an explicit lanes=None on a native-mode module.
    native_module = ours.GaussianConditional(None, lanes="auto")
    native_module.load_state_dict(mine.state_dict())
    compat = native_module.compress(y, indexes, means, lanes=None)
    assert compat == ref.compress(y, indexes, means)
    assert torch.equal(native_module.decompress(compat, indexes, means=means, lanes=None), expected)
    # A corrupted native string raises instead of decoding to something.
    bad = bytearray(native[0])
    bad[len(bad) // 2] ^= 0x55
    with pytest.raises(ValueError):
        mine.decompress([bytes(bad)], indexes, means=means)
    with pytest.raises(ValueError, match="lanes"):
        mine.compress(y, indexes, means, lanes=0)
    # EntropyBottleneck passes lanes through.
    eb = _perturbed_bottleneck(6)
    ours_eb = ours.EntropyBottleneck(6)
    ours_eb.load_state_dict(eb.state_dict())
    z = torch.randn(1, 6, 4, 4) * 5
    strings = ours_eb.compress(z, lanes=2)
    assert strings[0][:3] == b"\xd7R\x01"
    assert torch.equal(ours_eb.decompress(strings, (4, 4)), eb.decompress(eb.compress(z), (4, 4)))
