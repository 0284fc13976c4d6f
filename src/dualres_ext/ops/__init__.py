"""Checked wrappers around ``torch.ops.dualres_ext``, one module per op family of ``csrc/``.

* :mod:`.rans`: rANS entropy coding, native multi-lane and CompressAI streams (csrc/rans);
* :mod:`.rans_interleaved`: the interleaved stream for SIMD and warps (csrc/rans, version 2);
* :mod:`.gaussian`: Gaussian conditional indexing, quantisation, likelihood, CDF tables (csrc/gaussian);
* :mod:`.gdn`: fused GDN / IGDN (csrc/gdn);
* :mod:`.int_conv`: the integer convolutions of ``dualres_ext.integer`` on CPU (csrc/integer);
* :mod:`.args`: argument conversion shared by the families.

Every wrapper takes Python values and tensors and raises TypeError/ValueError naming the argument;
each check is made once, either in the wrapper or in the kernel (which also guards what it cannot
trust, such as bitstream bytes). The op schemas are declared in csrc/register.cpp.
"""

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.dualres_ext.*)
from . import (
    int_conv,  # noqa: F401  (integer convolutions: their own namespace, used by integer.py)
    rans_interleaved,  # noqa: F401  (the interleaved stream, version 2: its own namespace)
)
from .gaussian import (
    DEFAULT_LIKELIHOOD_BOUND,
    DEFAULT_SCALE_BOUND,
    ScaleTable,
    build_indexes,
    dequantize,
    gaussian_cdf_tables,
    gaussian_likelihood,
    lower_bound,
    pmf_to_quantized_cdf,
    quantize_and_index,
    quantize_symbols,
)
from .gdn import gdn, gdn_reference
from .rans import (
    is_native_stream,
    rans_decode,
    rans_decode_batch,
    rans_decode_compat,
    rans_decode_compat_stream,
    rans_embed,
    rans_encode,
    rans_encode_batch,
    rans_encode_compat,
    rans_restore,
    rans_stream_info,
    stream_kind,
)


def build_info() -> str:
    """The raw build description string of the native library."""
    return torch.ops.dualres_ext.build_info()


__all__ = [
    "build_info",
    # rans
    "rans_encode",
    "rans_decode",
    "rans_stream_info",
    "is_native_stream",
    "stream_kind",
    "rans_encode_batch",
    "rans_decode_batch",
    "rans_embed",
    "rans_restore",
    "rans_encode_compat",
    "rans_decode_compat",
    "rans_decode_compat_stream",
    # gaussian
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
    # gdn
    "gdn",
    "gdn_reference",
]
