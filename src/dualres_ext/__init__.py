"""dualres_ext: fast learned image compression on PyTorch.

Native operators live in ``torch.ops.dualres_ext`` (loaded by importing ``dualres_ext._C``);
``dualres_ext.ops`` wraps them with argument checks.
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
    """How the native extension was built: ``{"cuda": bool, "openmp": ..., "simd": ..., "compiler": ...}``."""
    info = {}
    for item in ops.build_info().split(" ", 3):
        key, _, value = item.partition("=")
        info[key] = value
    info["cuda"] = info.get("cuda") == "1"
    return info


__all__ = ["ops", "build_info", "encode", "decode", "__version__"]

