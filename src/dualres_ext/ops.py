"""Thin, checked wrappers around ``torch.ops.dualres_ext``.

Every public function validates its arguments here (dtype, device, shape, ranges) and raises
``TypeError``/``ValueError`` naming the argument, so that the C++ kernels only ever see
well-formed tensors. The C++ side still checks what it cannot trust (bitstream bytes).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from . import _C  # noqa: F401

_ops = torch.ops.dualres_ext


def build_info() -> str:
    """The raw build description string of the native library."""
    return _ops.build_info()


# --- rans ---
# rANS entropy coding (csrc/rans). Tables use CompressAI's layout: cdfs int32 [T, W] (row t holds
# a CDF from 0 to 1 << precision in its first cdf_lengths[t] entries), cdf_lengths int32 [T],
# offsets int32 [T]; symbol s with table t codes value s - offsets[t], values outside the table
# are escaped (bypass coded), so any int32 symbol round-trips.

def _rans_cuda_built() -> bool:
    return "cuda=1" in _ops.build_info()


def _int32_tensor(x, name: str, allow_cuda: bool = False) -> torch.Tensor:
    """An int32 tensor from a tensor, numpy array or (nested) list of integers; on the CPU, or on
    a CUDA device when ``allow_cuda`` and the extension was built with CUDA (native stream ops)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except OverflowError:
            raise ValueError(f"{name} has values outside the int32 range") from None
        except (TypeError, ValueError, RuntimeError) as e:
            if "overflow" in str(e).lower():
                raise ValueError(f"{name} has values outside the int32 range") from None
            raise TypeError(f"{name} must be a tensor, array or list of integers: {e}") from None
        if x.numel() == 0:
            x = x.to(torch.int32)
    if x.device.type != "cpu" and not (allow_cuda and x.device.type == "cuda" and _rans_cuda_built()):
        where = "the CPU or a CUDA device" if allow_cuda else "the CPU"
        raise ValueError(f"{name} must be on {where} (this build: {'with' if _rans_cuda_built() else 'without'} "
                         f"CUDA), got {x.device}")
    if x.dtype == torch.int32:
        return x
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    if x.numel() and (int(x.min()) < -(2**31) or int(x.max()) >= 2**31):
        raise ValueError(f"{name} has values outside the int32 range")
    return x.to(torch.int32)


def _tables(cdfs, cdf_lengths, offsets, allow_cuda: bool = False):
    cdfs = _int32_tensor(cdfs, "cdfs", allow_cuda)
    cdf_lengths = _int32_tensor(cdf_lengths, "cdf_lengths", allow_cuda)
    offsets = _int32_tensor(offsets, "offsets", allow_cuda)
    if cdfs.dim() != 2:
        raise ValueError(f"cdfs must be 2-D [tables, max_length], got shape {tuple(cdfs.shape)}")
    if cdf_lengths.shape != (cdfs.shape[0],):
        raise ValueError(f"cdf_lengths must have shape ({cdfs.shape[0]},), got {tuple(cdf_lengths.shape)}")
    if offsets.shape != (cdfs.shape[0],):
        raise ValueError(f"offsets must have shape ({cdfs.shape[0]},), got {tuple(offsets.shape)}")
    return cdfs, cdf_lengths, offsets


