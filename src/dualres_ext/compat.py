"""Drop-in acceleration of existing CompressAI (1.2.8) models: ``accelerate(model)``.

This module imports compressai (an optional dependency); ``import dualres_ext`` never does.

What :func:`accelerate` changes, in place:

* every ``compressai.layers.GDN`` / ``GDN1`` becomes :class:`dualres_ext.layers.GDN` / ``GDN1``
  sharing the same ``beta``/``gamma`` Parameter objects (an optimiser built before still trains
  them) and the same buffers;
* every ``EntropyBottleneck`` / ``GaussianConditional`` keeps its object, parameters, buffers and
  CompressAI class ancestry (``CompressionModel.update()``, ``aux_loss()`` and ``load_state_dict()``
  select modules with ``isinstance`` checks) but its class becomes a subclass whose
  ``compress``/``decompress`` (and ``build_indexes``) run on dualres_ext's kernels: tensors in,
  bytes out, no Python lists. ``lanes=None`` writes CompressAI's exact bytes; ``lanes="auto"`` writes
  the native interleaved stream instead, ``"multilane"`` or an int the multi-lane one (any
  accelerated model reads every stream; plain CompressAI reads only its own);
* serial context models (mbt2018, cheng2020-anchor, ``RasterScanLatentCodec``) build their coder
  with ``BufferedRansEncoder()`` / ``RansDecoder()`` names imported from ``compressai.ans``. Those
  names are replaced, in the modules that imported them, by switches that construct
  :mod:`dualres_ext.ans`' coders while an accelerated model codes (or while the registry default is
  ``"dualres"``) and CompressAI's otherwise. Ours convert the CDF lists of a serial decode once
  instead of at every ``decode_stream`` call. Their streams stay CompressAI's format (``lanes``
  does not apply to these per-position streams).

:func:`register_entropy_coder` (run on import of this module) adds ``"dualres"`` to CompressAI's
entropy-coder registry, so ``compressai.set_entropy_coder("dualres")`` makes every CompressAI
entropy model created afterwards code through :mod:`dualres_ext.ans` (list API, same bytes).
"""

from __future__ import annotations

import contextvars
import sys
from typing import List, Optional, Union

import compressai
import compressai.ans as _cai_ans
import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import entropy_models as _cai_em
from compressai.latent_codecs import LatentCodec as _LatentCodec
from compressai.layers import gdn as _cai_gdn
from compressai.models import google as _cai_google
from torch import Tensor

from . import ans as _ans
from . import coding, ops
from . import layers as _layers
from .coding import check_lanes
from .entropy_models import check_compress_args, check_decompress_args
from .exact_hyperprior import make_portable

__all__ = [
    "CODER_NAME",
    "accelerate",
    "register_entropy_coder",
    "DualresEntropyBottleneck",
    "DualresGaussianConditional",
]

CODER_NAME = "dualres"

_CaiEntropyBottleneck = _cai_em.EntropyBottleneck
_CaiGaussianConditional = _cai_em.GaussianConditional


# --- registry -------------------------------------------------------------------------------

_original_entropy_coder_init = _cai_em._EntropyCoder.__init__


def _entropy_coder_init(self, method):
    # CompressAI's _EntropyCoder picks its coder with a hard-coded if/elif: add our branch.
    if method == CODER_NAME and CODER_NAME in compressai.available_entropy_coders():
        self.name = method
        self._encoder = _ans.RansEncoder()
        self._decoder = _ans.RansDecoder()
        return
    _original_entropy_coder_init(self, method)


_entropy_coder_init._dualres = True


def register_entropy_coder() -> None:
    """Make ``compressai.set_entropy_coder("dualres")`` work (idempotent).

    Also installs the switches of the serial context models (see the module docstring)."""
    coders = compressai.available_entropy_coders()  # CompressAI's own list object
    if CODER_NAME not in coders:
        coders.append(CODER_NAME)
    if not getattr(_cai_em._EntropyCoder.__init__, "_dualres", False):
        _cai_em._EntropyCoder.__init__ = _entropy_coder_init
    for name, module in list(sys.modules.items()):
        if name.startswith("compressai.") and name != "compressai.ans":
            _install_switches(module)


