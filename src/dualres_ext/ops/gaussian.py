"""Gaussian conditional kernels (csrc/gaussian): scale -> table index, quantisation, the training
likelihood and the coder's CDF tables. Semantics follow CompressAI 1.2.8 exactly where the
docstrings say so.

The wrappers bring tensors to the dtypes, layouts and shapes the kernels take (the kernels only
check those, with RuntimeError: csrc/gaussian/gaussian_checks.h), so the user-facing checks are
here, as TypeError/ValueError naming the argument. The kernels report the values they find
(NaN/Inf/negative scales, symbols beyond int32, an invalid pmf) as ValueError themselves.
"""

from __future__ import annotations

import math

import torch

from .args import require_tensor, same_device

__all__ = [
    "DEFAULT_SCALE_BOUND",
    "DEFAULT_LIKELIHOOD_BOUND",
    "ScaleTable",
    "build_indexes",
    "quantize_symbols",
    "quantize_and_index",
    "dequantize",
    "lower_bound",
    "gaussian_likelihood",
    "pmf_to_quantized_cdf",
    "gaussian_cdf_tables",
]

_ops = torch.ops.dualres_ext

_SCALE_NAN, _SCALE_INF, _SCALE_NEGATIVE = 1, 2, 4  # the kernels' `check` bits (csrc/register.cpp)
_NATIVE_FLOATS = (torch.float32, torch.float64)
# CompressAI keeps its bounds in float32 buffers: the defaults are those float32 values.
DEFAULT_SCALE_BOUND = float(torch.tensor(0.11, dtype=torch.float32))
DEFAULT_LIKELIHOOD_BOUND = float(torch.tensor(1e-9, dtype=torch.float32))


def _bound_value(name, bound):
    """A lower bound given as a float or a one-element tensor -> (float value, dtype it compares in)."""
    if isinstance(bound, torch.Tensor):
        if bound.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(bound.shape)}")
        return float(bound.reshape(-1)[0]), bound.dtype
    return float(bound), torch.float32


def _scale_check(strict: bool) -> int:
    return _SCALE_NAN | ((_SCALE_INF | _SCALE_NEGATIVE) if strict else 0)


class ScaleTable:
    """A scale table and its lower bound, validated once, for :meth:`build_indexes` and
    :meth:`quantize_and_index` on many scale tensors (serial context models index one position
    at a time, and checking the table each time would cost more than the kernel).

    ``scale_table``: a non-empty 1-D floating tensor without NaN (checked on the CPU only, where
    it costs no device synchronisation); ``scale_bound``: a float or a one-element tensor, not
    NaN. The tensors are referenced, not copied: a table written in place afterwards is used as
    it then is, unchecked.
    """

    __slots__ = ("bound", "bound_dtype", "scale_bound", "scale_table")

    def __init__(self, scale_table, scale_bound=DEFAULT_SCALE_BOUND):
        require_tensor("scale_table", scale_table)
        if scale_table.dim() != 1 or scale_table.numel() < 1:
            raise ValueError(f"scale_table must be a non-empty 1-D tensor, got shape {tuple(scale_table.shape)}")
        bound, bound_dtype = _bound_value("scale_bound", scale_bound)
        if bound != bound:
            raise ValueError("scale_bound is NaN")
        if scale_table.device.type == "cpu" and bool(torch.isnan(scale_table).any()):
            raise ValueError("scale_table contains NaN")
        self.scale_table = scale_table
        self.scale_bound = scale_bound
        self.bound = bound
        self.bound_dtype = bound_dtype

    def _inputs(self, scales):
        """Scales and table in the dtype CompressAI compares in: torch.max(scales, bound) promotes
        with the bound (a 1-element float32 buffer), the table entries are then cast to that dtype."""
        dtype = torch.promote_types(scales.dtype, self.bound_dtype)
        if dtype not in _NATIVE_FLOATS:
            dtype = torch.float32
        table = self.scale_table.to(device=scales.device, dtype=dtype).contiguous()
        return scales.to(dtype).contiguous(), table

    def build_indexes(self, scales, strict=True, checked=True):
        """See :func:`build_indexes`. ``checked=False``: the caller guarantees finite, non-negative
        scales (e.g. integers that exact networks computed), so nothing is checked and, on a GPU,
        the call does not wait for the device to report NaNs."""
        require_tensor("scales", scales)
        scales, table = self._inputs(scales)
        return _ops.gaussian_build_indexes(scales, table, self.bound, _scale_check(strict) if checked else 0)

    def quantize_and_index(self, y, scales, means=None, strict=True):
        """See :func:`quantize_and_index`."""
        y, means = _quantize_inputs(y, means)
        require_tensor("scales", scales)
        return self._quantize_and_index(y, means, scales, strict)

    def _quantize_and_index(self, y, means, scales, strict):
        scales, table = self._inputs(scales)
        same_device("scales", scales, "y", y)
        if scales.shape != y.shape:
            raise ValueError(f"scales shape {tuple(scales.shape)} differs from y's {tuple(y.shape)}")
        return _ops.gaussian_quantize_indexes(y, means, scales, table, self.bound, _scale_check(strict))