def _count_arg(value, name: str, low: int, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def rans_embed(data, symbols: int, precision: int = 16) -> bytes:
    """The embedded form of a native stream (csrc/rans/FORMAT.md, "Embedded streams"): without
    the bytes a container that checksums its contents and knows the stream's symbol count and
    precision can supply itself (magic, version, precision, CRC-32C, symbol count; 8 to 17 bytes).

    The stream is validated as a decoder would (ValueError), and must hold ``symbols`` symbols
    coded at ``precision``: :func:`rans_restore` rebuilds it, byte for byte, from those two.
    """
    data = _stream_tensor(data)
    symbols = _count_arg(symbols, "symbols", 0)
    precision = _count_arg(precision, "precision", 1, 16)
    return _ops.rans_embed(data, symbols, precision).numpy().tobytes()


def rans_restore(data, symbols: int, precision: int = 16) -> bytes:
    """The native stream an embedded one (:func:`rans_embed`) came from, ready for
    :func:`rans_decode`. Untrusted input is fine: a malformed embedded stream raises ValueError
    (as the decoder would), and a corrupt payload is left for the decoder to find; the CRC-32C
    written here protects nothing, the container's checksum has to."""
    data = _stream_tensor(data)
    symbols = _count_arg(symbols, "symbols", 0)
    precision = _count_arg(precision, "precision", 1, 16)
    return _ops.rans_restore(data, symbols, precision).numpy().tobytes()


def _stream_tensor(data, allow_cuda: bool = False) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"data must be a uint8 tensor or bytes-like, got a {data.dtype} tensor")
        if data.device.type != "cpu" and not (allow_cuda and data.device.type == "cuda" and _rans_cuda_built()):
            raise ValueError(f"data must be on the CPU, got {data.device}")
        return data.reshape(-1).contiguous()
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            return torch.empty(0, dtype=torch.uint8)
        # A private writable copy: frombuffer on read-only bytes warns, and callers may reuse buffers.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raise TypeError(f"data must be bytes, bytearray, memoryview or a uint8 tensor, got {type(data).__name__}")


def _same_rans_device(device, **tensors):
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the symbols/indexes are on {device}: "
                             "all tensors must be on one device")


def _symbols_indexes(symbols, indexes, allow_cuda: bool = False):
    symbols = _int32_tensor(symbols, "symbols", allow_cuda)
    indexes = _int32_tensor(indexes, "indexes", allow_cuda)
    if symbols.shape != indexes.shape:
        raise ValueError(f"symbols and indexes must have the same shape, got {tuple(symbols.shape)} "
                         f"and {tuple(indexes.shape)}")
    return symbols, indexes