# --- serial context models: compressai.ans names -> switches ------------------------------------

# True while an accelerated model's compress/decompress runs (per thread / asyncio task).
_in_accelerated_call = contextvars.ContextVar("dualres_compat_in_accelerated_call", default=False)


def _use_dualres_coder() -> bool:
    return _in_accelerated_call.get() or compressai.get_entropy_coder() == CODER_NAME


class _CoderSwitch:
    """Stands in for ``compressai.ans.<name>`` in a module that imported the name: calling it builds
    dualres_ext's coder inside an accelerated call (or with the "dualres" registry default), and
    CompressAI's otherwise, so models that were not accelerated are untouched."""

    def __init__(self, original, ours):
        self.original = original
        self.ours = ours
        self.__name__ = original.__name__
        self.__doc__ = original.__doc__

    def __call__(self, *args, **kwargs):
        return (self.ours if _use_dualres_coder() else self.original)(*args, **kwargs)

    def __repr__(self):
        return f"<dualres_ext.compat switch for compressai.ans.{self.__name__}>"


_SWITCHES = {
    name: _CoderSwitch(getattr(_cai_ans, name), getattr(_ans, name))
    for name in ("RansEncoder", "RansDecoder", "BufferedRansEncoder")
}


def _install_switches(module) -> None:
    if module is None or module is _cai_ans:
        return
    for name, switch in _SWITCHES.items():
        if getattr(module, name, None) is switch.original:
            setattr(module, name, switch)


class _AcceleratedCall:
    """Instance attribute that shadows a model's ``compress``/``decompress``: runs the class's method
    with :data:`_in_accelerated_call` set. A plain object (not a closure) so that deepcopy and
    pickling of the model keep working."""

    def __init__(self, owner: nn.Module, method: str):
        self.owner = owner
        self.method = method

    def __call__(self, *args, **kwargs):
        token = _in_accelerated_call.set(True)
        try:
            return getattr(type(self.owner), self.method)(self.owner, *args, **kwargs)
        finally:
            _in_accelerated_call.reset(token)


# --- serial context models: the per-position loops on tensors --------------------------------------


class _BoundLoop:
    """Instance attribute standing in for a model's ``_compress_ar``/``_decompress_ar`` (a plain
    object, not a closure, so deepcopy and pickling keep working)."""

    def __init__(self, owner: nn.Module, function):
        self.owner = owner
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(self.owner, *args, **kwargs)


def _position_params(model, y_crop, params, h, w, weight):
    """CompressAI's per-position step: masked context conv + entropy parameters -> (scales, means)."""
    ctx_p = F.conv2d(y_crop, weight, bias=model.context_prediction.bias)
    p = params[:, :, h : h + 1, w : w + 1]
    return model.entropy_parameters(torch.cat((p, ctx_p), dim=1)).chunk(2, 1)


