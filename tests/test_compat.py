"""dualres_ext.compat: CompressAI models accelerated in place (bytes, decoded tensors, APIs)."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch

compressai = pytest.importorskip("compressai")

from compressai.entropy_models import EntropyBottleneck, GaussianConditional, GaussianMixtureConditional  # noqa: E402
from compressai.layers import GDN as CaiGDN  # noqa: E402
from compressai.layers import GDN1 as CaiGDN1  # noqa: E402
from compressai.models import (  # noqa: E402
    Cheng2020Anchor,
    Cheng2020AnchorCheckerboard,
    Elic2022Official,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
)

import dualres_ext.ans as dans  # noqa: E402
from dualres_ext import compat, layers, ops  # noqa: E402

# The zoo's architectures (mbt2018-mean = MeanScaleHyperprior, mbt2018 =
# JointAutoregressiveHierarchicalPriors, cheng2020-anchor = Cheng2020Anchor) with few channels, so
# that the suite stays fast on two cores; the coding paths are the same at any width.
MODELS = {
    "mbt2018-mean": lambda: MeanScaleHyperprior(N=32, M=48),
    "mbt2018": lambda: JointAutoregressiveHierarchicalPriors(N=32, M=48),
    "cheng2020-anchor": lambda: Cheng2020Anchor(N=32),
    "Cheng2020AnchorCheckerboard": lambda: Cheng2020AnchorCheckerboard(N=32),
    "Elic2022Official": lambda: Elic2022Official(N=32, M=160),
}
SERIAL = ("mbt2018", "cheng2020-anchor")


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    # Smooth content plus noise: latents with a spread of scales, not a constant.
    coarse = torch.rand(1, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.rand(1, 3, 64, 64, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request):
    """(name, original CompressAI model, image, its compress() output, decoded y_hat, x_hat)."""
    name = request.param
    torch.manual_seed(sum(map(ord, name)))
    model = MODELS[name]().eval()
    model.update()
    x = _image(len(name))
    with torch.no_grad():
        out = model.compress(x)
        y_hat, x_hat = _decode(model, out)
    return name, model, x, out, y_hat, x_hat


def _decode(model, out):
    """Decode, capturing the latent handed to the synthesis transform (exact entropy decoding)."""
    captured = []
    handle = model.g_s.register_forward_pre_hook(lambda m, args: captured.append(args[0].clone()))
    try:
        x_hat = model.decompress(out["strings"], out["shape"])["x_hat"]
    finally:
        handle.remove()
    return captured[0], x_hat


def test_bytes_and_decode_identical_without_gdn_swap(reference):
    name, model, x, out, y_hat, x_hat = reference
    fast = compat.accelerate(copy.deepcopy(model), gdn=False)
    with torch.no_grad():
        fast_out = fast.compress(x)
        assert fast_out["strings"] == out["strings"]
        fast_y, fast_x = _decode(fast, out)
    assert torch.equal(fast_y, y_hat)
    assert torch.equal(fast_x, x_hat)


def test_default_accelerate_same_bytes_and_latents(reference):
    name, model, x, out, y_hat, x_hat = reference
    fast = compat.accelerate(copy.deepcopy(model))
    kinds = {type(m) for m in fast.modules()}
    assert not kinds & {CaiGDN, CaiGDN1}
    if any(isinstance(m, CaiGDN) for m in model.modules()):
        assert layers.GDN in kinds
    with torch.no_grad():
        fast_out = fast.compress(x)
        # The fused GDN rounds differently from CompressAI's conv2d in the last bits; on these
        # inputs no latent lands on a rounding boundary, so the bytes are the same.
        assert fast_out["strings"] == out["strings"]
        fast_y, fast_x = _decode(fast, out)  # CompressAI's stream through the accelerated model
        orig_y, _ = _decode(model, fast_out)  # and ours through CompressAI
    assert torch.equal(fast_y, y_hat)
    assert torch.equal(orig_y, y_hat)
    assert torch.allclose(fast_x, x_hat, atol=1e-5, rtol=0)
    assert (fast_x - x_hat).abs().max() < 1e-5


@pytest.mark.parametrize("lanes", ["auto", 3])
def test_lanes_round_trip(reference, lanes):
    name, model, x, out, y_hat, x_hat = reference
    fast = compat.accelerate(copy.deepcopy(model), lanes=lanes, gdn=False)
    with torch.no_grad():
        fast_out = fast.compress(x)
        fast_y, fast_x = _decode(fast, fast_out)
    assert torch.equal(fast_y, y_hat)
    assert torch.equal(fast_x, x_hat)
    # The hyperprior always goes through the EntropyBottleneck: its stream must be the native one.
    assert fast_out["strings"][-1] != out["strings"][-1]
    if name not in SERIAL:
        assert fast_out["strings"] != out["strings"]
    # Accelerated decoders read both streams whatever their own lanes setting.
    plain = compat.accelerate(copy.deepcopy(model), gdn=False)
    with torch.no_grad():
        assert torch.equal(_decode(plain, fast_out)[0], y_hat)
        assert torch.equal(_decode(fast, out)[0], y_hat)


def test_module_api_kept(reference):
    name, model, x, out, y_hat, x_hat = reference
    fast = compat.accelerate(copy.deepcopy(model))
    ebs = [m for m in fast.modules() if isinstance(m, EntropyBottleneck)]
    gcs = [m for m in fast.modules() if isinstance(m, GaussianConditional)]
    assert ebs and gcs
    assert all(isinstance(m, compat._NativeCoding) for m in ebs + gcs)
    # update() (isinstance-driven in CompressionModel) still reaches them and rebuilds equal tables.
    assert fast.update(force=True)
    ref_state, state = model.state_dict(), fast.state_dict()
    assert ref_state.keys() == state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key
    assert torch.equal(fast.aux_loss(), model.aux_loss())
    # State dicts travel both ways (strict).
    fresh = MODELS[name]()
    fresh.load_state_dict(fast.state_dict())
    fast2 = compat.accelerate(MODELS[name]())
    fast2.load_state_dict(model.state_dict())
    fast2.eval()
    with torch.no_grad():
        assert fast2.compress(x)["strings"] == out["strings"]


def test_serial_decode_converts_tables_once(monkeypatch):
    torch.manual_seed(3)
    model = MODELS["mbt2018"]().eval()
    model.update()
    x = _image(5)
    counts = {"convert": 0, "stream": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(dans, "_convert_tables", counting("convert", dans._convert_tables))
    monkeypatch.setattr(ops, "rans_decode_compat_stream", counting("stream", ops.rans_decode_compat_stream))
    with torch.no_grad():
        out = model.compress(x)
        ref = model.decompress(out["strings"], out["shape"])["x_hat"]
        assert counts == {"convert": 0, "stream": 0}  # a model that was not accelerated: CompressAI's coder
        fast = compat.accelerate(copy.deepcopy(model), gdn=False)
        got = fast.decompress(out["strings"], out["shape"])["x_hat"]
    positions = out["shape"][0] * 4 * out["shape"][1] * 4
    assert counts["stream"] == positions
    assert counts["convert"] == 1
    assert torch.equal(got, ref)


def test_registry_coder():
    assert "dualres" in compressai.available_entropy_coders()
    assert compressai.get_entropy_coder() == "ans"
    torch.manual_seed(7)
    y = torch.randn(2, 8, 6, 5) * 4
    try:
        compressai.set_entropy_coder("dualres")
        eb_ours = EntropyBottleneck(8)
        assert eb_ours.entropy_coder.name == "dualres"
        assert isinstance(eb_ours.entropy_coder._encoder, dans.RansEncoder)
    finally:
        compressai.set_entropy_coder("ans")
    eb_ref = EntropyBottleneck(8)
    eb_ref.load_state_dict(eb_ours.state_dict())
    eb_ours.update()
    eb_ref.update()
    strings = eb_ours.compress(y)
    assert strings == eb_ref.compress(y)
    assert torch.equal(eb_ours.decompress(strings, y.shape[2:]), eb_ref.decompress(strings, y.shape[2:]))
    with pytest.raises(ValueError):
        compressai.set_entropy_coder("cabac")


def test_gdn_swap_shares_parameters_and_trains():
    torch.manual_seed(11)
    net = torch.nn.Sequential(CaiGDN(6), CaiGDN(6, inverse=True, beta_min=1e-3), CaiGDN1(6), CaiGDN1(6, inverse=True))
    with torch.no_grad():
        for m in net:
            m.beta.add_(torch.rand(6) * 0.3)
            m.gamma.add_(torch.rand(6, 6) * 0.2)
    ref = copy.deepcopy(net)
    params = list(net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    compat.accelerate(net)
    assert [type(m) for m in net] == [layers.GDN, layers.GDN, layers.GDN1, layers.GDN1]
    assert [m.inverse for m in net] == [False, True, False, True]
    assert net[1].beta_reparam.minimum == 1e-3
    assert all(a is b for a, b in zip(net.parameters(), params))
    x = torch.rand(2, 6, 9, 7) + 0.1
    assert torch.allclose(net(x), ref(x), rtol=1e-5, atol=1e-6)
    before = net[0].gamma.detach().clone()
    net(x).square().sum().backward()
    opt.step()
    assert not torch.equal(net[0].gamma, before)


def test_entropy_model_subclass_with_own_coding_is_left_alone():
    holder = torch.nn.Module()
    holder.gmm = GaussianMixtureConditional(scale_table=[0.11, 1.0, 10.0])
    holder.gc = GaussianConditional(None)
    compat.accelerate(holder)
    assert type(holder.gmm) is GaussianMixtureConditional
    assert type(holder.gc) is compat.DualresGaussianConditional


@pytest.mark.parametrize("name", SERIAL)
def test_serial_compress_indexes_and_codes_once(name, monkeypatch):
    """The accelerated serial encoder still quantises position by position, but computes the
    indexes and runs the coder once per image, with CompressAI's bytes; it survives pickling."""
    torch.manual_seed(11)
    model = MODELS[name]().eval()
    model.update()
    x = _image(13)
    with torch.no_grad():
        out = model.compress(x)
    fast = compat.accelerate(copy.deepcopy(model), gdn=False)
    cls = type(fast.gaussian_conditional)
    calls = {"build_indexes": 0, "encode": 0}
    build_indexes, encode = cls.build_indexes, dans.BufferedRansEncoder.encode_with_indexes

    def counted_build_indexes(self, scales):
        calls["build_indexes"] += 1
        return build_indexes(self, scales)

    def counted_encode(self, *args):
        calls["encode"] += 1
        return encode(self, *args)

    monkeypatch.setattr(cls, "build_indexes", counted_build_indexes)
    monkeypatch.setattr(dans.BufferedRansEncoder, "encode_with_indexes", counted_encode)
    with torch.no_grad():
        fast_out = fast.compress(x)
    assert fast_out["strings"] == out["strings"]
    assert calls == {"build_indexes": 1, "encode": 1}  # z goes through the EntropyBottleneck
    clone = pickle.loads(pickle.dumps(fast))
    assert clone._compress_ar.owner is clone and clone._decompress_ar.owner is clone
    with torch.no_grad():
        assert clone.compress(x)["strings"] == out["strings"]
        assert torch.equal(
            clone.decompress(out["strings"], out["shape"])["x_hat"],
            fast.decompress(out["strings"], out["shape"])["x_hat"],
        )