def build_indexes(scales, scale_table, scale_bound=DEFAULT_SCALE_BOUND, strict=True):
    """Index of each scale in `scale_table`, exactly CompressAI's GaussianConditional.build_indexes:
    the scale is first raised to `scale_bound`, then the index is the number of entries of
    scale_table[:-1] that are strictly below it (ties go to the lower index). int32, same shape.

    NaN scales always raise ValueError. With strict=True, negative and infinite scales raise too;
    with strict=False they are clamped as CompressAI does. To index many scale tensors with one
    table, build a :class:`ScaleTable` once and call its ``build_indexes``.
    """
    require_tensor("scales", scales)
    return ScaleTable(scale_table, scale_bound).build_indexes(scales, strict)


def _quantize_inputs(y, means):
    require_tensor("y", y)
    if means is None:
        if y.dtype in _NATIVE_FLOATS:
            return y.contiguous(), None
        return y.float(), None
    require_tensor("means", means)
    same_device("means", means, "y", y)
    try:
        means = means.expand_as(y)
    except RuntimeError:
        raise ValueError(f"means of shape {tuple(means.shape)} does not broadcast to y's {tuple(y.shape)}") from None
    if y.dtype in _NATIVE_FLOATS and means.dtype == y.dtype:
        return y.contiguous(), means.contiguous()
    # Anything else: subtract exactly as CompressAI does (in-place, in y's dtype) and round that.
    diff = y.clone()
    diff -= means
    return diff.to(torch.float64 if diff.dtype == torch.float64 else torch.float32), None


def quantize_symbols(y, means=None):
    """CompressAI's quantize(y, "symbols", means): round(y - means) (half to even) as int32.
    Raises ValueError when a value is NaN/Inf or does not fit in int32."""
    y, means = _quantize_inputs(y, means)
    return _ops.gaussian_quantize(y, means)


def quantize_and_index(y, scales, scale_table, means=None, scale_bound=DEFAULT_SCALE_BOUND, strict=True):
    """(quantize_symbols(y, means), build_indexes(scales, ...)) in one pass over the tensors."""
    y, means = _quantize_inputs(y, means)
    require_tensor("scales", scales)
    return ScaleTable(scale_table, scale_bound)._quantize_and_index(y, means, scales, strict)


def dequantize(symbols, means=None, dtype=torch.float32):
    """CompressAI's EntropyModel.dequantize: symbols.type_as(means) + means, or symbols in `dtype`."""
    require_tensor("symbols", symbols, floating=False)
    if means is None:
        if dtype not in _NATIVE_FLOATS or symbols.dtype != torch.int32:
            return symbols.to(dtype)
        return _ops.gaussian_dequantize(symbols.contiguous(), None, dtype)
    require_tensor("means", means)
    same_device("means", means, "symbols", symbols)
    try:
        means = means.expand_as(symbols)
    except RuntimeError:
        raise ValueError(
            f"means of shape {tuple(means.shape)} does not broadcast to symbols' {tuple(symbols.shape)}"
        ) from None
    if means.dtype not in _NATIVE_FLOATS or symbols.dtype != torch.int32:
        out = symbols.to(means.dtype)
        out += means
        return out
    return _ops.gaussian_dequantize(symbols.contiguous(), means.contiguous(), means.dtype)


# ---- torch.library registrations: fake kernels (tracing, torch.compile, export) and autograd ----
# Outputs are new contiguous tensors on the inputs' device, as the kernels allocate them.


def _int32_like(t):
    return t.new_empty(t.shape, dtype=torch.int32)


@torch.library.register_fake("dualres_ext::gaussian_build_indexes")
def _build_indexes_fake(scales, scale_table, scale_bound, check):
    return _int32_like(scales)


@torch.library.register_fake("dualres_ext::gaussian_quantize")
def _quantize_fake(y, means):
    return _int32_like(y)


@torch.library.register_fake("dualres_ext::gaussian_quantize_indexes")
def _quantize_indexes_fake(y, means, scales, scale_table, scale_bound, check):
    return _int32_like(y), _int32_like(y)


@torch.library.register_fake("dualres_ext::gaussian_dequantize")
def _dequantize_fake(symbols, means, dtype):
    return symbols.new_empty(symbols.shape, dtype=means.dtype if means is not None else dtype)