def _compress_ar(model, y_hat, params, height, width, kernel_size, padding):
    """``JointAutoregressiveHierarchicalPriors._compress_ar`` (CompressAI 1.2.8) with the same
    bytes: the serial loop still computes each position's parameters and quantises it (later
    positions see it), but the scales and symbols go into two tensors, and ``build_indexes`` and
    the coder run once at the end instead of 2 x H x W list conversions and H x W index calls."""
    if y_hat.size(0) != 1:  # CompressAI calls this per image; anything else: its own code
        return type(model)._compress_ar(model, y_hat, params, height, width, kernel_size, padding)
    gc = model.gaussian_conditional
    masked_weight = model.context_prediction.weight * model.context_prediction.mask
    scales = symbols = None
    for h in range(height):
        for w in range(width):
            y_crop = y_hat[:, :, h : h + kernel_size, w : w + kernel_size]
            scales_hat, means_hat = _position_params(model, y_crop, params, h, w, masked_weight)
            scales_hat, means_hat = scales_hat.squeeze(3).squeeze(2), means_hat.squeeze(3).squeeze(2)
            y_q = gc.quantize(y_crop[:, :, padding, padding], "symbols", means_hat)
            y_hat[:, :, h + padding, w + padding] = y_q + means_hat
            if scales is None:
                scales = scales_hat.new_empty(height * width, scales_hat.size(1))
                symbols = y_q.new_empty(height * width, y_q.size(1))
            scales[h * width + w] = scales_hat[0]
            symbols[h * width + w] = y_q[0]
    if scales is None:
        return type(model)._compress_ar(model, y_hat, params, height, width, kernel_size, padding)
    indexes = gc.build_indexes(scales)
    encoder = _ans.BufferedRansEncoder()
    encoder.encode_with_indexes(symbols.reshape(-1).cpu(), indexes.reshape(-1).cpu(), *gc._dualres_tables())
    return encoder.flush()


def _decompress_ar(model, y_string, y_hat, params, height, width, kernel_size, padding):
    """``JointAutoregressiveHierarchicalPriors._decompress_ar`` without Python lists: indexes go to
    the coder and symbols come back as tensors (same values, same stream)."""
    if y_hat.size(0) != 1:
        return type(model)._decompress_ar(model, y_string, y_hat, params, height, width, kernel_size, padding)
    gc = model.gaussian_conditional
    tables = gc._dualres_tables()
    decoder = _ans.RansDecoder()
    decoder.set_stream(y_string)
    for h in range(height):
        for w in range(width):
            y_crop = y_hat[:, :, h : h + kernel_size, w : w + kernel_size]
            scales_hat, means_hat = _position_params(model, y_crop, params, h, w, model.context_prediction.weight)
            indexes = gc.build_indexes(scales_hat)
            rv = decoder.decode_stream(indexes.reshape(-1).cpu(), *tables)
            # float32 first, as CompressAI's torch.Tensor(list) does, then its dequantize.
            rv = gc.dequantize(rv.to(device=means_hat.device, dtype=torch.float32).reshape(1, -1, 1, 1), means_hat)
            y_hat[:, :, h + padding : h + padding + 1, w + padding : w + padding + 1] = rv


def _install_serial_loops(module: nn.Module) -> None:
    """Tensor loops for mbt2018 / cheng2020-anchor style models that use CompressAI's own loops."""
    cls = type(module)
    if not isinstance(module, _cai_google.JointAutoregressiveHierarchicalPriors):
        return
    base = _cai_google.JointAutoregressiveHierarchicalPriors
    if cls._compress_ar is base._compress_ar and "_compress_ar" not in module.__dict__:
        module.__dict__["_compress_ar"] = _BoundLoop(module, _compress_ar)
    if cls._decompress_ar is base._decompress_ar and "_decompress_ar" not in module.__dict__:
        module.__dict__["_decompress_ar"] = _BoundLoop(module, _decompress_ar)


# --- entropy models -----------------------------------------------------------------------------


