"""Argument conversion shared by the op families.

Python values (lists, numpy arrays, bytes) become the tensors the native ops take, and what the
op schemas cannot report clearly (a non-tensor argument, a device no kernel is registered for, an
integer that does not fit int32) is refused here with TypeError/ValueError naming the argument.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: _CUDA_BUILT reads its build_info)

# A property of the loaded library, read once at import: a plain bool is a constant for
# torch.compile, which could not trace the str-returning build_info op.
_CUDA_BUILT: bool = "cuda=1" in torch.ops.dualres_ext.build_info()


def cuda_built() -> bool:
    """Whether the native library was built with its CUDA kernels."""
    return _CUDA_BUILT


def int32_tensor(x, name: str, allow_cuda: bool = False) -> torch.Tensor:
    """An int32 tensor from a tensor, numpy array or (nested) list of integers; on the CPU, or on
    a CUDA device when ``allow_cuda`` and the extension was built with CUDA (native stream ops).

    Integers outside the int32 range raise ValueError, anything that is not integers TypeError."""
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
    if x.device.type != "cpu" and not (allow_cuda and x.device.type == "cuda" and cuda_built()):
        where = "the CPU or a CUDA device" if allow_cuda else "the CPU"
        raise ValueError(
            f"{name} must be on {where} (this build: {'with' if cuda_built() else 'without'} CUDA), got {x.device}"
        )
    if x.dtype == torch.int32:
        return x
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    if x.numel() and (int(x.min()) < -(2**31) or int(x.max()) >= 2**31):
        raise ValueError(f"{name} has values outside the int32 range")
    return x.to(torch.int32)


def stream_tensor(data, allow_cuda: bool = False) -> torch.Tensor:
    """A bitstream (bytes, bytearray, memoryview or uint8 tensor) as a flat uint8 tensor; on the
    CPU, or on a CUDA device when ``allow_cuda`` and the extension was built with CUDA."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"data must be a uint8 tensor or bytes-like, got a {data.dtype} tensor")
        if data.device.type != "cpu" and not (allow_cuda and data.device.type == "cuda" and cuda_built()):
            raise ValueError(f"data must be on the CPU, got {data.device}")
        return data.reshape(-1).contiguous()
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            return torch.empty(0, dtype=torch.uint8)
        # A private writable copy: frombuffer on read-only bytes warns, and callers may reuse buffers.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raise TypeError(f"data must be bytes, bytearray, memoryview or a uint8 tensor, got {type(data).__name__}")


def int_arg(value, name: str) -> int:
    """``value`` if it is an int (not a bool): the op schemas would answer anything else with a
    RuntimeError. Ranges are the caller's (or the kernel's) to check."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def require_tensor(name: str, value, floating: bool = True) -> None:
    """TypeError unless ``value`` is a tensor (a floating point one when ``floating``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {value.dtype}")


def same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """ValueError unless ``value`` is on ``ref``'s device."""
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")
