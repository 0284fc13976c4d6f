"""Widening a trained model's analysis or synthesis (dualres_ext.models.widen): same pictures, same
symbols, and the new channels start learning."""

import os
import sys

import pytest
import torch

from dualres_ext.models import build
from dualres_ext.models.widen import synthesis_widths, widen, widen_synthesis, widen_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_testlib import TINY  # noqa: E402  (a small configuration keeps the tests fast)


def trained_like(seed=0, **kw):
    """A tiny model whose weights are not at their initialisation: GDN's gamma full (not a
    diagonal), biases non-zero, so that a wrongly placed or leaking entry shows in the output."""
    torch.manual_seed(seed)
    m = build("compact", **{**TINY, **kw})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.3 * torch.rand_like(p))
            elif name.endswith("beta"):
                p.copy_(0.5 + torch.rand_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif "gain" not in name and not name.endswith("quantiles"):
                p.mul_(1.5).add_(0.02 * torch.randn_like(p))
    m.update(force=True)
    return m.eval()


@pytest.mark.parametrize(
    "widths",
    [
        dict(N_s=48, N1_s=24),
        dict(N1_s=32, k1_s=5),
        dict(N_s=40),
        dict(N=48, N1=24),
        dict(k1=5),
        dict(N=40, N1=24, k1=5, N_s=48),
    ],
)
def test_widened_model_decodes_the_same_pictures_from_the_same_symbols(widths):
    old = trained_like()
    new = widen(old, **widths, generator=torch.Generator().manual_seed(1)).eval()
    new.update(force=True)
    for key, value in widths.items():
        assert new.config[key] == value
    assert new.g_s[-1].weight.shape[0] == new.config["N1_s"]
    x = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for q in (0, 2.5, old.num_qualities - 1):
            a, b = old(x, q), new(x, q)
            assert a["x_hat"].abs().max() > 0.1  # a real picture, not a degenerate one
            torch.testing.assert_close(b["x_hat"], a["x_hat"], rtol=0, atol=2e-5)
            for k in a["likelihoods"]:  # analysis widening may only reorder float32 sums
                torch.testing.assert_close(b["likelihoods"][k], a["likelihoods"][k], rtol=1e-5, atol=0)
        coded = old.compress(x[:1], 3)
        assert new.compress(x[:1], 3)["strings"] == coded["strings"]
        torch.testing.assert_close(
            new.decompress(coded["strings"], coded["shape"], 3)["x_hat"],
            old.decompress(coded["strings"], coded["shape"], 3)["x_hat"],
            rtol=0,
            atol=2e-5,
        )


def test_new_entries_are_cut_from_old_channels_and_old_weights_keep_their_place():
    old = trained_like()
    new = widen_synthesis(old, N_s=48, N1_s=24, k1_s=5)
    n, n1, mh = 32, 16, 24
    # Fusion 1x1 (out, in): the ŷ_H inputs move behind the 48 (was 32) ŷ_L channels.
    fuse_old, fuse_new = old.g_s[0].weight, new.g_s[0].weight
    assert torch.equal(fuse_new[:n, :n], fuse_old[:, :n])
    assert torch.equal(fuse_new[:n, 48 : 48 + mh], fuse_old[:, n:])
    assert torch.all(fuse_new[:n, n:48] == 0)  # new ŷ_L channels -> old outputs
    assert fuse_new[n:].abs().sum() > 0  # new outputs start initialised, not dead
    # The 3x3 kernel in the middle of the 5x5 one, the border cut for old outputs.
    k_old, k_new = old.g_s[3].weight, new.g_s[3].weight  # (in, out, k, k)
    assert torch.equal(k_new[:n, :n1, 1:4, 1:4], k_old)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[1:4, 1:4] = False
    assert torch.all(k_new[:, :n1][..., border] == 0)
    assert torch.all(k_new[n:, :n1] == 0)
    # IGDN: old channels are not normalised by new ones; new channels get GDN's initialisation.
    gdn = new.g_s[4]
    gamma = gdn.gamma_reparam(gdn.gamma)
    assert torch.all(gamma[:n1, n1:] == 0)
    torch.testing.assert_close(gamma[:n1, :n1], old.g_s[4].gamma_reparam(old.g_s[4].gamma))
    torch.testing.assert_close(gdn.beta_reparam(gdn.beta)[n1:], torch.ones(24 - n1))
    # The last layer reads nothing from the new channels yet.
    assert torch.all(new.g_s[5].weight[n1:] == 0)
    # Analysis and entropy model untouched.
    for name, t in old.state_dict().items():
        if not name.startswith(("g_s.", "g_s_up_l.")):
            assert torch.equal(new.state_dict()[name], t), name


def test_analysis_widening_cuts_new_channels_from_the_latents_and_keeps_old_weights_in_place():
    old = trained_like()
    new = widen(old, N=48, N1=24, k1=5)
    n, n1 = 32, 16
    assert (new.config["N_s"], new.config["N1_s"]) == (32, 16)  # the synthesis keeps its widths
    stem0_old, stem0_new = old.g_a_stem[0].weight, new.g_a_stem[0].weight  # (out, in, k, k)
    assert torch.equal(stem0_new[:n1], stem0_old)
    assert stem0_new[n1:].abs().sum() > 0  # new channels read the image from the start
    # The 3x3 kernel in the middle of the 5x5 one; new inputs and the border cut for old outputs.
    k_old, k_new = old.g_a_stem[2].weight, new.g_a_stem[2].weight
    assert torch.equal(k_new[:n, :n1, 1:4, 1:4], k_old)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[1:4, 1:4] = False
    assert torch.all(k_new[:n][..., border] == 0)
    assert torch.all(k_new[:n, n1:] == 0)
    assert k_new[n:, n1:].abs().sum() > 0
    # GDN: old channels are not normalised by new ones.
    for gdn_new, gdn_old, c in (
        (new.g_a_stem[1], old.g_a_stem[1], n1),
        (new.g_a_stem[3], old.g_a_stem[3], n),
        (new.g_a_l[1], old.g_a_l[1], n),
    ):
        gamma = gdn_new.gamma_reparam(gdn_new.gamma)
        assert torch.all(gamma[:c, c:] == 0)
        torch.testing.assert_close(gamma[:c, :c], gdn_old.gamma_reparam(gdn_old.gamma))
    # The latents read nothing from the new channels yet; the hidden stride-8 layer's old
    # outputs neither.
    for conv_new, conv_old in ((new.g_a_h, old.g_a_h), (new.g_a_l[2], old.g_a_l[2])):
        assert torch.equal(conv_new.weight[:, :n], conv_old.weight)
        assert torch.all(conv_new.weight[:, n:] == 0)
        assert torch.equal(conv_new.bias, conv_old.bias)
    assert torch.all(new.g_a_l[0].weight[:n, n:] == 0)
    # Synthesis and entropy model untouched.
    for name, t in old.state_dict().items():
        if not name.startswith(("g_a_stem.", "g_a_h.", "g_a_l.")):
            assert torch.equal(new.state_dict()[name], t), name


def test_new_channels_start_learning():
    new = widen_synthesis(trained_like(), N_s=48, N1_s=24).train()
    opt = torch.optim.Adam(new.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # the first step opens the last layer, the second the layers before it
        out = new(x, 3)
        opt.zero_grad()
        ((out["x_hat"] - x) ** 2).mean().backward()
        opt.step()
    assert new.g_s[5].weight[16:].abs().max() > 0
    assert new.g_s[3].weight.grad[:, 16:].abs().max() > 0


def test_new_analysis_channels_start_learning():
    new = widen(trained_like(), N=48, N1=24).train()
    opt = torch.optim.Adam(new.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # the first step opens the latents' layers, the second the layers before
        out = new(x, 3)
        opt.zero_grad()
        ((out["x_hat"] - x) ** 2).mean().backward()
        opt.step()
    assert new.g_a_h.weight[:, 32:].abs().max() > 0 and new.g_a_l[2].weight[:, 32:].abs().max() > 0
    assert new.g_a_stem[2].weight.grad[:, 16:].abs().max() > 0


def test_widening_refuses_to_shrink_and_leaves_other_tensors_alone():
    old = trained_like()
    with pytest.raises(ValueError, match="can only grow"):
        widen_synthesis(old, N1_s=8)
    with pytest.raises(ValueError, match="can only grow"):
        widen(old, N=16)
    with pytest.raises(ValueError, match="cannot be centred"):
        widen_synthesis(trained_like(k1=5, k1_s=5), k1_s=3)
    with pytest.raises(ValueError, match="cannot be centred"):
        widen(trained_like(k1=5), k1=3)
    with pytest.raises(TypeError, match="not a width"):
        widen(old, M_H=32)
    t = torch.randn(3, 4)
    assert widen_tensor("h_a.0.weight", t, torch.zeros(5), old.config, old.config) is t
    with pytest.raises(ValueError, match="does not match"):
        widen_tensor("g_s.1.bias", torch.zeros(7), torch.zeros(48), old.config, dict(old.config, N_s=48))


@pytest.mark.parametrize("widths", [dict(N_s=32, N1_s=16, k1_s=3), dict(N_s=40, N1_s=24, k1_s=5)])
def test_synthesis_widths_are_read_from_the_shapes(widths):
    # Checkpoints from before the configuration was recorded in them say it through their shapes.
    assert synthesis_widths(build("compact", **{**TINY, **widths}).state_dict()) == widths