def rans_encode(symbols, indexes, cdfs, cdf_lengths, offsets, lanes=None) -> bytes:
    """Encode int32 ``symbols`` with tables ``cdfs[indexes]`` into the native multi-lane stream.

    ``lanes=None`` lets the encoder choose (about one lane per 16k symbols, at most 64, fewer when
    the payload is small); an explicit count is capped at the symbol count and at 65536. The
    decoder handles any lane count with any number of threads.

    CUDA tensors (all on one device; CUDA builds) are encoded on the GPU into the very same bytes
    as the CPU coder would write for the same lane count; the stream comes back to the host.
    """
    symbols, indexes = _symbols_indexes(symbols, indexes, allow_cuda=True)
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    _same_rans_device(symbols.device, indexes=indexes, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    lanes = _lanes_arg(lanes)
    out = _ops.rans_encode(symbols, indexes, cdfs, cdf_lengths, offsets, lanes)
    return out.numpy().tobytes()


def _lanes_arg(lanes) -> int:
    """None (the coder chooses: 0 for the kernels) or an explicit count >= 1; a non-int is a
    TypeError and a count below 1 a ValueError, as for every other count argument."""
    if lanes is None:
        return 0
    return _count_arg(lanes, "lanes", 1)


def rans_decode(data, indexes, cdfs, cdf_lengths, offsets) -> torch.Tensor:
    """Decode a native stream; returns int32 symbols shaped like ``indexes``.

    Raises ValueError when the stream is malformed, truncated, corrupt or made for other indexes.
    With ``indexes`` on a CUDA device (CUDA builds; tables on the same device) the symbols are
    decoded on the GPU and returned there; ``data`` may stay on the host.
    """
    data = _stream_tensor(data, allow_cuda=True)
    indexes = _int32_tensor(indexes, "indexes", allow_cuda=True)
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    _same_rans_device(indexes.device, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    if data.device.type != "cpu":
        _same_rans_device(indexes.device, data=data)
    return _ops.rans_decode(data, indexes, cdfs, cdf_lengths, offsets)


def rans_stream_info(data) -> dict:
    """The header of a native stream (csrc/rans/FORMAT.md), validated like the decoder does it
    (magic, version, field ranges, lane lengths against the size, CRC-32C); ValueError otherwise.

    Returns ``{"precision", "states_per_lane", "symbols", "lanes", "lane_bytes"}`` (``lane_bytes``:
    each lane's payload size). Useful to check what an encoder chose without decoding.
    """
    data = _stream_tensor(data)
    info = _ops.rans_stream_info(data)
    return {"precision": info[0], "states_per_lane": info[1], "symbols": info[2], "lanes": info[3],
            "lane_bytes": list(info[4:])}


def rans_encode_batch(symbols, indexes, cdfs, cdf_lengths, offsets, lanes=None) -> list:
    """:func:`rans_encode` of several tensors sharing one set of tables: ``symbols[k]`` with
    ``indexes[k]`` gives stream k (bytes). On CUDA all streams are coded in the same kernel
    launches (one synchronisation for the whole batch); on the CPU it is a loop."""
    symbols, indexes = list(symbols), list(indexes)
    if len(symbols) != len(indexes):
        raise ValueError(f"symbols and indexes must be lists of the same length, got {len(symbols)} and {len(indexes)}")
    if not symbols:
        return []
    pairs = [_symbols_indexes(s, i, allow_cuda=True) for s, i in zip(symbols, indexes)]
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    device = pairs[0][0].device
    for k, (s, i) in enumerate(pairs):
        _same_rans_device(device, **{f"symbols[{k}]": s, f"indexes[{k}]": i})
    _same_rans_device(device, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    lanes = _lanes_arg(lanes)
    if device.type == "cpu":
        outs = [_ops.rans_encode(s, i, cdfs, cdf_lengths, offsets, lanes) for s, i in pairs]
    else:
        outs = _ops.rans_encode_batch([s for s, _ in pairs], [i for _, i in pairs], cdfs, cdf_lengths, offsets, lanes)
    return [o.numpy().tobytes() for o in outs]


def rans_decode_batch(data, indexes, cdfs, cdf_lengths, offsets) -> list:
    """:func:`rans_decode` of several streams sharing one set of tables; a list of int32 tensors
    shaped like ``indexes[k]``. On CUDA one launch decodes every lane of every stream."""
    data, indexes = list(data), list(indexes)
    if len(data) != len(indexes):
        raise ValueError(f"data and indexes must be lists of the same length, got {len(data)} and {len(indexes)}")
    if not data:
        return []
    data = [_stream_tensor(d, allow_cuda=True) for d in data]
    indexes = [_int32_tensor(i, "indexes", allow_cuda=True) for i in indexes]
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets, allow_cuda=True)
    device = indexes[0].device
    for k, i in enumerate(indexes):
        _same_rans_device(device, **{f"indexes[{k}]": i})
        if data[k].device.type != "cpu":
            _same_rans_device(device, **{f"data[{k}]": data[k]})
    _same_rans_device(device, cdfs=cdfs, cdf_lengths=cdf_lengths, offsets=offsets)
    if device.type == "cpu":
        return [_ops.rans_decode(d, i, cdfs, cdf_lengths, offsets) for d, i in zip(data, indexes)]
    return list(_ops.rans_decode_batch(data, indexes, cdfs, cdf_lengths, offsets))


def rans_encode_compat(symbols, indexes, cdfs, cdf_lengths, offsets) -> bytes:
    """Encode exactly as CompressAI 1.2.8's ``RansEncoder.encode_with_indexes`` (16-bit tables)."""
    symbols, indexes = _symbols_indexes(symbols, indexes)
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    return _ops.rans_encode_compat(symbols.reshape(-1), indexes.reshape(-1), cdfs, cdf_lengths,
                                   offsets).numpy().tobytes()


def rans_decode_compat(data, indexes, cdfs, cdf_lengths, offsets) -> torch.Tensor:
    """Decode a CompressAI stream (whole stream); int32 symbols shaped like ``indexes``."""
    data = _stream_tensor(data)
    indexes = _int32_tensor(indexes, "indexes")
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    return _ops.rans_decode_compat(data, indexes, cdfs, cdf_lengths, offsets)


def rans_decode_compat_stream(data: torch.Tensor, state: torch.Tensor, indexes, cdfs, cdf_lengths,
                              offsets) -> torch.Tensor:
    """Decode the next ``indexes.numel()`` symbols of a CompressAI stream.

    ``state`` is an int64 tensor [2] = (byte position, rANS state), updated in place; start with
    zeros. ``data`` must be a uint8 tensor (kept by the caller between calls).
    """
    # Checked here too: the op's schema would answer a non-tensor with a RuntimeError.
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a uint8 tensor (kept between calls), got {type(data).__name__}")
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be an int64 tensor [2], got {type(state).__name__}")
    indexes = _int32_tensor(indexes, "indexes")
    cdfs, cdf_lengths, offsets = _tables(cdfs, cdf_lengths, offsets)
    return _ops.rans_decode_compat_stream(data, state, indexes, cdfs, cdf_lengths, offsets)
# --- gdn ---
# Fused GDN / IGDN / simplified GDN ("GDN1"):  y_i = x_i * f(beta_i + sum_j gamma[i, j] * u(x_j))
# with u(x) = x^2, f = rsqrt (GDN) or sqrt (IGDN); simplified: u(x) = |x|, f(n) = 1/n or n.
# `beta` and `gamma` are the *effective* (already reparametrised) values, as CompressAI's
# forward computes them; gamma[i, j] is the weight of input channel j in output channel i
# (CompressAI passes gamma.reshape(C, C, 1, 1) to conv2d). An optional per-channel `bias`
# is added to x first (the preceding convolution's bias, folded into the same pass).

import functools  # noqa: E402  (kept inside this section so merges stay trivial)

_GDN_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GDN_CUDA_MAX_CHANNELS = 4096


@functools.lru_cache(maxsize=None)
def _gdn_has_native(device_type: str) -> bool:
    if not hasattr(_ops, "gdn_forward"):
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return "cuda=1" in _ops.build_info()
    return False


def _gdn_inplace_ok(x, *params) -> bool:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return False
    return hasattr(_ops, "gdn_forward_") and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))


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


