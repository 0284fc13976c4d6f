"""Quantisation of latents, the same in training, in ``forward`` and in the coder."""

from __future__ import annotations

import torch


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return (torch.round(x) - x).detach() + x


def quantize_latent(x: torch.Tensor, offset: torch.Tensor, training: bool, entropy_model) -> torch.Tensor:
    """``round(x - offset) + offset``: straight-through in training, exact in eval.

    Eval goes through the entropy model's own ``quantize(.., "symbols")``/``dequantize`` -- the
    very functions ``compress``/``decompress`` use -- so ``forward``, the encoder and the decoder
    get bit-identical values (ties, rounding mode and all).
    """
    if training:
        return ste_round(x - offset) + offset
    return entropy_model.dequantize(entropy_model.quantize(x, "symbols", offset), offset, x.dtype)
