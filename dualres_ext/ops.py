"""Thin, checked wrappers around ``torch.ops.dualres_ext``.

Every public function validates its arguments here (dtype, device, shape, ranges) and raises
``TypeError``/``ValueError`` naming the argument, so that the C++ kernels only ever see
well-formed tensors. The C++ side still checks what it cannot trust (bitstream bytes).
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401

_ops = torch.ops.dualres_ext


def build_info() -> str:
    """The raw build description string of the native library."""
    return _ops.build_info()
