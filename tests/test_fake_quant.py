"""Quantisation-aware training (dualres_ext.models.fake_quant): the float networks with the
rounding installed compute what the converted integer networks compute, train, and leave no trace
in the weights."""

from __future__ import annotations

import copy

import pytest
import torch

from dualres_ext import codec
from dualres_ext.models import fake_quant, get_scale_table
from dualres_ext.models.exact import DEFAULTS, calibrate, convert
from dualres_ext.models.quantize import quantize_latent


@pytest.fixture(scope="module")
def model_and_grids():
    model, _ = codec.resolve_model(None, None)
    model = copy.deepcopy(model)
    model.exact = None
    torch.manual_seed(5)
    crops = [torch.rand(1, 3, 128, 192)]
    stats = calibrate(model, crops, [1, 4])
    grids = {}
    exact = convert(model, stats, get_scale_table(), grids=grids)
    return model, exact, grids


def _latents(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 128, 192, generator=g)
    with torch.no_grad():
        y_h, y_l = model.analysis(x, 2)
        z = model.hyper_analysis(y_h, y_l)
        z_hat = quantize_latent(z, model.z_offset(), False, model.entropy_bottleneck).double()
    return x, y_h.double(), y_l.double(), z_hat


def test_rounded_networks_compute_the_integer_networks(model_and_grids):
    model, exact, grids = model_and_grids
    kinds = {g.kind for g in grids.values()}
    assert kinds == {"conv", "table", "lrp"}
    plain = model.coding_nets()
    handle = fake_quant.install(model, grids, DEFAULTS["weight_bits"])
    try:
        nets = model.coding_nets()
        assert nets is not plain  # rebuilt with the rounding
        _, y_h, y_l, z_hat = _latents(model, 11)
        gc = model.gaussian_conditional
        seen = {"exact": [], "rounded": [], "plain": []}

        def recorder(key, y, coder):
            pieces = coder.split(y)

            def step(i, scales, means):
                if key == "exact":
                    idx = scales.long()
                else:
                    idx = gc.build_indexes(scales).long()
                seen[key].append((idx, means.double()))
                return quantize_latent(pieces[i], means, False, gc).double()

            return step

        with torch.no_grad():
            exact.decode_latents(z_hat, recorder("exact", y_h, model.coder_h), recorder("exact", y_l, model.coder_l))
            for key, n in (("rounded", nets), ("plain", plain)):
                model.decode_latents(z_hat, recorder(key, y_h, n.coder_h), recorder(key, y_l, n.coder_l), n)

        def agreement(key):
            same_idx = same_mu = total = 0
            for (ie, me), (ik, mk) in zip(seen["exact"], seen[key]):
                same_idx += int((ie == ik).sum())
                same_mu += int((me == mk).sum())
                total += ie.numel()
            return same_idx / total, same_mu / total

        idx_r, mu_r = agreement("rounded")
        idx_p, mu_p = agreement("plain")
        # The rounded float networks give the integer networks' means and indexes almost
        # everywhere (ties and float64 sums rarely round otherwise); the plain ones do not.
        assert idx_r > 0.999 and mu_r > 0.999, (idx_r, mu_r)
        assert mu_p < 0.1 and mu_r > mu_p + 0.5, (mu_p, mu_r)
    finally:
        handle.remove()
    assert model.coding_nets() is not nets


def test_training_steps_and_copies(model_and_grids):
    model, _, grids = model_and_grids
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = fake_quant.install(model, grids, DEFAULTS["weight_bits"])
    twin = copy.deepcopy(model)  # a weight average is a copy: it must round with its own weights
    x, *_ = _latents(model, 3)
    model.train()
    out = model(x, 2)
    rate = sum(-v.log2().sum() for v in out["likelihoods"].values())
    loss = rate / x[0, 0].numel() + 100 * torch.mean((out["x_hat"] - x) ** 2)
    loss.backward()
    for name in ("coder_h.param_nets.0.2", "h_s.0", "coder_l.lrp_nets.1.0", "cond_down_h"):
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name  # straight-through gradients
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    probe = torch.rand(1, grids["h_s.0"].in_scale.numel(), 2, 3, dtype=torch.float64)
    a = model.coding_nets().h_s[0](probe)
    b = twin.coding_nets().h_s[0](probe)
    assert not torch.equal(a, b)  # the copy uses its own (unchanged) weights
    twin_plain = twin.state_dict()
    assert set(twin_plain) == set(before)  # no new state: checkpoints stay those of the model
    handle.remove()
    assert set(model.state_dict()) == set(before)
    for name in ("h_s.0", "coder_h"):
        assert "forward" not in model.get_submodule(name).__dict__ and "lrp" not in model.get_submodule(name).__dict__


def test_install_refuses_a_wrong_module(model_and_grids):
    model, _, grids = model_and_grids
    model = copy.deepcopy(model)
    bad = {"h_s.1": grids["h_s.0"]}  # a GELU given a convolution's grid
    with pytest.raises(TypeError, match="h_s.1"):
        fake_quant.install(model, bad, DEFAULTS["weight_bits"])
