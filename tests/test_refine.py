"""Encoder-side latent refinement (dualres_ext.models.refine, ``encode(..., refine_steps=N)``).

With the shipped weights on a crop of the bundled photo: refinement only pays where the
analysis is a trained one, and the claims checked here (lower loss, smaller or better streams)
are about real pictures."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dualres_ext import codec
from dualres_ext.models import build
from dualres_ext.models.refine import _synthesis_curvature, rd_losses, refine_latents
from dualres_ext.tools.demo import BUNDLED_PHOTO
from dualres_ext.tools.metrics import psnr


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.open(BUNDLED_PHOTO).convert("RGB"))[64:192, 32:224]  # 128 x 192


@pytest.fixture(scope="module")
def model():
    # The refinement measures the float64 coding path (refined encodes write version 3), so the
    # eval-mode forward it is compared with must run that path: no exact networks.
    m = build("compact", pretrained=True)
    m.exact = None
    return m


def _tensor(image):
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255


def _latents(model, x, quality):
    with torch.no_grad():
        y_h, y_l = model.analysis(x, quality)
        return y_h, y_l, model.hyper_analysis(y_h, y_l)


def _real_loss(model, image, data, quality):
    """What refinement minimises, measured on the stream: bits per pixel + lmbda * 255^2 * MSE
    of the decoded 8-bit picture."""
    rec = codec.decode(data, output="numpy").astype(np.float64)
    mse = np.mean((rec - image.astype(np.float64)) ** 2) / 255**2
    return 8 * len(data) / (image.shape[0] * image.shape[1]) + model.lmbda(quality) * 255**2 * mse


def test_lmbda_is_the_trained_lambda_and_interpolates_log_linearly(model):
    for q, lam in enumerate(model.lambdas):
        assert model.lmbda(q) == pytest.approx(lam, rel=1e-12)
    mid = model.lmbda(2.5)
    assert mid == pytest.approx(math.sqrt(model.lambdas[2] * model.lambdas[3]), rel=1e-9)
    with pytest.raises(ValueError, match="quality must lie in"):
        model.lmbda(model.num_qualities - 0.5)


@pytest.mark.parametrize("quality", [0, 2.5, 5])
def test_exact_loss_is_what_forward_measures(model, photo, quality):
    """rd_losses' exact loss of the unrefined latents equals the eval-mode forward's (the float64
    coding path): same rate from the likelihoods, same distortion."""
    x = _tensor(photo)
    with torch.no_grad():
        out = model(x, quality)
        bits = sum(-torch.log2(lik.double()).sum() for lik in out["likelihoods"].values())
        mse = (out["x_hat"].clamp(0, 1) - x).pow(2).mean()
        expected = float(bits / (x.size(2) * x.size(3)) + model.lmbda(quality) * 255**2 * mse)
        descent, exact = rd_losses(model, x, quality, *_latents(model, x, quality))
    assert exact.shape == (1,)
    assert float(exact[0]) == pytest.approx(expected, rel=2e-4)
    assert float(descent[0]) == pytest.approx(float(exact[0]), rel=1e-6)  # no noise: the same loss


def test_refinement_lowers_each_images_loss_and_leaves_the_model_alone(model, photo):
    x = torch.cat([_tensor(photo), _tensor(photo[:, ::-1])])  # two different pictures, one batch
    start = _latents(model, x, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refined = refine_latents(model, x, 3, start, steps=6)
    with torch.no_grad():
        loss0 = rd_losses(model, x, 3, *start)[1]
        loss1 = rd_losses(model, x, 3, *refined)[1]
    assert torch.all(loss1 < loss0), (loss0, loss1)  # per image, not only on average
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(a.shape == b.shape and not a.requires_grad for a, b in zip(refined, start))


@pytest.mark.parametrize("quality", [0, 4])
def test_discrete_rounds_lower_the_loss_below_the_gradient_steps(model, photo, quality):
    """The rounds after the gradient steps only keep moves that lower the exact loss, and on a
    real picture they find some."""
    x = _tensor(photo)
    start = _latents(model, x, quality)
    steps_only = refine_latents(model, x, quality, start, steps=4, flip_rounds=0)
    with_rounds = refine_latents(model, x, quality, start, steps=4, flip_rounds=2)
    with torch.no_grad():
        loss_steps = float(rd_losses(model, x, quality, *steps_only)[1])
        loss_rounds = float(rd_losses(model, x, quality, *with_rounds)[1])
    assert loss_rounds < loss_steps
    # The rounds move y_H / y_L by whole bins (one per round at most), never z.
    assert torch.equal(with_rounds[2], steps_only[2])
    moved = [(a - b) for a, b in zip(with_rounds[:2], steps_only[:2])]
    assert any(bool(torch.any(d != 0)) for d in moved)
    for d in moved:
        assert torch.all((d - d.round()).abs() < 1e-4) and float(d.abs().max()) <= 2


def test_delta_bits_are_the_change_of_each_elements_own_bits(model, photo):
    """rd_losses' per-element bit changes: moving one element of the last slice of y_L (no later
    slice sees it) by one bin changes the total exact rate by exactly the collected amount."""
    x = _tensor(photo)
    y_h, y_l, z = _latents(model, x, 2)
    collect = {}
    with torch.no_grad():
        rd_losses(model, x, 2, y_h, y_l, z, collect=collect)
    up, down = collect["delta_bits"][1]
    assert up.shape == y_l.shape and down.shape == y_l.shape
    assert torch.all(torch.isfinite(up)) and bool(torch.any(up != 0))
    pixels = x.size(2) * x.size(3)

    class NoSynthesis:  # the same model with a constant picture: the loss is then the rate only
        def __getattr__(self, name):
            return getattr(model, name)

        def synthesis(self, a, b, quality):
            return torch.zeros(a.size(0), 3, 16 * b.size(2), 16 * b.size(3))

    rate_only = NoSynthesis()
    with torch.no_grad():
        base = float(rd_losses(rate_only, x, 2, y_h, y_l, z)[1])
        for c, i, j in [(y_l.size(1) - 1, 2, 3), (y_l.size(1) - 5, 4, 7)]:
            for delta, table in ((1, up), (-1, down)):
                moved = y_l.clone()
                moved[0, c, i, j] += delta
                change = float(rd_losses(rate_only, x, 2, y_h, moved, z)[1]) - base
                # float32 sums of ~10^4 bits: about 0.1 bit of rounding in the difference
                assert change == pytest.approx(float(table[0, c, i, j]), abs=0.25 / pixels)


def test_synthesis_curvature_matches_a_linear_synthesis():
    """The Hutchinson estimate of half the Gauss-Newton diagonal, on a synthesis whose Jacobian is
    known: a 3x3 convolution, whose diagonal of J^T J is, away from the borders, the sum of the
    squared weights leaving each input channel."""
    torch.manual_seed(0)
    conv_h = torch.nn.Conv2d(4, 3, 3, padding=1, bias=False)
    conv_l = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)

    class Linear:
        def synthesis(self, a, b, quality):
            return conv_h(a) + torch.nn.functional.interpolate(conv_l(b), scale_factor=2)

    y_h, y_l = torch.randn(1, 4, 96, 96), torch.randn(1, 2, 48, 48)
    weight = 7.0
    gen = torch.Generator().manual_seed(1)
    est_h, est_l = _synthesis_curvature(Linear(), (y_h, y_l), 0, (96, 96), weight, gen)
    n = 3 * 96 * 96  # the MSE's denominator
    # Interior elements of y_H: sum over output channels and taps of W^2 (borders lose taps).
    exact_h = conv_h.weight.detach().pow(2).sum((0, 2, 3)) * weight / n
    # y_L's output is upsampled 2x: each conv output reaches 4 pixels.
    exact_l = 4 * conv_l.weight.detach().pow(2).sum((0, 2, 3)) * weight / n
    assert est_h.shape == (1, 4, 1, 1) and est_l.shape == (1, 2, 1, 1)
    # 1 probe, ~9k (y_H) and ~2k (y_L) positions per channel, plus the border's missing taps.
    assert torch.allclose(est_h.flatten(), exact_h, rtol=0.1)
    assert torch.allclose(est_l.flatten(), exact_l, rtol=0.15)


def test_rounds_alone_lower_the_loss_from_the_analysis_latents(model, photo):
    """steps=0 with rounds: the discrete rounds start from the analysis' latents (no gradient
    step runs, so z is untouched) and lower the exact loss; no steps and no rounds is no change."""
    x = _tensor(photo)
    start = _latents(model, x, 2)
    untouched = refine_latents(model, x, 2, start, steps=0, flip_rounds=0)
    assert all(torch.equal(a, b) for a, b in zip(untouched, start))
    rounds_only = refine_latents(model, x, 2, start, steps=0, flip_rounds=2)
    with torch.no_grad():
        loss0 = float(rd_losses(model, x, 2, *start)[1])
        loss1 = float(rd_losses(model, x, 2, *rounds_only)[1])
    assert loss1 < loss0
    assert torch.equal(rounds_only[2], start[2])
    for a, b in zip(rounds_only[:2], start[:2]):
        d = a - b
        assert torch.all((d - d.round()).abs() < 1e-4)


def test_refine_rounds_reach_the_stream(model, photo):
    """encode's refine_rounds: the default is three rounds after gradient steps and none without;
    0 turns them off, a number alone runs them without gradient steps."""
    from dualres_ext.models.refine import REFINE_FLIP_ROUNDS, check_refinement

    assert REFINE_FLIP_ROUNDS == 3
    assert check_refinement(2, None) == (2, 3) and check_refinement(0, None) == (0, 0)
    assert check_refinement(0, 4) == (0, 4)
    steps_default = codec.encode(photo, quality=1, refine_steps=2)
    assert codec.encode(photo, quality=1, refine_steps=2, refine_rounds=3) == steps_default
    steps_no_rounds = codec.encode(photo, quality=1, refine_steps=2, refine_rounds=0)
    assert steps_no_rounds != steps_default
    plain = codec.encode(photo, quality=1)
    assert codec.encode(photo, quality=1, refine_rounds=0) == plain
    rounds_only = codec.encode(photo, quality=1, refine_rounds=2)
    assert rounds_only != plain
    assert _real_loss(model, photo, rounds_only, 1) < _real_loss(model, photo, plain, 1)
    assert _real_loss(model, photo, steps_default, 1) < _real_loss(model, photo, steps_no_rounds, 1)


def test_refined_streams_are_ordinary_streams_with_a_lower_loss(model, photo):
    for quality in (0, 4):
        plain = codec.encode(photo, quality=quality)
        refined = codec.encode(photo, quality=quality, refine_steps=8)
        assert refined != plain
        assert codec.parse_header(refined)["quality"] == quality
        rec = codec.decode(refined, output="numpy")  # the plain decoder reads it
        assert rec.shape == photo.shape and psnr(photo, rec) > 25
        assert _real_loss(model, photo, refined, quality) < _real_loss(model, photo, plain, quality)


def test_refinement_is_reproducible_and_zero_steps_is_off(photo):
    a = codec.encode(photo, quality=1, refine_steps=3)
    assert codec.encode(photo, quality=1, refine_steps=3) == a
    assert codec.encode(photo, quality=1, refine_steps=0) == codec.encode(photo, quality=1)


def test_refinement_ignores_the_padding(model, photo):
    """A picture that is not a multiple of 64 is padded; refinement scores only the picture, so
    the pixels of a padded encode are scored as the picture's (the stream still decodes to it)."""
    crop = photo[:100, :150]
    data = codec.encode(crop, quality=2, refine_steps=4)
    rec = codec.decode(data, output="numpy")
    assert rec.shape == crop.shape
    assert _real_loss(model, crop, data, 2) < _real_loss(model, crop, codec.encode(crop, quality=2), 2)


