"""dualres_ext: fast learned image compression on PyTorch.

``encode`` / ``decode`` turn images into ``.drx`` bitstreams and back (:mod:`.codec`); importing the
package also registers the format with Pillow (:mod:`.pillow`). Native operators live in
``torch.ops.dualres_ext`` (loaded by importing ``dualres_ext._C``); :mod:`.ops` wraps them with
argument checks. ``docs/ARCHITECTURE.md`` maps the rest.
"""

import torch  # noqa: F401  (must come first: _C links against libc10/libtorch)

try:
    from . import _C  # noqa: F401  (loads the library and registers torch.ops.dualres_ext.*)
except ImportError as exc:
    if "_C" not in str(exc):
        raise
    raise ImportError(
        f"dualres_ext's native extension (_C) is not built next to {__file__}. Install the package "
        "(pip install .) and run Python from any folder, or build it in place for development: "
        "python setup.py build_ext --inplace, then PYTHONPATH=src"
    ) from exc
from . import ops, pillow  # noqa: F401  (pillow: registers the .drx format with Pillow)
from .codec import decode, encode

__version__ = "0.1.0"


def build_info() -> dict:
    """How the native extension was built, and which CPU kernels it runs.

    ``{"cuda": bool, "openmp": ..., "simd": ..., "native": bool, "cpu_kernels": ...,
    "cpu_supported": ..., "compiler": ...}``: ``simd`` is the instruction set the whole build may
    assume ("baseline" for a portable build), ``native`` whether it was built with -march=native
    (DUALRES_NATIVE=1), ``cpu_kernels`` the set the CPU kernels use now (scalar, avx2 or avx512:
    detected at run time, or forced with DUALRES_CPU_KERNELS) and ``cpu_supported`` the sets this
    CPU can run, comma-separated.
    """
    head, _, compiler = ops.build_info().partition(" compiler=")
    info = {}
    for item in head.split():
        key, _, value = item.partition("=")
        info[key] = value
    info["compiler"] = compiler
    info["cuda"] = info.get("cuda") == "1"
    info["native"] = info.get("native") == "1"
    return info


__all__ = ["ops", "build_info", "encode", "decode", "__version__"]