def _gdn_check(x, beta, gamma, bias, check_finite: bool):
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
    _gdn_check(x, beta, gamma, bias, check_finite)
    dev = x.device.type
    native = _gdn_has_native(dev) and (
        x.dtype == torch.float32 or (dev == "cuda" and x.dtype in _GDN_CUDA_DTYPES))
    if dev == "cuda" and x.shape[1] > _GDN_CUDA_MAX_CHANNELS:
        native = False  # the CUDA kernel stages C x pixels tiles in 48 KiB of shared memory
    if not native:
        return gdn_reference(x, beta.to(x.dtype), gamma.to(x.dtype),
                             None if bias is None else bias.to(x.dtype), inverse, simplified)
    # Kernels take float32 parameters (they accumulate in float32 whatever x's dtype is).
    beta32, gamma32 = beta.float(), gamma.float()
    bias32 = None if bias is None else bias.float()
    if inplace and _gdn_inplace_ok(x, beta32, gamma32, bias32):
        return _ops.gdn_forward_(x, beta32, gamma32, bias32, bool(inverse), bool(simplified))
    return _GDNFunction.apply(x, beta32, gamma32, bias32, bool(inverse), bool(simplified))


# --- gaussian ---
# Gaussian conditional kernels (csrc/gaussian): scale -> table index, quantisation, the training
# likelihood and the coder's CDF tables. Semantics follow CompressAI 1.2.8 exactly where the
# docstrings say so.

