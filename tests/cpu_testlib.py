"""Shared helpers of the tests that choose the native CPU kernel set (scalar / AVX2 / AVX-512).

Imported by path because pytest runs with --import-mode=importlib (tests are not a package).
"""

import contextlib

import torch

import dualres_ext

# The kernel sets this CPU can run (build_info's "cpu_supported").
SUPPORTED = dualres_ext.build_info()["cpu_supported"].split(",")


@contextlib.contextmanager
def cpu_kernels(name):
    """Within the block, the native ops run the kernel set ``name``; the previous one after."""
    before = torch.ops.dualres_ext.set_cpu_kernels(name)
    try:
        yield
    finally:
        torch.ops.dualres_ext.set_cpu_kernels(before)
