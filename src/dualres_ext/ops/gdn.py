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

from typing import Optional

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


def _out_format(x) -> torch.memory_format:
    """The layout the kernels give their outputs: channels-last when ``x`` is channels-last (and
    not also NCHW) contiguous with C > 1, NCHW-contiguous otherwise (csrc/gdn: prepare_input)."""
    channels_last = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# ---- torch.library registrations: fake kernels (tracing, torch.compile, export) and autograd ----


@torch.library.register_fake("dualres_ext::gdn_forward")
def _gdn_forward_fake(x, beta, gamma, bias, inverse, simplified):
    return torch.empty_like(x, memory_format=_out_format(x))


@torch.library.register_fake("dualres_ext::gdn_forward_")
def _gdn_forward_inplace_fake(x, beta, gamma, bias, inverse, simplified):
    return None  # writes x (Tensor(a!)), returns nothing


@torch.library.register_fake("dualres_ext::gdn_forward_save")
def _gdn_forward_save_fake(x, beta, gamma, bias, inverse, simplified):
    fmt = _out_format(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, dtype=torch.float32, memory_format=fmt)


@torch.library.register_fake("dualres_ext::gdn_backward")
def _gdn_backward_fake(grad_y, x, beta, gamma, bias, scale, inverse, simplified):
    return (
        torch.empty_like(x, memory_format=_out_format(x)),
        beta.new_empty(beta.shape, dtype=torch.float32),
        gamma.new_empty(gamma.shape, dtype=torch.float32),
    )


def _gdn_setup_context(ctx, inputs, output):
    x, beta, gamma, bias, inverse, simplified = inputs
    # gdn_forward_save's second output f(n) saves the backward one of its three C x C GEMMs (the
    # CPU is GEMM-bound); it is an intermediate, never differentiated.
    scale = None
    if isinstance(output, tuple):
        scale = output[1]
        ctx.mark_non_differentiable(scale)
    ctx.save_for_backward(x, beta, gamma, bias, scale)
    ctx.flags = (inverse, simplified)


def _gdn_backward(ctx, grad_y, *unused_grad_scale):
    """The fused C++ backward: grads for x, beta, gamma and bias (grad_x summed over N, H, W)."""
    x, beta, gamma, bias, scale = ctx.saved_tensors
    inverse, simplified = ctx.flags
    grad_x, grad_beta, grad_gamma = _ops.gdn_backward(grad_y, x, beta, gamma, bias, scale, inverse, simplified)
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_x.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias.dtype)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_beta if ctx.needs_input_grad[1] else None,
        grad_gamma if ctx.needs_input_grad[2] else None,
        grad_bias,
        None,
        None,
    )


torch.library.register_autograd("dualres_ext::gdn_forward", _gdn_backward, setup_context=_gdn_setup_context)
torch.library.register_autograd("dualres_ext::gdn_forward_save", _gdn_backward, setup_context=_gdn_setup_context)


def _check(x, beta, gamma, bias):
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


def _check_finite(x, beta, gamma, bias, check_finite: Optional[bool], native: bool):
    """NaN/Inf in the parameters: see ``check_finite`` in :func:`gdn`."""
    if check_finite is False or torch.compiler.is_compiling():
        return  # reading a value is a graph break in a trace; the CPU kernel still checks at run time
    if check_finite is None and (native or x.device.type != "cpu"):
        return  # the CPU kernel checks itself; on CUDA the check would synchronise: opt-in only
    for name, t in (("beta", beta), ("gamma", gamma), ("bias", bias)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"gdn: {name} contains NaN or Inf")


def gdn(
    x,
    beta,
    gamma,
    bias=None,
    inverse: bool = False,
    simplified: bool = False,
    check_finite: Optional[bool] = None,
    inplace: bool = False,
):
    """GDN / IGDN / simplified GDN of ``x`` (N, C, H, W) with effective ``beta`` (C,) and ``gamma`` (C, C).

    Uses the fused native kernel (forward and backward) for float32 on CPU and
    float32/float16/bfloat16 on CUDA (when built with CUDA); any other case runs
    :func:`gdn_reference`. NCHW and channels-last inputs are both handled natively and the
    output keeps the input's memory format.

    ``check_finite`` (NaN/Inf in beta, gamma, bias raise ValueError): ``None`` (default) checks
    wherever that costs no device synchronisation -- the CPU kernel checks its parameters itself
    (also in compiled code), the CPU fallback checks here -- and leaves CUDA parameters
    unchecked; ``True`` also checks CUDA parameters here (one synchronisation per call: for
    debugging); ``False`` skips the checks made here. Under ``torch.compile`` / ``torch.export``
    only the kernel's own check remains (a trace cannot read a tensor's values).

    ``inplace=True`` lets the native kernel write the result into ``x`` (saving the output
    allocation) when no gradient is being recorded and ``x`` is NCHW- or channels-last-contiguous;
    otherwise it is ignored and a new tensor is returned. Use the return value either way.

    Every path is traceable (fake kernels and autograd are registered with torch.library above):
    ``torch.compile(fullgraph=True)`` and ``torch.export`` see one op per call.
    """
    _check(x, beta, gamma, bias)
    dev = x.device.type
    native = _has_native(dev) and (x.dtype == torch.float32 or (dev == "cuda" and x.dtype in _CUDA_DTYPES))
    if dev == "cuda" and x.shape[1] > _CUDA_MAX_CHANNELS:
        native = False  # the CUDA kernel stages C x pixels tiles in 48 KiB of shared memory
    _check_finite(x, beta, gamma, bias, check_finite, native)
    if not native:
        return gdn_reference(
            x, beta.to(x.dtype), gamma.to(x.dtype), None if bias is None else bias.to(x.dtype), inverse, simplified
        )
    # Kernels take float32 parameters (they accumulate in float32 whatever x's dtype is).
    beta32, gamma32 = beta.float(), gamma.float()
    bias32 = None if bias is None else bias.float()
    inverse, simplified = bool(inverse), bool(simplified)
    if inplace and _inplace_ok(x, beta32, gamma32, bias32):
        _ops.gdn_forward_(x, beta32, gamma32, bias32, inverse, simplified)
        return x
    if (
        dev == "cpu"
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, beta32, gamma32, bias32))
    ):
        # Training on the CPU: keep f(n) for the backward (_gdn_setup_context).
        return _ops.gdn_forward_save(x, beta32, gamma32, bias32, inverse, simplified)[0]
    return _ops.gdn_forward(x, beta32, gamma32, bias32, inverse, simplified)
