"""The rate-distortion objective: what the models are trained for and the refining encoder
minimises for one image. Pixels are in [0, 1]; the distortion weight follows CompressAI's
convention (``lmbda * 255^2 * MSE``), so CompressAI's lambdas mean the same here."""

from __future__ import annotations

import math

import torch

DISTORTION_SCALE = 255**2


def bits(likelihoods: torch.Tensor) -> torch.Tensor:
    """Bits per image, (B,): ``-sum log2(likelihood)`` over everything but the batch dimension."""
    return -torch.log2(likelihoods).flatten(1).sum(1)


def rd_loss(bpp, mse, lmbda: float):
    """``bpp + lmbda * 255^2 * mse``: bits per pixel plus the weighted mean squared error."""
    return bpp + lmbda * DISTORTION_SCALE * mse


def rate_distortion(out: dict, x: torch.Tensor, lmbda: float) -> dict:
    """The training loss of a model's ``forward`` output ``out`` for the batch ``x``:
    ``{"loss", "bpp", "mse"}``, the rate summed over all likelihoods and averaged per pixel."""
    num_pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(torch.log(lik).sum() for lik in out["likelihoods"].values()) / (-math.log(2) * num_pixels)
    mse = torch.nn.functional.mse_loss(out["x_hat"], x)
    return {"loss": rd_loss(bpp, mse, lmbda), "bpp": bpp, "mse": mse}