def test_rate_control_with_refinement_fits(photo):
    limit = len(codec.encode(photo, quality=2))
    data = codec.encode(photo, max_bytes=limit, refine_steps=2)
    assert len(data) <= limit and codec.parse_header(data)["quality"] >= 1.5


@pytest.mark.parametrize("steps, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)])
def test_bad_refine_steps_are_refused_by_name(photo, steps, error):
    with pytest.raises(error, match="refine_steps"):
        codec.encode(photo, quality=1, refine_steps=steps)


@pytest.mark.parametrize("rounds, error", [(-1, ValueError), (2.0, TypeError), (None, TypeError)])
def test_bad_flip_rounds_are_refused_by_name(model, photo, rounds, error):
    x = _tensor(photo)
    with pytest.raises(error, match="flip_rounds"):
        refine_latents(model, x, 1, _latents(model, x, 1), steps=1, flip_rounds=rounds)


@pytest.mark.parametrize("rounds, error", [(-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_refine_rounds_are_refused_by_name(photo, rounds, error):
    with pytest.raises(error, match="refine_rounds"):
        codec.encode(photo, quality=1, refine_steps=1, refine_rounds=rounds)


def test_bad_learning_rate_is_refused(model, photo):
    x = _tensor(photo)
    for lr in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lr must be a positive number"):
            refine_latents(model, x, 1, _latents(model, x, 1), steps=1, lr=lr)


def test_cli_compress_refines(tmp_path, photo):
    from dualres_ext.__main__ import main

    src = tmp_path / "crop.png"
    Image.fromarray(photo).save(src)
    out = tmp_path / "crop.drx"
    assert main(["compress", str(src), str(out), "-q", "1", "--refine-steps", "2"]) == 0
    assert out.read_bytes() == codec.encode(photo, quality=1, refine_steps=2)
    assert main(["compress", str(src), str(out), "-q", "1", "--refine-steps", "2", "--refine-rounds", "0"]) == 0
    assert out.read_bytes() == codec.encode(photo, quality=1, refine_steps=2, refine_rounds=0)
