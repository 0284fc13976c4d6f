"""Fused GDN / IGDN / simplified GDN ("GDN1") (csrc/gdn).

    y_i = x_i * f(beta_i + sum_j gamma[i, j] * u(x_j))

with u(x) = x^2, f = rsqrt (GDN) or sqrt (IGDN); simplified: u(x) = |x|, f(n) = 1/n or n.
`beta` and `gamma` are the *effective* (already reparametrised) values, as CompressAI's forward
computes them; gamma[i, j] is the weight of input channel j in output channel i (CompressAI passes
gamma.reshape(C, C, 1, 1) to conv2d). An optional per-channel `bias` is added to x first (the
preceding convolution's bias, folded into the same pass).

The argument checks are all here: they also guard :func:`gdn_reference`, which serves the
dtypes and devices without a kernel, and the kernels' own checks raise RuntimeError.
"""
from __future__ import annotations

import torch

from .args import cuda_built

__all__ = ["gdn", "gdn_reference"]

_ops = torch.ops.dualres_ext

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_MAX_CHANNELS = 4096


def _has_native(device_type: str) -> bool:
    return device_type == "cpu" or (device_type == "cuda" and cuda_built())


def _inplace_ok(x, *params) -> bool:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return False
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def gdn_reference(x, beta, gamma, bias=None, inverse: bool = False, simplified: bool = False):
    """The plain PyTorch expression (CompressAI's), differentiable by autograd; any device/dtype."""
    if bias is not None:
        x = x + bias.reshape(1, -1, 1, 1)
    c = x.shape[1]
    u = x.abs() if simplified else x * x
    norm = torch.nn.functional.conv2d(u, gamma.reshape(c, c, 1, 1), beta)
    if simplified:
        norm = norm if inverse else 1.0 / norm
    else:
        norm = torch.sqrt(norm) if inverse else torch.rsqrt(norm)
    return x * norm


class _GDNFunction(torch.autograd.Function):
    """The fused kernels with their fused C++ backward (grads for x, beta, gamma and bias)."""

    @staticmethod
    def forward(ctx, x, beta, gamma, bias, inverse, simplified):
        scale = None
        if x.device.type == "cpu" and any(ctx.needs_input_grad[:4]):
            # Keep f(n) for the backward: saves one of its three C x C GEMMs (CPU is GEMM-bound).
            y, scale = _ops.gdn_forward_save(x, beta, gamma, bias, inverse, simplified)
        else:
            y = _ops.gdn_forward(x, beta, gamma, bias, inverse, simplified)
        ctx.save_for_backward(x, beta, gamma, bias, scale)
        ctx.flags = (inverse, simplified)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, beta, gamma, bias, scale = ctx.saved_tensors
        inverse, simplified = ctx.flags
        grad_x, grad_beta, grad_gamma = _ops.gdn_backward(grad_y, x, beta, gamma, bias, scale, inverse, simplified)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_x.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias.dtype)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_beta if ctx.needs_input_grad[1] else None,
                grad_gamma if ctx.needs_input_grad[2] else None,
                grad_bias, None, None)


def _check(x, beta, gamma, bias, check_finite: bool):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gdn: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"gdn: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"gdn: x must be a floating point tensor, got dtype {x.dtype}")
    for name, t in (("beta", beta), ("gamma", gamma), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"gdn: {name} must be a torch.Tensor, got {type(t).__name__}")
    c = x.shape[1]
    if beta.shape != (c,):
        raise ValueError(f"gdn: beta must have shape ({c},) for x with {c} channels, got {tuple(beta.shape)}")
    if gamma.shape != (c, c):
        raise ValueError(f"gdn: gamma must have shape ({c}, {c}) for x with {c} channels, got {tuple(gamma.shape)}")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"gdn: bias must have shape ({c},) for x with {c} channels, got {tuple(bias.shape)}")
    for name, t in (("beta", beta), ("gamma", gamma), ("bias", bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"gdn: {name} must be a floating point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"gdn: {name} is on {t.device} but x is on {x.device}")
        if check_finite and not bool(torch.isfinite(t).all()):
            raise ValueError(f"gdn: {name} contains NaN or Inf")


def gdn(x, beta, gamma, bias=None, inverse: bool = False, simplified: bool = False, check_finite: bool = True,
        inplace: bool = False):
    """GDN / IGDN / simplified GDN of ``x`` (N, C, H, W) with effective ``beta`` (C,) and ``gamma`` (C, C).

    Uses the fused native kernel (forward and backward) for float32 on CPU and
    float32/float16/bfloat16 on CUDA (when built with CUDA); any other case runs
    :func:`gdn_reference`. NCHW and channels-last inputs are both handled natively and the
    output keeps the input's memory format. ``check_finite`` validates beta/gamma/bias
    (on CUDA this synchronises; turn it off in hot loops once the parameters are trusted).
    ``inplace=True`` lets the native kernel write the result into ``x`` (saving the output
    allocation) when no gradient is being recorded and ``x`` is NCHW- or channels-last-contiguous;
    otherwise it is ignored and a new tensor is returned. Use the return value either way.
    """
    _check(x, beta, gamma, bias, check_finite)
    dev = x.device.type
    native = _has_native(dev) and (
        x.dtype == torch.float32 or (dev == "cuda" and x.dtype in _CUDA_DTYPES))
    if dev == "cuda" and x.shape[1] > _CUDA_MAX_CHANNELS:
        native = False  # the CUDA kernel stages C x pixels tiles in 48 KiB of shared memory
    if not native:
        return gdn_reference(x, beta.to(x.dtype), gamma.to(x.dtype),
                             None if bias is None else bias.to(x.dtype), inverse, simplified)
    # Kernels take float32 parameters (they accumulate in float32 whatever x's dtype is).
    beta32, gamma32 = beta.float(), gamma.float()
    bias32 = None if bias is None else bias.float()
    if inplace and _inplace_ok(x, beta32, gamma32, bias32):
        return _ops.gdn_forward_(x, beta32, gamma32, bias32, bool(inverse), bool(simplified))
    return _GDNFunction.apply(x, beta32, gamma32, bias32, bool(inverse), bool(simplified))
