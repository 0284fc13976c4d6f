"""Quantisation-aware training of the exact entropy-parameter networks.

The integer networks of bitstream versions 4 and 5 (:mod:`.exact`) round what the float networks
compute: weights to ``weight_bits``-bit integers per output channel, every convolution's output to
its grid (with the clamp it is converted with), every GELU to a table on its grid; the slice
parameters come out as integer scales (grid ``2^-scale_bits``) and means (grid ``2^-latent_bits``).
:func:`install` makes a DualRes model's own float networks round the same way in their forward
pass, with straight-through gradients (the rounding is treated as the identity by backward), so
that training sees -- and learns to live with -- the errors the conversion will make.

The grids are those :func:`.exact.convert` chooses for the model when :func:`install` is called
(from calibration ranges); the weights' integer unit follows the weights as they train, as the
conversion at the end will. Only the forward functions of the converted modules change: their
parameters, state-dict keys and checkpoints stay those of the plain model, and a deep copy (the
weight average, :meth:`DualRes.coding_nets`) rounds like the original.
"""

from __future__ import annotations

import types
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .exact import LayerGrid, convert


def _straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    """``rounded`` in the forward pass, the identity for gradients."""
    return x + (rounded - x).detach()


def _on_grid(x: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``clamp(round(x / scale), low, high) * scale`` per channel (dim 1), straight-through."""
    shape = (1, -1, 1, 1)
    s = scale.to(x.dtype).view(shape)
    q = torch.maximum(torch.minimum(torch.round(x / s), high.to(x.dtype).view(shape)), low.to(x.dtype).view(shape))
    return _straight_through(x, q * s)


def _rounded_weight(module: nn.Module) -> tuple:
    """(weight, bias) as the conversion rounds them: the effective weights ``w * in_scale`` of each
    output channel on ``weight_bits``-bit integers of unit ``peak / (2^(bits-1) - 1)``, the bias
    on the same unit (:meth:`dualres_ext.integer.IntConv.convert`); straight-through."""
    grid: LayerGrid = module._fake_quant_grid
    transposed = isinstance(module, nn.ConvTranspose2d)
    w = module.weight
    wc = w.transpose(0, 1) if transposed else w  # (C_out, C_in, k, k)
    in_scale = grid.in_scale.to(w.dtype).view(1, -1, 1, 1)
    eff = wc * in_scale
    top = (1 << (module._fake_quant_bits - 1)) - 1
    peak = eff.detach().abs().amax(dim=(1, 2, 3))
    unit = torch.where(peak > 0, peak / top, torch.ones_like(peak))
    # The conversion stores unit / out_scale as a float32 multiplier: use the unit it implies.
    out_scale = grid.out_scale.to(w.dtype)
    unit = (unit / out_scale).float().to(w.dtype) * out_scale
    w_q = torch.round(eff / unit.view(-1, 1, 1, 1)) * unit.view(-1, 1, 1, 1) / in_scale
    w_q = w_q.transpose(0, 1) if transposed else w_q
    weight = _straight_through(w, w_q)
    bias = module.bias
    if bias is not None:
        bias = _straight_through(bias, torch.round(bias / unit) * unit)
    return weight, bias


def _conv_forward(self: nn.Module, x: Tensor) -> Tensor:
    grid = self._fake_quant_grid
    # Inputs on their grids: already so after a rounded layer; the latents read here (ẑ, the
    # noisy ŷ of training) are rounded to the latent grid as the integer networks do.
    s = grid.in_scale.to(x.dtype).view(1, -1, 1, 1)
    x = _straight_through(x, torch.round(x / s) * s)
    weight, bias = _rounded_weight(self)
    if isinstance(self, nn.ConvTranspose2d):
        y = F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )
    else:
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
    return _on_grid(y, grid.out_scale, grid.out_low, grid.out_high)


def _table_hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
    grid = module._fake_quant_grid
    return _on_grid(output, grid.out_scale, grid.out_low, grid.out_high)


def _lrp(self: nn.Module, i: int, h: Tensor, y_hat_slice: Tensor) -> Tensor:
    """``_SliceCoder.lrp`` with the correction on the latent grid, as the table computes it."""
    grid = self._fake_quant_grid
    t = 0.5 * torch.tanh(self.lrp_nets[i](torch.cat([h, y_hat_slice], 1)))
    return y_hat_slice + _on_grid(t, grid.out_scale, grid.out_low, grid.out_high)


class Installed:
    """What :func:`install` changed; :meth:`remove` restores the plain float forward passes."""

    def __init__(self, model: nn.Module, modules: List[nn.Module], hooks: list):
        self.model = model
        self.modules = modules
        self.hooks = hooks

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for m in self.modules:
            for name in ("forward", "lrp", "_fake_quant_grid", "_fake_quant_bits"):
                m.__dict__.pop(name, None)
        self.model.forget_coding_nets()


def install(model: nn.Module, grids: Dict[str, LayerGrid], weight_bits: int) -> Installed:
    """Make ``model``'s entropy-parameter networks round as their integer form will.

    ``grids``: from :func:`.exact.convert` (its ``grids`` argument), keyed by module path in
    :meth:`DualRes.coding_nets`, which are the model's own attribute paths. Convolutions get a
    rounding forward pass and the slice coders a rounding LRP (bound methods, so copies of the
    model keep them and use their own weights); table nonlinearities a forward hook that rounds
    their output to their grid."""
    modules, hooks = [], []
    for name, grid in grids.items():
        module = model.get_submodule(name)
        module._fake_quant_grid = grid
        modules.append(module)
        if grid.kind == "table":
            hooks.append(module.register_forward_hook(_table_hook))
            continue
        if grid.kind == "lrp":
            module.lrp = types.MethodType(_lrp, module)
            continue
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            raise TypeError(f"fake_quant.install: {name} is {type(module).__name__}, not a convolution")
        module._fake_quant_bits = weight_bits
        module.forward = types.MethodType(_conv_forward, module)
    model.forget_coding_nets()
    return Installed(model, modules, hooks)


@torch.no_grad()
def grids_of(model: nn.Module, stats: Dict[str, float], scale_table: Tensor, **options) -> Dict[str, LayerGrid]:
    """The grids :func:`.exact.convert` gives ``model`` from calibration ``stats``."""
    grids: Dict[str, LayerGrid] = {}
    convert(model, stats, scale_table, grids=grids, **options)
    return grids