class _NativeCoding:
    """Shared coding path of the accelerated entropy models (mixed in before CompressAI's class)."""

    # None: CompressAI's byte-identical stream; "auto": the native interleaved stream; "multilane"
    # or an int: the multi-lane stream.
    lanes: Union[None, str, int] = None

    def _dualres_tables(self) -> coding.CoderTables:
        return coding.coder_tables(self, self._quantized_cdf, self._cdf_length, self._offset)

    def _dualres_compress(self, inputs: Tensor, indexes: Tensor, means: Optional[Tensor]) -> List[bytes]:
        check_compress_args(inputs, indexes)
        self._check_cdf_size()
        self._check_cdf_length()
        self._check_offsets_size()
        tables = self._dualres_tables()
        n = inputs.size(0)
        symbols = ops.quantize_symbols(inputs, means).cpu().reshape(n, -1)
        flat = indexes.detach().to("cpu", torch.int32).reshape(n, -1)
        return coding.encode_batch(symbols, flat, tables, self.lanes)

    def _dualres_decompress(self, strings, indexes: Tensor, dtype: torch.dtype, means: Optional[Tensor]) -> Tensor:
        check_decompress_args(strings, indexes, means)
        self._check_cdf_size()
        self._check_cdf_length()
        self._check_offsets_size()
        tables = self._dualres_tables()
        flat = indexes.detach().to("cpu", torch.int32).reshape(len(strings), -1)
        # Either stream, whatever ``lanes`` is. CompressAI's pybind decoder takes str too (as UTF-8).
        strings = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
        symbols = coding.decode_batch(strings, flat, tables)
        symbols = symbols.reshape(indexes.shape).to(self._quantized_cdf.device)
        return ops.dequantize(symbols, means, dtype)


class _NativeEntropyBottleneck(_NativeCoding):
    def compress(self, x: Tensor) -> List[bytes]:
        n, c = x.size(0), x.size(1)
        spatial = x.dim() - 2
        indexes = torch.arange(c, dtype=torch.int32).view(1, c, *([1] * spatial)).expand(x.shape)
        medians = self._extend_ndims(self._get_medians().detach(), spatial)
        medians = medians.expand(n, *([-1] * (spatial + 1)))
        return self._dualres_compress(x, indexes, medians)

    def decompress(self, strings, size) -> Tensor:
        output_size = (len(strings), self._quantized_cdf.size(0), *size)
        c = output_size[1]
        indexes = torch.arange(c, dtype=torch.int32).view(1, c, *([1] * len(size))).expand(output_size)
        medians = self._extend_ndims(self._get_medians().detach(), len(size))
        medians = medians.expand(len(strings), *([-1] * (len(size) + 1)))
        return self._dualres_decompress(strings, indexes, medians.dtype, medians)


class _NativeGaussianConditional(_NativeCoding):
    def compress(self, inputs: Tensor, indexes: Tensor, means: Optional[Tensor] = None) -> List[bytes]:
        return self._dualres_compress(inputs, indexes, means)

    def decompress(
        self, strings, indexes: Tensor, dtype: torch.dtype = torch.float, means: Optional[Tensor] = None
    ) -> Tensor:
        return self._dualres_decompress(strings, indexes, dtype, means)

    def build_indexes(self, scales: Tensor) -> Tensor:
        # One pass instead of CompressAI's loop over the table (63 comparisons of the whole tensor);
        # same result, except that NaN scales raise ValueError.
        table = coding.scale_table(self, self.scale_table, self.lower_bound_scale.bound)
        return table.build_indexes(scales, strict=False)


class DualresEntropyBottleneck(_NativeEntropyBottleneck, _CaiEntropyBottleneck):
    """A CompressAI EntropyBottleneck whose compress/decompress run on dualres_ext."""


class DualresGaussianConditional(_NativeGaussianConditional, _CaiGaussianConditional):
    """A CompressAI GaussianConditional whose compress/decompress/build_indexes run on dualres_ext."""


# Methods that a CompressAI subclass must not override for our coding path to stand in for them.
_REPLACED = {
    _CaiEntropyBottleneck: (
        _NativeEntropyBottleneck,
        DualresEntropyBottleneck,
        ("compress", "decompress", "_build_indexes", "quantize", "dequantize"),
    ),
    _CaiGaussianConditional: (
        _NativeGaussianConditional,
        DualresGaussianConditional,
        ("compress", "decompress", "build_indexes", "quantize", "dequantize"),
    ),
}
_derived_classes: dict = {}