def test_accelerated_model_pickles():
    torch.manual_seed(5)
    model = MODELS["mbt2018-mean"]().eval()
    model.update()
    x = _image(9)
    with torch.no_grad():
        out = model.compress(x)
    fast = compat.accelerate(copy.deepcopy(model))
    clone = pickle.loads(pickle.dumps(fast))
    with torch.no_grad():
        assert clone.compress(x)["strings"] == out["strings"]
    assert clone.decompress.owner is clone


def test_argument_errors():
    with pytest.raises(TypeError, match="model"):
        compat.accelerate("not a model")
    for bad in (0, -1, "many"):
        with pytest.raises(ValueError, match="lanes"):
            compat.accelerate(torch.nn.Module(), lanes=bad)
    for bad in (True, 2.0):  # not a count at all: the wrong type
        with pytest.raises(TypeError, match="lanes"):
            compat.accelerate(torch.nn.Module(), lanes=bad)


def test_import_dualres_ext_does_not_import_compressai(package_env, tmp_path):
    code = (
        "import sys, dualres_ext, dualres_ext.ops, dualres_ext.ans, dualres_ext.layers, "
        "dualres_ext.entropy_models\n"
        "assert 'compressai' not in sys.modules, sorted(m for m in sys.modules if 'compressai' in m)\n"
        "import dualres_ext.compat\n"
        "assert 'compressai' in sys.modules\n"
    )
    # cwd: `python -c` puts the working directory first on sys.path (the source tree, in CI).
    subprocess.run([sys.executable, "-c", code], check=True, env=package_env, cwd=tmp_path)
