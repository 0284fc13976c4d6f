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

Gradient steps on ``y`` must stay small (about 0.01 bins: beyond that its roundings flip at random
and the exact loss rises), so they only ever flip the roundings of latents that lie near a bin
boundary. After them come a few *discrete rounds* (rate-distortion optimised quantisation): for
every latent, the loss change of moving its quantised value one bin up or down is predicted --
the distortion's gradient and (Gauss-Newton) curvature at the decoded latents, the exact change of
its own bits -- and the best-predicted moves are made, at most one per 3 x 3 neighbourhood of a
latent (moves close together correct the same error and overshoot together). Predictions are
optimistic (they miss the moves' effect on later slices' scales and the synthesis' interactions),
so each round tries the best quarter, half and all of the moves and keeps whichever has the lowest
exact loss, or none.

The noise is drawn from a fixed seed: refining the same image on the same machine gives the same
stream. float32 gradients differ across devices and thread counts, so a refined stream may differ
between machines (the decoder reads any of them; only unrefined encoding is bit-reproducible).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .loss import DISTORTION_SCALE, bits, rd_loss
from .quantize import ste_round

REFINE_LR = 0.01
"""Adam's step size for the latents ``y_H`` and ``y_L``, in quantisation bins (the latents are
scaled so that one bin is 1 at every quality); it decays linearly to 0 over the steps."""

REFINE_Z_LR_SCALE = 5.0
"""The hyper-latent ``z`` steps this many times further than ``y``: ``y`` gets worse beyond about
0.01 (its roundings flip and the exact loss rises), while ``z``, which only moves the scales and
means, gains most at about 0.05 (docs/TRAINING.md, "Refinement")."""

REFINE_FLIP_ROUNDS = 3
"""At most this many discrete rounds after the gradient steps (each costs about four gradient
steps: one gradient, one curvature probe, six trial losses; they stop at a round that improves no
image). More rounds buy little compared with more gradient steps (docs/TRAINING.md,
"Refinement"), so ``refine_steps`` is the knob and three rounds the default."""

FLIP_WINDOW = 3
"""At most one move per this-many x this-many neighbourhood of a latent (all its channels)."""

FLIP_FRACTIONS = (0.25, 0.5, 1.0)
"""Each round's candidates: these shares of the moves, best-predicted first."""

REFINE_SEED = 0


def _check_steps(steps, name: str = "refine_steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}")
    return steps


def check_refinement(refine_steps, refine_rounds: Optional[int]) -> Tuple[int, int]:
    """``(steps, rounds)`` an encode runs, both checked: ``refine_rounds`` if given, else
    :data:`REFINE_FLIP_ROUNDS` after gradient steps and none without them (``refine_steps=0`` and
    no ``refine_rounds`` is the plain, bit-reproducible encoder)."""
    steps = _check_steps(refine_steps)
    if refine_rounds is None:
        return steps, REFINE_FLIP_ROUNDS if steps else 0
    return steps, _check_steps(refine_rounds, "refine_rounds")


def _distortion_weight(model, quality) -> float:
    """The weight of the MSE (pixels in [0, 1]) in the loss: the trained lambda times 255^2."""
    return model.lmbda(quality) * DISTORTION_SCALE


def rd_losses(
    model,
    x: torch.Tensor,
    quality,
    y_h,
    y_l,
    z,
    noise: Optional[Sequence[torch.Tensor]] = None,
    size: Optional[Tuple[int, int]] = None,
    collect: Optional[dict] = None,
):
    """Per-image rate-distortion losses of the latents ``(y_h, y_l, z)`` for picture ``x``.

    Returns ``(descent, exact)``, both (B,): ``descent`` has the rate of ``latent + noise``
    (``noise``: one tensor per latent, or None for the exact rate) and is differentiable;
    ``exact`` is the loss of the rounded latents (no gradient), what :meth:`DualRes.forward` in
    eval mode measures. ``size`` (h, w): the picture part of ``x``; distortion and pixel count
    cover only that part.

    Without noise, ``descent``'s gradient also carries the rate of later slices through their
    scales (the decoded latents are the context of the later slices).

    ``collect``: a dict that receives, for the discrete rounds, ``"y_hat"`` (the decoded ``y_H``,
    ``y_L``: the synthesis' inputs) and ``"delta_bits"``: per latent, the change of each element's
    own bits per pixel if its quantised value moved one bin up, and one bin down (no gradient).
    """
    gc, eb = model.gaussian_conditional, model.entropy_bottleneck
    h, w = size if size is not None else x.shape[-2:]
    pixels = float(h * w)
    off = model.z_offset().view(1, -1, 1, 1)
    z_hat = ste_round(z - off) + off
    exact_bits = bits(eb.likelihood(z_hat)).detach()
    descent_bits = exact_bits if noise is None else bits(eb.likelihood(z + noise[2]))
    delta_bits = []

    def measuring_step(y, coder, y_noise):
        """Quantises like the coder (with a straight-through gradient) and adds up the bits."""
        pieces = coder.split(y)
        noises = coder.split(y_noise) if y_noise is not None else [None] * len(pieces)
        ups, downs = [], []
        if collect is not None:
            delta_bits.append((ups, downs))

        def step(i, scales, means):
            nonlocal exact_bits, descent_bits
            y_s, n_s = pieces[i], noises[i]
            symbols = torch.round(y_s - means).detach()
            # The symbol is fixed; the scales and means still depend on earlier slices' ŷ.
            element_bits = -torch.log2(gc.likelihood(means + symbols, scales, means))
            exact = element_bits.flatten(1).sum(1)
            exact_bits = exact_bits + exact.detach()
            descent_bits = descent_bits + (exact if n_s is None else bits(gc.likelihood(y_s + n_s, scales, means)))
            if collect is not None:
                with torch.no_grad():
                    m, s, b = means.detach(), scales.detach(), element_bits.detach()
                    ups.append((-torch.log2(gc.likelihood(m + symbols + 1, s, m)) - b) / pixels)
                    downs.append((-torch.log2(gc.likelihood(m + symbols - 1, s, m)) - b) / pixels)
            return ste_round(y_s - means) + means

        return step

    y_h_hat, y_l_hat = model.decode_latents(
        z_hat,
        measuring_step(y_h, model.coder_h, None if noise is None else noise[0]),
        measuring_step(y_l, model.coder_l, None if noise is None else noise[1]),
    )
    if collect is not None:
        collect["delta_bits"] = [(torch.cat(ups, 1), torch.cat(downs, 1)) for ups, downs in delta_bits]
        collect["y_hat"] = (y_h_hat.detach(), y_l_hat.detach())
    x_hat = model.synthesis(y_h_hat, y_l_hat, quality).clamp(0, 1)[..., :h, :w]
    mse = (x_hat - x[..., :h, :w]).pow(2).flatten(1).mean(1)
    lmbda = model.lmbda(quality)
    return rd_loss(descent_bits / pixels, mse, lmbda), rd_loss(exact_bits / pixels, mse, lmbda).detach()


def _synthesis_curvature(model, y_hats, quality, size, weight: float, gen: torch.Generator):
    """Half the Gauss-Newton diagonal of the distortion ``weight * MSE`` with respect to each
    latent, averaged over each image's channel: ``weight / n * (J^T J)_ii`` for the synthesis'
    Jacobian ``J`` at ``y_hats``. One Hutchinson probe: for random signs ``v``, ``v * J^T J v``
    is unbiased for the diagonal, and a channel's thousands of positions average out its noise.
    ``J v`` is a finite difference (the synthesis is smooth at this scale), ``J^T`` a backward pass."""
    h, w = size
    probes = [torch.randint(0, 2, y.shape, generator=gen, device=y.device).to(y.dtype) * 2 - 1 for y in y_hats]
    eps = 1e-2
    inputs = [y.clone().requires_grad_(True) for y in y_hats]
    out = model.synthesis(*inputs, quality)[..., :h, :w]  # also the finite difference's base
    with torch.no_grad():
        moved = model.synthesis(*(y + eps * v for y, v in zip(y_hats, probes)), quality)[..., :h, :w]
        jv = (moved - out.detach()) / eps
    jtjv = torch.autograd.grad(out, inputs, grad_outputs=jv)
    per_element = weight / out[0].numel()
    return [(v * g).mean((2, 3), keepdim=True) * per_element for v, g in zip(probes, jtjv)]


def _flip_round(model, x, quality, latents, size, gen, best_loss):
    """One discrete round (module docstring) from ``latents``, whose exact loss is ``best_loss``
    (B,). Returns the new latents and losses, per image the better of the moves tried and none."""
    y_h, y_l, z = (t.detach() for t in latents)
    ys = [y_h.clone().requires_grad_(True), y_l.clone().requires_grad_(True)]
    collect: dict = {}
    descent, _ = rd_losses(model, x, quality, ys[0], ys[1], z, size=size, collect=collect)
    grads = torch.autograd.grad(descent.sum(), ys)
    weight = _distortion_weight(model, quality)
    curvature = _synthesis_curvature(model, collect["y_hat"], quality, size, weight, gen)
    predicted, moves, chosen = [], [], []
    for g, (up, down), c in zip(grads, collect["delta_bits"], curvature):
        gain_up, gain_down = g + up + c, -g + down + c  # predicted loss change of +1 / -1 bin
        pred = torch.minimum(gain_up, gain_down)
        best_channel = pred.min(1, keepdim=True).values  # one channel per position ...
        local_best = -F.max_pool2d(-best_channel, FLIP_WINDOW, 1, FLIP_WINDOW // 2)  # ... per window
        chosen.append((pred <= best_channel) & (best_channel <= local_best) & (best_channel < 0))
        predicted.append(pred)
        moves.append(torch.where(gain_up < gain_down, 1.0, -1.0).to(g.dtype))
    # The two latents' moves are tried separately: y_H's also shift y_L's scales and means (its
    # context), which the predictions miss, and on some pictures they all fail where y_L's pay.
    batch = x.size(0)
    current, loss = [y_h, y_l, z], best_loss.clone()
    for which, (pred, move, mask) in enumerate(zip(predicted, moves, chosen)):
        ranked = torch.where(mask, pred, torch.inf).flatten(1).sort(1).values
        count = mask.flatten(1).sum(1)
        start = current[which]  # each share is tried from here, not on top of the last one
        for fraction in FLIP_FRACTIONS:
            k = torch.clamp((count.double() * fraction).ceil().long(), min=1) - 1
            threshold = ranked.gather(1, k.view(-1, 1)).view(batch, 1, 1, 1)  # inf: no candidate
            trial = list(current)
            trial[which] = start + move * ((pred <= threshold) & mask).to(move.dtype)
            with torch.no_grad():
                trial_loss = rd_losses(model, x, quality, *trial, size=size)[1]
            better = trial_loss < loss
            loss = torch.where(better, trial_loss, loss)
            current = [torch.where(better.view(-1, 1, 1, 1), t, c) for t, c in zip(trial, current)]
    return current, loss


def refine_latents(
    model,
    x: torch.Tensor,
    quality,
    latents,
    steps: int,
    lr: float = REFINE_LR,
    size: Optional[Tuple[int, int]] = None,
    flip_rounds: int = REFINE_FLIP_ROUNDS,
):
    """``steps`` Adam steps on the latents ``(y_h, y_l, z)`` (as the model's analysis gives them
    for ``x`` at ``quality``), then ``flip_rounds`` discrete rounds (module docstring); returns
    the latents with the lowest exact loss seen, per image. ``lr`` is the step size of ``y_h``
    and ``y_l``; ``z``'s is ``lr * REFINE_Z_LR_SCALE``. ``steps=0`` runs the rounds alone (from
    the analysis' latents); no steps and no rounds is no refinement at all.

    The model's weights are not changed (nor given gradients).
    """
    steps = _check_steps(steps)
    flip_rounds = _check_steps(flip_rounds, "flip_rounds")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    params = [t.detach().clone().requires_grad_(True) for t in latents]
    best = [t.detach().clone() for t in latents]
    if steps == 0 and flip_rounds == 0:
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
    with torch.no_grad():  # the last step's latents (without steps, the start): only their exact loss
        keep_the_better(rd_losses(model, x, quality, *params, size=size)[1])
    if size is None:
        size = tuple(x.shape[-2:])
    for _ in range(flip_rounds):
        moved, loss = _flip_round(model, x, quality, best, size, gen, best_loss)
        if not torch.any(loss < best_loss):
            break  # a round that moved nothing would find about the same moves again
        best, best_loss = moved, loss
    return tuple(t.detach() for t in best)