def _accelerated_class(cls):
    """The accelerated class for a CompressAI entropy model class, or None if we cannot stand in."""
    if issubclass(cls, _NativeCoding):
        return cls
    for base, (mixin, exact, methods) in _REPLACED.items():
        if cls is base:
            return exact
        if issubclass(cls, base):
            if any(getattr(cls, m) is not getattr(base, m) for m in methods):
                return None  # e.g. GaussianMixtureConditional: its own coding path
            if cls not in _derived_classes:
                _derived_classes[cls] = type(f"Dualres{cls.__name__}", (mixin, cls), {"__module__": __name__})
            return _derived_classes[cls]
    return None


# --- GDN ------------------------------------------------------------------------------------------


def _fused_gdn(old: nn.Module) -> nn.Module:
    cls = _layers.GDN1 if type(old) is _cai_gdn.GDN1 else _layers.GDN
    new = cls(old.beta.numel(), inverse=old.inverse, beta_min=old.beta_reparam.minimum)
    new.beta_reparam.reparam_offset = old.beta_reparam.reparam_offset
    new.gamma_reparam.minimum = old.gamma_reparam.minimum
    new.gamma_reparam.reparam_offset = old.gamma_reparam.reparam_offset
    new.load_state_dict(old.state_dict())  # buffers (pedestals, bounds) and values
    new.to(device=old.beta.device, dtype=old.beta.dtype)
    # Share the Parameter objects themselves: optimisers and hooks that hold them keep working.
    new.beta = old.beta
    new.gamma = old.gamma
    new.train(old.training)
    return new


# --- accelerate -------------------------------------------------------------------------------------


def accelerate(
    model: nn.Module, lanes: Union[None, str, int] = None, gdn: bool = True, portable: bool = False
) -> nn.Module:
    """Make a CompressAI model (or any module holding CompressAI parts) code and run faster, in place.

    Args:
        model: the module; returned, modified in place.
        lanes: ``None`` (default) keeps CompressAI's bitstream byte for byte, so existing streams
            decode and new streams decode with plain CompressAI. ``"auto"`` writes
            dualres_ext's native (interleaved) stream for the EntropyBottleneck /
            GaussianConditional parts, ``"multilane"`` or an int >= 1 the multi-lane stream
            (faster, multi-threaded; accelerated models decode every kind whatever their
            ``lanes``, plain CompressAI only its own).
        gdn: swap CompressAI's GDN/GDN1 for the fused layers. Their output equals CompressAI's to
            float rounding (not bit for bit), so the analysis transform can round a latent the other
            way in rare cases; pass ``gdn=False`` where the encoder must reproduce CompressAI's
            bytes from the same image exactly. Decoding is exact either way up to the synthesis.
        portable: (opt-in, hyperprior models: bmshj2018-hyperprior, mbt2018-mean) run the hyper
            synthesis on integers while coding (:mod:`dualres_ext.exact_hyperprior`, no
            retraining), so that streams decode on every CPU, GPU and thread count; costs a little
            rate, and the streams are marked and no longer CompressAI's (nor decodable by it).

    Returns the same model. Calling it again updates ``lanes``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lanes = check_lanes(lanes)
    register_entropy_coder()

    for module in list(model.modules()):
        cls = _accelerated_class(type(module))
        if cls is not None:
            if type(module) is not cls:
                module.__class__ = cls
            module.lanes = lanes
        if gdn:
            for name, child in list(module.named_children()):
                if type(child) in (_cai_gdn.GDN, _cai_gdn.GDN1):
                    setattr(module, name, _fused_gdn(child))
        # Modules that define user classes may have imported compressai.ans names too.
        _install_switches(sys.modules.get(type(module).__module__))
        _install_serial_loops(module)

    # Select our coders in the serial context models while this model (or one of its latent codecs,
    # when called directly) codes.
    for module in model.modules():
        if module is model or isinstance(module, _LatentCodec):
            for method in ("compress", "decompress"):
                if callable(getattr(type(module), method, None)) and method not in module.__dict__:
                    module.__dict__[method] = _AcceleratedCall(module, method)
    if portable:
        make_portable(model)
    return model


register_entropy_coder()
