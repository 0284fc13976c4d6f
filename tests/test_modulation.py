"""The per-quality channel modulation (DualRes(modulation=True)): what it computes against a float64
reference, that a trained model gains it at the identity (dualres_ext.models.widen.add_modulation),
that only the qualities used train it, and that its streams decode to what ``forward`` predicts."""

import os
import sys

import pytest
import torch

from dualres_ext.models import build
from dualres_ext.models.dualres import MODULATED_LAYERS, QualityModulation
from dualres_ext.models.widen import add_modulation, widen

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_testlib import TINY  # noqa: E402
from test_widen import trained_like  # noqa: E402  (weights away from their initialisation)


def randomise_modulation(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("modulation."):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_modulation_against_a_float64_reference():
    torch.manual_seed(0)
    mod = QualityModulation(7, 4)
    with torch.no_grad():
        mod.log_scale.normal_(0, 0.5)
        mod.shift.normal_(0, 0.5)
    model = build("compact", **TINY, lambdas=(1e-3, 2e-3, 4e-3, 8e-3), modulation=True)
    x = torch.randn(3, 7, 5, 6)
    s, b = mod.log_scale.double(), mod.shift.double()
    for q in (0, 1.25, 2.5, 3):
        point = model._quality_point(q, x.device, x.dtype)
        lo, t = int(q // 1), q - int(q // 1)
        hi = min(lo + 1, 3)
        ref = (
            x.double() * torch.exp(s[lo] * (1 - t) + s[hi] * t)[None, :, None, None]
            + (b[lo] * (1 - t) + b[hi] * t)[None, :, None, None]
        )
        torch.testing.assert_close(mod(x, point).double(), ref, rtol=1e-5, atol=1e-6)
    # Per-sample qualities: each sample gets its own row.
    point = model._quality_point(torch.tensor([0.0, 2.5, 3.0]), x.device, x.dtype)
    out = mod(x, point)
    for i, q in enumerate((0, 2.5, 3)):
        torch.testing.assert_close(out[i : i + 1], mod(x[i : i + 1], model._quality_point(q, x.device, x.dtype)))


def test_a_model_gains_the_modulation_at_the_identity():
    old = trained_like()
    new = add_modulation(old).eval()
    new.update(force=True)
    assert new.config["modulation"] is True and old.modulation is None
    assert set(new.modulation) == {f"{s}_{i}" for s, layers in MODULATED_LAYERS.items() for i in layers}
    # The other parameters keep their order (a checkpoint's Adam state is indexed by it).
    old_names = [n for n, _ in old.named_parameters()]
    assert [n for n, _ in new.named_parameters()][: len(old_names)] == old_names
    x = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for q in (0, 2.5, old.num_qualities - 1):
            a, b = old(x, q), new(x, q)
            torch.testing.assert_close(b["x_hat"], a["x_hat"], rtol=0, atol=0)
            for k in a["likelihoods"]:
                torch.testing.assert_close(b["likelihoods"][k], a["likelihoods"][k], rtol=0, atol=0)
        assert new.compress(x, 3)["strings"] == old.compress(x, 3)["strings"]
    with pytest.raises(ValueError, match="already has"):
        add_modulation(new)


def test_modulation_changes_only_its_quality_and_decodes_as_forward_predicts():
    model = add_modulation(trained_like()).eval()
    plain = trained_like()  # the same weights without modulation
    with torch.no_grad():
        for m in model.modulation.values():
            m.log_scale[5].normal_(0, 0.3)
            m.shift[5].normal_(0, 0.3)
    model.update(force=True)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x, 3)["x_hat"], plain(x, 3)["x_hat"], rtol=0, atol=0)
        assert (model(x, 5)["x_hat"] - plain(x, 5)["x_hat"]).abs().max() > 1e-2
        assert (model(x, 4.5)["x_hat"] - plain(x, 4.5)["x_hat"]).abs().max() > 1e-3
        predicted = model(x, 4.5)["x_hat"]
        coded = model.compress(x, 4.5)
        torch.testing.assert_close(
            model.decompress(coded["strings"], coded["shape"], 4.5)["x_hat"], predicted, rtol=0, atol=0
        )


def test_only_the_qualities_used_train_the_modulation():
    torch.manual_seed(0)
    model = build("compact", **TINY, modulation=True).train()
    x = torch.rand(2, 3, 64, 64)
    out = model(x, torch.tensor([1.0, 4.5]))
    bpp = sum(-v.log2().sum() for v in out["likelihoods"].values()) / (2 * 64 * 64)
    (bpp + 0.01 * 255**2 * torch.nn.functional.mse_loss(out["x_hat"], x)).backward()
    for name, m in model.modulation.items():
        for p in (m.log_scale, m.shift):
            used = p.grad.abs().sum(1)
            assert used[1] > 0 and used[4] > 0 and used[5] > 0, name
            assert used[0] == 0 and used[2] == 0 and used[3] == 0, name


def test_widening_a_modulated_model_keeps_its_pictures():
    old = randomise_modulation(add_modulation(trained_like())).eval()
    old.update(force=True)
    new = widen(old, N=48, N1=24, N_s=48, N1_s=24, generator=torch.Generator().manual_seed(1)).eval()
    new.update(force=True)
    assert new.modulation["g_a_stem_1"].log_scale.shape == (6, 24)
    assert new.modulation["g_s_4"].shift.shape == (6, 24)
    # Old channels keep their entries, new ones start at the identity.
    torch.testing.assert_close(new.modulation["g_s_2"].log_scale[:, :32], old.modulation["g_s_2"].log_scale)
    assert new.modulation["g_s_2"].log_scale[:, 32:].abs().max() == 0
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for q in (0, 3.5, 5):
            torch.testing.assert_close(new(x, q)["x_hat"], old(x, q)["x_hat"], rtol=0, atol=2e-5)