_SCALE_NAN, _SCALE_INF, _SCALE_NEGATIVE = 1, 2, 4
_NATIVE_FLOATS = (torch.float32, torch.float64)
# CompressAI keeps its bounds in float32 buffers: the defaults are those float32 values.
DEFAULT_SCALE_BOUND = float(torch.tensor(0.11, dtype=torch.float32))
DEFAULT_LIKELIHOOD_BOUND = float(torch.tensor(1e-9, dtype=torch.float32))


def _require_tensor(name, value, floating=True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {value.dtype}")


def _same_device(name, value, ref_name, ref):
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def _bound_value(name, bound):
    """A lower bound given as a float or a one-element tensor -> (float value, dtype it compares in)."""
    if isinstance(bound, torch.Tensor):
        if bound.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(bound.shape)}")
        return float(bound.reshape(-1)[0]), bound.dtype
    return float(bound), torch.float32


# Prepared (validated, converted) scale tables, keyed by the identity and version counter of the
# caller's table and bound: a model calls build_indexes with the same buffers over and over (once
# per position in CompressAI's serial context models), and re-validating them each time cost more
# than the kernel. Entries hold the original tensors, so a matching identity is never a reused id.
_PREPARED_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_PREPARED_TABLES_SIZE = 8
_PREPARED_TABLES_LOCK = threading.Lock()  # encode/decode may run in several threads


def _prepared_table(scale_table, scale_bound, scales_dtype, device):
    _require_tensor("scale_table", scale_table)
    bound_is_tensor = isinstance(scale_bound, torch.Tensor)
    key = (id(scale_table), scale_table._version, id(scale_bound) if bound_is_tensor else scale_bound,
           scale_bound._version if bound_is_tensor else None, scales_dtype, device)
    with _PREPARED_TABLES_LOCK:
        hit = _PREPARED_TABLES.get(key)
        if hit is not None and hit[0] is scale_table and (not bound_is_tensor or hit[1] is scale_bound):
            _PREPARED_TABLES.move_to_end(key)
            return hit[2], hit[3]
    if scale_table.dim() != 1 or scale_table.numel() < 1:
        raise ValueError(f"scale_table must be a non-empty 1-D tensor, got shape {tuple(scale_table.shape)}")
    bound, bound_dtype = _bound_value("scale_bound", scale_bound)
    if bound != bound:
        raise ValueError("scale_bound is NaN")
    if scale_table.device.type == "cpu" and bool(torch.isnan(scale_table).any()):  # (no CUDA sync)
        raise ValueError("scale_table contains NaN")
    dtype = torch.promote_types(scales_dtype, bound_dtype)
    if dtype not in _NATIVE_FLOATS:
        dtype = torch.float32
    table = scale_table.to(device=device, dtype=dtype).contiguous()
    with _PREPARED_TABLES_LOCK:
        _PREPARED_TABLES[key] = (scale_table, scale_bound, table, bound)
        while len(_PREPARED_TABLES) > _PREPARED_TABLES_SIZE:
            _PREPARED_TABLES.popitem(last=False)
    return table, bound


def _index_inputs(scales, scale_table, scale_bound):
    """Bring scales/table to the dtype CompressAI compares in: torch.max(scales, bound) promotes
    with the bound (a 1-element float32 buffer), the table entries are then cast to that dtype."""
    _require_tensor("scales", scales)
    table, bound = _prepared_table(scale_table, scale_bound, scales.dtype, scales.device)
    return scales.to(table.dtype).contiguous(), table, bound