@torch.library.register_fake("dualres_ext::gaussian_likelihood")
def _likelihood_fake(inputs, means, scales, scale_bound, likelihood_bound):
    return inputs.new_empty(inputs.shape)


@torch.library.register_fake("dualres_ext::gaussian_likelihood_backward")
def _likelihood_backward_fake(grad, inputs, means, scales, scale_bound, likelihood_bound):
    return inputs.new_empty(inputs.shape), inputs.new_empty(inputs.shape)


@torch.library.register_fake("dualres_ext::pmf_to_quantized_cdf")
def _pmf_to_quantized_cdf_fake(pmf, lengths, precision):
    return pmf.new_empty((pmf.shape[0], pmf.shape[1] + 1), dtype=torch.int32)


@torch.library.register_fake("dualres_ext::gaussian_cdf_tables")
def _gaussian_cdf_tables_fake(scale_table, tail_mass, precision):
    # The table width (the longest pmf + 2) depends on the largest scale's value. CPU tensors.
    width = torch.library.get_ctx().new_dynamic_size(min=4)
    rows = scale_table.shape[0]
    return (
        torch.empty((rows, width), dtype=torch.int32),
        torch.empty((rows,), dtype=torch.int32),
        torch.empty((rows,), dtype=torch.int32),
    )


def _likelihood_setup_context(ctx, inputs, output):
    x, means, scales, scale_bound, likelihood_bound = inputs
    ctx.save_for_backward(x, scales, means)
    ctx.bounds = (scale_bound, likelihood_bound)


def _likelihood_backward(ctx, grad):
    """The fused backward; it follows PyTorch autograd of CompressAI's reference (including both
    LowerBound gradient rules). Not twice differentiable (gaussian_likelihood_backward has no
    autograd formula)."""
    x, scales, means = ctx.saved_tensors
    grad_inputs, grad_scales = _ops.gaussian_likelihood_backward(grad.contiguous(), x, means, scales, *ctx.bounds)
    grad_means = -grad_inputs if (means is not None and ctx.needs_input_grad[1]) else None
    return grad_inputs, grad_means, grad_scales, None, None


torch.library.register_autograd(
    "dualres_ext::gaussian_likelihood", _likelihood_backward, setup_context=_likelihood_setup_context
)


class _LowerBoundFunction(torch.autograd.Function):
    """max(x, bound); the gradient passes where x >= bound or where it would push x up
    (CompressAI's LowerBound rule).

    An autograd.Function rather than a registered op on purpose: it is plain ATen, so
    torch.compile traces through it (fullgraph) and inductor fuses it with its neighbours; a
    custom op would be an opaque call that inductor cannot fuse."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx, grad_output):
        x, bound = ctx.saved_tensors
        pass_through = (x >= bound) | (grad_output < 0)
        return pass_through * grad_output, None


def lower_bound(x, bound):
    """CompressAI's LowerBound: torch.max(x, bound) with its custom gradient. `bound` is a float or
    a one-element tensor (compared like CompressAI's 1-element buffer)."""
    require_tensor("x", x)
    if not isinstance(bound, torch.Tensor):
        bound = torch.tensor([float(bound)], dtype=x.dtype, device=x.device)
    return _LowerBoundFunction.apply(x, bound)


def gaussian_likelihood(
    inputs, scales, means=None, scale_bound=DEFAULT_SCALE_BOUND, likelihood_bound=DEFAULT_LIKELIHOOD_BOUND
):
    """Likelihood of the unit bin around `inputs` under N(means, max(scales, scale_bound)), raised to
    at least `likelihood_bound` (pass None for no bound): CompressAI's GaussianConditional._likelihood
    followed by LowerBound, in one fused kernel with a fused backward. Broadcasts like PyTorch."""
    require_tensor("inputs", inputs)
    require_tensor("scales", scales)
    same_device("scales", scales, "inputs", inputs)
    tensors = [inputs, scales]
    if means is not None:
        require_tensor("means", means)
        same_device("means", means, "inputs", inputs)
        tensors.append(means)
    sb_tensor, sb = _traced_bound("scale_bound", scale_bound)
    lb_tensor, lb = _traced_bound("likelihood_bound", likelihood_bound)
    out_dtype = torch.promote_types(
        torch.promote_types(inputs.dtype, scales.dtype), means.dtype if means is not None else inputs.dtype
    )
    compute = out_dtype if out_dtype in _NATIVE_FLOATS else torch.float32
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        raise ValueError(
            "inputs, scales and means do not broadcast: " + ", ".join(str(tuple(t.shape)) for t in tensors)
        ) from None
    if sb_tensor is not None:
        tensors[1] = lower_bound(scales.to(compute), sb_tensor.to(compute))
    elif scales.shape != shape:
        # LowerBound's gradient rule looks at the gradient summed over the broadcast dimensions,
        # so a broadcast scale tensor is bounded before it is expanded.
        tensors[1] = lower_bound(scales.to(compute), sb)
        sb = float("-inf")
    prepared = [t.to(compute).expand(shape).contiguous() for t in tensors]
    x, s = prepared[0], prepared[1]
    m = prepared[2] if means is not None else None
    out = _ops.gaussian_likelihood(x, m, s, sb, lb)
    if lb_tensor is not None:
        out = lower_bound(out, lb_tensor.to(compute))
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _traced_bound(name, bound):
    """``(tensor, float)`` for a bound of :func:`gaussian_likelihood` (None: no bound).

    Eagerly a bound is read as a float and applied inside the kernel: ``(None, value)``. While
    tracing (torch.compile, export) a tensor's value cannot be read, so a tensor bound comes back
    as ``(bound, -inf)``: the caller applies it with :func:`lower_bound`, whose values and
    gradient rule are the kernel's (tests/test_torch_library.py compares the two bit for bit)."""
    if bound is None:
        return None, float("-inf")
    if isinstance(bound, torch.Tensor) and torch.compiler.is_compiling():
        if bound.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(bound.shape)}")
        return bound.reshape(1), float("-inf")
    return None, _bound_value(name, bound)[0]


