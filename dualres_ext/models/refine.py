"""Encoder-side latent refinement: optimise one image's latents for its own rate-distortion loss.

The analysis networks are trained to give good latents on average over the training photos; for
one given image, gradient descent on the latents themselves finds better ones (the "amortisation
gap": Campos et al. 2019, Yang et al. 2020). The decoder is unchanged -- it decodes whatever
latents the encoder coded -- so refined streams are ordinary streams. The cost is encoding time:
each step is a forward and backward pass of everything after the analysis.

The loss is the training objective of that quality, ``bits / pixels + lmbda * 255^2 * MSE``:
the rate from the likelihoods of ``y + noise`` (additive uniform noise, as in training: rounding
has no gradient) and the distortion from the exact decoded picture (``round(y - mu) + mu`` with a
straight-through gradient, as in training). The noisy rate is only the descent direction: every
step also evaluates the *exact* loss -- the likelihoods of the rounded latents, which are the
ones the coder spends bits on -- and the latents with the lowest exact loss are kept, the starting
point included. So refining never makes a stream worse by its own measure (up to the rANS coder's
~0.3% overhead and float32 vs the coder's float64, both the same for every candidate).

The noise is drawn from a fixed seed: refining the same image on the same machine gives the same
stream. float32 gradients differ across devices and thread counts, so a refined stream may differ
between machines (the decoder reads any of them; only unrefined encoding is bit-reproducible).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .dualres import ste_round

REFINE_LR = 0.01
"""Adam's step size for the latents ``y_H`` and ``y_L``, in quantisation bins (the latents are
scaled so that one bin is 1 at every quality); it decays linearly to 0 over the steps."""

REFINE_Z_LR_SCALE = 5.0
"""The hyper-latent ``z`` steps this many times further than ``y``. Measured (docs/TRAINING.md,
session 11): ``y`` gets worse beyond about 0.01 -- its roundings flip and the exact loss rises --
while ``z``, which only moves the scales and means, gains most at about 0.05; both at 0.01 leave
15-35% of the gain behind, and 0.2 for ``z`` loses most of it."""

REFINE_SEED = 0


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"refine_steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {steps}")
    return steps


def rd_losses(model, x: torch.Tensor, quality, y_h, y_l, z, noise: Optional[Sequence[torch.Tensor]] = None,
              size: Optional[Tuple[int, int]] = None):
    """Per-image rate-distortion losses of the latents ``(y_h, y_l, z)`` for picture ``x``.

    Returns ``(descent, exact)``, both (B,): ``descent`` has the rate of ``latent + noise``
    (``noise``: one tensor per latent, or None for the exact rate) and is differentiable;
    ``exact`` is the loss of the rounded latents (no gradient), what :meth:`DualRes.forward` in
    eval mode measures. ``size`` (h, w): the picture part of ``x``; distortion and pixel count
    cover only that part.
    """
    gc, eb = model.gaussian_conditional, model.entropy_bottleneck
    h, w = size if size is not None else x.shape[-2:]
    pixels = float(h * w)

    def bits(likelihood):
        return -torch.log2(likelihood).flatten(1).sum(1)

    off = model._z_offset().view(1, -1, 1, 1)
    z_hat = ste_round(z - off) + off
    exact_bits = bits(eb.likelihood(z_hat)).detach()
    descent_bits = exact_bits if noise is None else bits(eb.likelihood(z + noise[2]))
    f_h, f_l = model._hyper_synthesis(z_hat)

    def latent(coder, y, features, extra, y_noise):
        nonlocal exact_bits, descent_bits
        decoded = []
        base = [features] if extra is None else [features, extra]
        pieces = y.split(coder.slices, 1)
        noises = y_noise.split(coder.slices, 1) if y_noise is not None else [None] * len(pieces)
        for i, (y_s, n_s) in enumerate(zip(pieces, noises)):
            scales, means, feat = coder.params(i, torch.cat(base + decoded, 1))
            y_hat = ste_round(y_s - means) + means
            exact = bits(gc.likelihood(y_hat.detach(), scales.detach(), means.detach()))
            exact_bits = exact_bits + exact
            descent_bits = descent_bits + (exact if n_s is None else bits(gc.likelihood(y_s + n_s, scales, means)))
            decoded.append(coder.lrp(i, feat, y_hat))
        return torch.cat(decoded, 1)

    y_h_hat = latent(model.coder_h, y_h, f_h, None, None if noise is None else noise[0])
    y_l_hat = latent(model.coder_l, y_l, f_l, model.cond_down_h(y_h_hat), None if noise is None else noise[1])
    x_hat = model._synthesis(y_h_hat, y_l_hat, quality).clamp(0, 1)[..., :h, :w]
    mse = (x_hat - x[..., :h, :w]).pow(2).flatten(1).mean(1)
    weight = model.lmbda(quality) * 255 ** 2
    return descent_bits / pixels + weight * mse, (exact_bits / pixels + weight * mse).detach()


def refine_latents(model, x: torch.Tensor, quality, latents, steps: int, lr: float = REFINE_LR,
                   size: Optional[Tuple[int, int]] = None):
    """``steps`` Adam steps on the latents ``(y_h, y_l, z)`` (as the model's analysis gives them
    for ``x`` at ``quality``); returns the latents with the lowest exact loss seen, per image.
    ``lr`` is the step size of ``y_h`` and ``y_l``; ``z``'s is ``lr * REFINE_Z_LR_SCALE``.

    The model's weights are not changed (nor given gradients).
    """
    steps = _check_steps(steps)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    params = [t.detach().clone().requires_grad_(True) for t in latents]
    best = [t.detach().clone() for t in latents]
    if steps == 0:
        return tuple(best)
    scales = (1.0, 1.0, REFINE_Z_LR_SCALE)
    opt = torch.optim.Adam([{"params": [p], "lr_scale": k} for p, k in zip(params, scales)], lr=lr)
    gen = torch.Generator(device=x.device).manual_seed(REFINE_SEED)
    best_loss = None

    def keep_the_better(exact):
        nonlocal best_loss
        better = torch.ones_like(exact, dtype=torch.bool) if best_loss is None else exact < best_loss
        best_loss = exact if best_loss is None else torch.where(better, exact, best_loss)
        for b, p in zip(best, params):
            b.copy_(torch.where(better.view(-1, *([1] * (p.dim() - 1))), p.detach(), b))

    for step in range(steps):
        noise = [torch.rand(p.shape, generator=gen, device=p.device, dtype=p.dtype) - 0.5 for p in params]
        descent, exact = rd_losses(model, x, quality, *params, noise=noise, size=size)
        keep_the_better(exact)
        grads = torch.autograd.grad(descent.sum(), params)
        for p, g in zip(params, grads):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = group["lr_scale"] * lr * (1 - step / steps)
        opt.step()
    with torch.no_grad():  # the last step's latents: only their exact loss is needed
        keep_the_better(rd_losses(model, x, quality, *params, size=size)[1])
    return tuple(best)