def build_indexes(scales, scale_table, scale_bound=DEFAULT_SCALE_BOUND, strict=True):
    """Index of each scale in `scale_table`, exactly CompressAI's GaussianConditional.build_indexes:
    the scale is first raised to `scale_bound`, then the index is the number of entries of
    scale_table[:-1] that are strictly below it (ties go to the lower index). int32, same shape.

    NaN scales always raise ValueError. With strict=True, negative and infinite scales raise too;
    with strict=False they are clamped as CompressAI does.
    """
    scales, table, bound = _index_inputs(scales, scale_table, scale_bound)
    check = _SCALE_NAN | ((_SCALE_INF | _SCALE_NEGATIVE) if strict else 0)
    return _ops.gaussian_build_indexes(scales, table, bound, check)


def _quantize_inputs(y, means):
    _require_tensor("y", y)
    if means is None:
        if y.dtype in _NATIVE_FLOATS:
            return y.contiguous(), None
        return y.float(), None
    _require_tensor("means", means)
    _same_device("means", means, "y", y)
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
    scales, table, bound = _index_inputs(scales, scale_table, scale_bound)
    _same_device("scales", scales, "y", y)
    if scales.shape != y.shape:
        raise ValueError(f"scales shape {tuple(scales.shape)} differs from y's {tuple(y.shape)}")
    check = _SCALE_NAN | ((_SCALE_INF | _SCALE_NEGATIVE) if strict else 0)
    return _ops.gaussian_quantize_indexes(y, means, scales, table, bound, check)


def dequantize(symbols, means=None, dtype=torch.float32):
    """CompressAI's EntropyModel.dequantize: symbols.type_as(means) + means, or symbols in `dtype`."""
    _require_tensor("symbols", symbols, floating=False)
    if means is None:
        if dtype not in _NATIVE_FLOATS or symbols.dtype != torch.int32:
            return symbols.to(dtype)
        return _ops.gaussian_dequantize(symbols.contiguous(), None, dtype)
    _require_tensor("means", means)
    _same_device("means", means, "symbols", symbols)
    try:
        means = means.expand_as(symbols)
    except RuntimeError:
        raise ValueError(
            f"means of shape {tuple(means.shape)} does not broadcast to symbols' {tuple(symbols.shape)}") from None
    if means.dtype not in _NATIVE_FLOATS or symbols.dtype != torch.int32:
        out = symbols.to(means.dtype)
        out += means
        return out
    return _ops.gaussian_dequantize(symbols.contiguous(), means.contiguous(), means.dtype)


class _GaussianLikelihood(torch.autograd.Function):
    """Fused Gaussian likelihood; its backward follows PyTorch autograd of CompressAI's reference
    (including both LowerBound gradient rules). Not twice differentiable."""

    @staticmethod
    def forward(ctx, inputs, scales, means, scale_bound, likelihood_bound):
        ctx.save_for_backward(inputs, scales, means)
        ctx.bounds = (scale_bound, likelihood_bound)
        return _ops.gaussian_likelihood(inputs, means, scales, scale_bound, likelihood_bound)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        inputs, scales, means = ctx.saved_tensors
        grad_inputs, grad_scales = _ops.gaussian_likelihood_backward(
            grad.contiguous(), inputs, means, scales, *ctx.bounds)
        grad_means = -grad_inputs if (means is not None and ctx.needs_input_grad[2]) else None
        return grad_inputs, grad_scales, grad_means, None, None


class _LowerBoundFunction(torch.autograd.Function):
    """max(x, bound); the gradient passes where x >= bound or where it would push x up
    (CompressAI's LowerBound rule)."""

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
    _require_tensor("x", x)
    if not isinstance(bound, torch.Tensor):
        bound = torch.tensor([float(bound)], dtype=x.dtype, device=x.device)
    return _LowerBoundFunction.apply(x, bound)