def pmf_to_quantized_cdf(pmf, lengths=None, precision=16):
    """CompressAI's pmf_to_quantized_cdf on every row of a 2-D pmf [T, L] (float32 values, as
    CompressAI's C++ takes them). Row i uses pmf[i, :lengths[i]] (all L when lengths is None).
    Returns int32 [T, L + 1]; row i holds lengths[i] + 1 CDF values then zeros. A 1-D pmf gives
    a 1-D CDF of L + 1 values."""
    require_tensor("pmf", pmf)
    one_d = pmf.dim() == 1
    if one_d:
        pmf = pmf[None]
    if pmf.dim() != 2 or pmf.size(1) < 1:
        raise ValueError(f"pmf must be 1-D or 2-D with at least one value per row, got shape {tuple(pmf.shape)}")
    if lengths is None:
        lengths = torch.full((pmf.size(0),), pmf.size(1), dtype=torch.int32)
    else:
        require_tensor("lengths", lengths, floating=False)
        if lengths.shape != (pmf.size(0),):
            raise ValueError(f"lengths must have shape ({pmf.size(0)},), got {tuple(lengths.shape)}")
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > pmf.size(1)):
            # Checked before the int32 cast below, which would wrap values beyond int32.
            raise ValueError(
                f"lengths must lie in [1, {pmf.size(1)}], got [{int(lengths.min())}, {int(lengths.max())}]"
            )
    cdf = _ops.pmf_to_quantized_cdf(pmf.detach().cpu().float(), lengths.cpu().int(), int(precision))
    return cdf[0] if one_d else cdf


def gaussian_cdf_tables(scale_table, tail_mass=1e-9, precision=16):
    """(quantized_cdf int32 [T, Lmax], cdf_length int32 [T], offset int32 [T]) for a Gaussian scale
    table, equal to what CompressAI's GaussianConditional.update() stores. Computed on the CPU."""
    require_tensor("scale_table", scale_table)
    if scale_table.dim() != 1 or scale_table.numel() < 1:
        raise ValueError(f"scale_table must be a non-empty 1-D tensor, got shape {tuple(scale_table.shape)}")
    if not torch.isfinite(scale_table).all() or not (scale_table > 0).all():
        raise ValueError("scale_table values must be finite and > 0")
    if not 0.0 < float(tail_mass) < 1.0:
        raise ValueError(f"tail_mass must be in (0, 1), got {tail_mass}")
    if not 1 <= int(precision) <= 30:
        raise ValueError(f"precision must be in [1, 30], got {precision}")
    # The kernel casts ceil(scale * multiplier) to int32: a huge scale would wrap there and come
    # back as a tiny, wrong table. Refuse what cannot fit 2^precision symbols, in float64 first.
    multiplier = -float(torch.special.ndtri(torch.tensor(float(tail_mass) / 2, dtype=torch.float64)))
    longest = 2 * math.ceil(float(scale_table.detach().max()) * multiplier) + 1
    if longest > (1 << int(precision)) - 1:
        raise ValueError(
            f"scale_table entry too large for {int(precision)}-bit precision: the pmf needs {longest} symbols"
        )
    return tuple(_ops.gaussian_cdf_tables(scale_table.detach().cpu(), float(tail_mass), int(precision)))
