"""GDN / IGDN layers and the convolution factories of the DualRes model.

:class:`GDN` and :class:`GDN1` are drop-in replacements for ``compressai.layers.GDN`` /
``GDN1``: same constructor, same parameters and reparametrisation, same state-dict keys::

    beta, gamma,
    beta_reparam.pedestal,  beta_reparam.lower_bound.bound,
    gamma_reparam.pedestal, gamma_reparam.lower_bound.bound

so a CompressAI state dict loads with ``strict=True`` and gives the same output. The forward
runs the fused native kernel (``dualres_ext.ops.gdn``) where one exists for the device/dtype
and CompressAI's plain expression otherwise.

``conv`` and ``deconv`` are plain ``nn.Conv2d`` / ``nn.ConvTranspose2d`` factories as in
CompressAI (keys ``weight``, ``bias``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .cache import TensorCache

__all__ = ["LowerBound", "NonNegativeParametrizer", "GDN", "GDN1", "conv", "deconv"]

# LowerBound.value() per module: the entropy models pass the bound to the kernels as a float at
# every forward, and reading a CUDA buffer synchronises the device. Values keep their source
# tensor, so a source's address is never reused.
_BOUND_VALUES: "TensorCache[tuple]" = TensorCache()


class LowerBound(nn.Module):
    """``torch.max(x, bound)`` with CompressAI's custom gradient (``ops.lower_bound``; buffer: ``bound``)."""

    bound: Tensor

    def __init__(self, bound: float):
        super().__init__()
        self.register_buffer("bound", torch.Tensor([float(bound)]))

    def forward(self, x: Tensor) -> Tensor:
        return ops.lower_bound(x, self.bound)

    def value(self) -> float:
        """The bound as a Python float, read again only when the buffer changes."""
        bound = self.bound
        return _BOUND_VALUES.get(self, (bound,), lambda: (bound, float(bound.reshape(-1)[0])))[1]

    def as_arg(self) -> "float | Tensor":
        """The bound for the ops' bound arguments (``ops.gaussian_likelihood``): :meth:`value`
        eagerly, the buffer itself while tracing (torch.compile, export), where a tensor's value
        cannot be read; the ops take either."""
        return self.bound if torch.compiler.is_compiling() else self.value()


class NonNegativeParametrizer(nn.Module):
    """CompressAI's non-negative reparametrisation: value = max(p, sqrt(minimum + pedestal))**2 - pedestal.

    Buffers ``pedestal`` and ``lower_bound.bound`` carry the same names and values as CompressAI's.
    """

    pedestal: Tensor

    def __init__(self, minimum: float = 0.0, reparam_offset: float = 2**-18):
        super().__init__()
        self.minimum = float(minimum)
        self.reparam_offset = float(reparam_offset)
        self.register_buffer("pedestal", torch.Tensor([self.reparam_offset**2]))
        self.lower_bound = LowerBound((self.minimum + self.reparam_offset**2) ** 0.5)

    def init(self, x: Tensor) -> Tensor:
        """The stored parameter that represents the value ``x``."""
        return torch.sqrt(torch.max(x + self.pedestal, self.pedestal))

    def forward(self, x: Tensor) -> Tensor:
        return self.lower_bound(x) ** 2 - self.pedestal


class GDN(nn.Module):
    r"""Generalized Divisive Normalization (Ballé et al. 2016), CompressAI-compatible.

    ``y[i] = x[i] / sqrt(beta[i] + sum_j gamma[i, j] * x[j]^2)``; ``inverse=True`` multiplies
    instead (IGDN). Parameters ``beta`` (C,) and ``gamma`` (C, C) are stored reparametrised
    exactly as in ``compressai.layers.GDN``.

    ``inplace=True`` (constructor, not in CompressAI; state dict unaffected) or
    ``forward(x, inplace=True)`` lets the kernel overwrite ``x`` when no gradient is recorded
    (see :func:`dualres_ext.ops.gdn`). ``forward(x, bias=...)``: ``bias`` (C,) is added to ``x``
    first, inside the fused kernel.
    """

    _simplified = False

    def __init__(
        self,
        in_channels: int,
        inverse: bool = False,
        beta_min: float = 1e-6,
        gamma_init: float = 0.1,
        inplace: bool = False,
    ):
        super().__init__()
        in_channels = int(in_channels)
        if in_channels < 0:  # 0 is allowed, as in CompressAI: the layer maps empty inputs to empty outputs
            raise ValueError(f"GDN: in_channels must be >= 0, got {in_channels}")
        beta_min = float(beta_min)
        gamma_init = float(gamma_init)
        if not beta_min > 0.0:
            raise ValueError(f"GDN: beta_min must be > 0, got {beta_min}")
        self.in_channels = in_channels
        self.inverse = bool(inverse)
        # Like nn.ReLU(inplace=True): overwrite the input when no gradient is recorded. Safe after a
        # convolution in an nn.Sequential (its output is a temporary); saves an output allocation.
        self.inplace = bool(inplace)

        self.beta_reparam = NonNegativeParametrizer(minimum=beta_min)
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(in_channels)))

        self.gamma_reparam = NonNegativeParametrizer()
        self.gamma = nn.Parameter(self.gamma_reparam.init(gamma_init * torch.eye(in_channels)))

        # NaN/Inf in beta/gamma: see ``check_finite`` of dualres_ext.ops.gdn. None (default): checked
        # where that costs no device synchronisation (CPU); True also checks CUDA parameters (one
        # synchronisation per call); False: only the CPU kernel's own check.
        self.check_finite: Optional[bool] = None

    def effective_params(self) -> tuple[Tensor, Tensor]:
        """(beta, gamma) after the reparametrisation: what the normalisation actually uses."""
        return self.beta_reparam(self.beta), self.gamma_reparam(self.gamma)

    def forward(self, x: Tensor, bias: Tensor | None = None, inplace: bool = False) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected input (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        beta, gamma = self.effective_params()
        return ops.gdn(
            x,
            beta,
            gamma,
            bias,
            inverse=self.inverse,
            simplified=self._simplified,
            check_finite=self.check_finite,
            inplace=inplace or self.inplace,
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, inverse={self.inverse}" + (", inplace=True" if self.inplace else "")


class GDN1(GDN):
    r"""Simplified GDN (Johnston et al. 2019): ``y[i] = x[i] / (beta[i] + sum_j gamma[i, j] * |x[j]|)``;
    ``inverse=True`` multiplies. Same parameters and keys as ``compressai.layers.GDN1``."""

    _simplified = True


def conv(in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> nn.Conv2d:
    """Strided convolution with 'same'-style padding (CompressAI's ``conv``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """Transposed convolution that upsamples by exactly ``stride`` (CompressAI's ``deconv``)."""
    return nn.ConvTranspose2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=stride,
        output_padding=stride - 1,
        padding=kernel_size // 2,
    )