def gaussian_likelihood(inputs, scales, means=None, scale_bound=DEFAULT_SCALE_BOUND, likelihood_bound=DEFAULT_LIKELIHOOD_BOUND):
    """Likelihood of the unit bin around `inputs` under N(means, max(scales, scale_bound)), raised to
    at least `likelihood_bound` (pass None for no bound): CompressAI's GaussianConditional._likelihood
    followed by LowerBound, in one fused kernel with a fused backward. Broadcasts like PyTorch."""
    _require_tensor("inputs", inputs)
    _require_tensor("scales", scales)
    _same_device("scales", scales, "inputs", inputs)
    tensors = [inputs, scales]
    if means is not None:
        _require_tensor("means", means)
        _same_device("means", means, "inputs", inputs)
        tensors.append(means)
    sb, sb_dtype = _bound_value("scale_bound", scale_bound)
    if likelihood_bound is None:
        lb, lb_dtype = float("-inf"), torch.float32
    else:
        lb, lb_dtype = _bound_value("likelihood_bound", likelihood_bound)
    out_dtype = torch.promote_types(torch.promote_types(inputs.dtype, scales.dtype),
                                    means.dtype if means is not None else inputs.dtype)
    compute = out_dtype if out_dtype in _NATIVE_FLOATS else torch.float32
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        raise ValueError("inputs, scales and means do not broadcast: "
                         + ", ".join(str(tuple(t.shape)) for t in tensors)) from None
    if scales.shape != shape:
        # LowerBound's gradient rule looks at the gradient summed over the broadcast dimensions,
        # so a broadcast scale tensor is bounded before it is expanded.
        tensors[1] = lower_bound(scales.to(compute), sb)
        sb = float("-inf")
    prepared = [t.to(compute).expand(shape).contiguous() for t in tensors]
    x, s = prepared[0], prepared[1]
    m = prepared[2] if means is not None else None
    out = _GaussianLikelihood.apply(x, s, m, sb, lb)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def pmf_to_quantized_cdf(pmf, lengths=None, precision=16):
    """CompressAI's pmf_to_quantized_cdf on every row of a 2-D pmf [T, L] (float32 values, as
    CompressAI's C++ takes them). Row i uses pmf[i, :lengths[i]] (all L when lengths is None).
    Returns int32 [T, L + 1]; row i holds lengths[i] + 1 CDF values then zeros. A 1-D pmf gives
    a 1-D CDF of L + 1 values."""
    _require_tensor("pmf", pmf)
    if not 1 <= int(precision) <= 30:
        raise ValueError(f"precision must be in [1, 30], got {precision}")
    one_d = pmf.dim() == 1
    if one_d:
        pmf = pmf[None]
    if pmf.dim() != 2 or pmf.size(1) < 1:
        raise ValueError(f"pmf must be 1-D or 2-D with at least one value per row, got shape {tuple(pmf.shape)}")
    if lengths is None:
        lengths = torch.full((pmf.size(0),), pmf.size(1), dtype=torch.int32)
    else:
        _require_tensor("lengths", lengths, floating=False)
        if lengths.shape != (pmf.size(0),):
            raise ValueError(f"lengths must have shape ({pmf.size(0)},), got {tuple(lengths.shape)}")
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > pmf.size(1)):
            # Checked before the int32 cast below, which would wrap values beyond int32.
            raise ValueError(f"lengths must lie in [1, {pmf.size(1)}], got [{int(lengths.min())}, {int(lengths.max())}]")
    cdf = _ops.pmf_to_quantized_cdf(pmf.detach().cpu().float(), lengths.cpu().int(), int(precision))
    return cdf[0] if one_d else cdf


def gaussian_cdf_tables(scale_table, tail_mass=1e-9, precision=16):
    """(quantized_cdf int32 [T, Lmax], cdf_length int32 [T], offset int32 [T]) for a Gaussian scale
    table, equal to what CompressAI's GaussianConditional.update() stores. Computed on the CPU."""
    _require_tensor("scale_table", scale_table)
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
        raise ValueError(f"scale_table entry too large for {int(precision)}-bit precision: "
                         f"the pmf needs {longest} symbols")
    return tuple(_ops.gaussian_cdf_tables(scale_table.detach().cpu(), float(tail_mass), int(precision)))
