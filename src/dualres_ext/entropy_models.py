"""EntropyBottleneck and GaussianConditional on dualres_ext's native kernels.

Drop-in replacements for ``compressai.entropy_models`` (1.2.8): the same constructor arguments,
methods, parameters and buffers, so a CompressAI state dict loads unchanged (``strict=True``) and,
in the default single-lane mode, ``compress`` returns byte-identical strings. CompressAI itself is
never imported.

``lanes`` (constructor keyword, attribute, or a keyword of compress/decompress for one call)
picks the bitstream:
  * ``None`` (default): CompressAI's single-lane rANS stream, byte-identical to CompressAI.
  * ``"auto"``: dualres_ext's native stream, the interleaved layout for SIMD units and GPU warps
    (csrc/rans/FORMAT.md; its width is chosen by the stream's size and written in it).
  * ``"multilane"`` or an int >= 1: the earlier native multi-lane stream (an automatic or the
    given lane count, written in the stream).
Decoders read every native stream whatever their own ``lanes`` says. In CompressAI mode,
decompress also recognises native strings by their header, so strings made with
``compress(..., lanes="auto")`` decode with a plain ``decompress(...)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import coding, ops
from .coding import check_lanes
from .layers import LowerBound  # the one LowerBound module (same buffer and gradient as CompressAI's)

__all__ = ["LowerBound", "EntropyModel", "EntropyBottleneck", "GaussianConditional"]


def check_compress_args(inputs: Tensor, indexes: Tensor) -> None:
    """CompressAI's argument checks of ``compress(inputs, indexes)`` (same messages), shared by the
    modules here and by the CompressAI models that :mod:`dualres_ext.compat` accelerates."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 2:
        raise ValueError("Invalid `inputs` size. Expected a tensor with at least 2 dimensions.")
    if inputs.size() != indexes.size():
        raise ValueError("`inputs` and `indexes` should have the same size.")


def check_decompress_args(strings, indexes: Tensor, means: Optional[Tensor]) -> None:
    """CompressAI's argument checks of ``decompress(strings, indexes, dtype, means)``: one string
    per batch element, indexes (N, C, ...), means of the indexes' shape or broadcastable over the
    spatial dimensions."""
    if not isinstance(strings, (tuple, list)):
        raise ValueError("Invalid `strings` parameter type.")
    if not len(strings) == indexes.size(0):
        raise ValueError("Invalid strings or indexes parameters")
    if indexes.dim() < 2:
        raise ValueError("Invalid `indexes` size. Expected a tensor with at least 2 dimensions.")
    if means is not None:
        if means.size()[:2] != indexes.size()[:2]:
            raise ValueError("Invalid means or indexes parameters")
        if means.size() != indexes.size():
            for i in range(2, indexes.dim()):
                if means.size(i) != 1:
                    raise ValueError("Invalid means parameters")


def _dequantize_in_decoder(indexes: Tensor, means: Optional[Tensor], dtype: torch.dtype) -> bool:
    """Whether ``decompress`` may have the decoder write ``dequantize(symbols, means, dtype)`` itself
    (the same values, no pass over the symbols after it): host indexes, float32/float64 output,
    means on the host of the indexes' very shape (no broadcasting) and needing no gradient."""
    if indexes.device.type != "cpu":
        return False
    if means is None:
        return dtype in (torch.float32, torch.float64)
    return (
        means.device.type == "cpu"
        and means.dtype in (torch.float32, torch.float64)
        and means.shape == indexes.shape
        and not (means.requires_grad and torch.is_grad_enabled())
    )


class EntropyModel(nn.Module):
    """Base class: quantisation, the coder tables and compress/decompress on the native coder.

    Args:
        likelihood_bound: minimum likelihood (0 disables the bound)
        entropy_coder: only "ans" (or None) is available
        entropy_coder_precision: bits of the quantized CDFs (16 like CompressAI)
        lanes: None for CompressAI-compatible strings, "auto" for the native (interleaved) stream,
            "multilane"/int for the multi-lane stream
    """

    _offset: Tensor
    _quantized_cdf: Tensor
    _cdf_length: Tensor

    def __init__(
        self,
        likelihood_bound: float = 1e-9,
        entropy_coder: Optional[str] = None,
        entropy_coder_precision: int = 16,
        lanes: Union[None, str, int] = None,
    ):
        super().__init__()
        if entropy_coder not in (None, "ans"):
            raise ValueError(f'Unknown entropy coder "{entropy_coder}" (available: ans)')
        self.entropy_coder = "ans"
        self.entropy_coder_precision = int(entropy_coder_precision)
        if not 1 <= self.entropy_coder_precision <= 16:
            raise ValueError(f"entropy_coder_precision must be in [1, 16], got {entropy_coder_precision}")
        self.lanes = check_lanes(lanes)

        self.use_likelihood_bound = likelihood_bound > 0
        if self.use_likelihood_bound:
            self.likelihood_lower_bound = LowerBound(likelihood_bound)

        # filled by update()
        self.register_buffer("_offset", torch.IntTensor())
        self.register_buffer("_quantized_cdf", torch.IntTensor())
        self.register_buffer("_cdf_length", torch.IntTensor())

    # The coder tables and scale table change shape on update(); a fresh module has empty ones. Resize
    # them to what the state dict holds so that CompressAI checkpoints load with strict=True.
    _RESIZABLE_BUFFERS: Tuple[str, ...] = ("_offset", "_quantized_cdf", "_cdf_length")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._RESIZABLE_BUFFERS:
            key = prefix + name
            current = getattr(self, name, None)
            if key in state_dict and isinstance(current, Tensor) and current.shape != state_dict[key].shape:
                setattr(self, name, torch.empty_like(state_dict[key], dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def offset(self):
        return self._offset

    @property
    def quantized_cdf(self):
        return self._quantized_cdf

    @property
    def cdf_length(self):
        return self._cdf_length

    def forward(self, *args: Any) -> Any:
        raise NotImplementedError()

    def quantize(self, inputs: Tensor, mode: str, means: Optional[Tensor] = None) -> Tensor:
        if mode not in ("noise", "dequantize", "symbols"):
            raise ValueError(f'Invalid quantization mode: "{mode}"')
        if mode == "noise":
            noise = torch.empty_like(inputs).uniform_(-0.5, 0.5)
            return inputs + noise
        if mode == "symbols":
            return ops.quantize_symbols(inputs, means)
        outputs = inputs.clone()
        if means is not None:
            outputs -= means
        outputs = torch.round(outputs)
        if means is not None:
            outputs += means
        return outputs

    @staticmethod
    def dequantize(inputs: Tensor, means: Optional[Tensor] = None, dtype: torch.dtype = torch.float) -> Tensor:
        return ops.dequantize(inputs, means, dtype)

    # -- coder tables -------------------------------------------------------------------------

    def _check_tables(self):
        if self._quantized_cdf.numel() == 0:
            raise ValueError("Uninitialized CDFs. Run update() first")
        if self._quantized_cdf.dim() != 2:
            raise ValueError(f"Invalid CDF size {tuple(self._quantized_cdf.size())}")
        if self._offset.numel() == 0:
            raise ValueError("Uninitialized offsets. Run update() first")
        if self._offset.dim() != 1:
            raise ValueError(f"Invalid offsets size {tuple(self._offset.size())}")
        if self._cdf_length.numel() == 0:
            raise ValueError("Uninitialized CDF lengths. Run update() first")
        if self._cdf_length.dim() != 1:
            raise ValueError(f"Invalid CDF lengths size {tuple(self._cdf_length.size())}")

    def _coder_tables(self) -> coding.CoderTables:
        self._check_tables()
        return coding.coder_tables(self, self._quantized_cdf, self._cdf_length, self._offset)

    @staticmethod
    def _as_indexes(indexes: Tensor, host: bool = True) -> Tensor:
        if not isinstance(indexes, Tensor):
            raise TypeError(f"indexes must be a torch.Tensor, got {type(indexes).__name__}")
        if indexes.is_floating_point() or indexes.is_complex() or indexes.dtype == torch.bool:
            raise TypeError(f"indexes must be an integer tensor, got {indexes.dtype}")
        return indexes.to("cpu" if host else indexes.device, torch.int32).contiguous()

    def compress(
        self,
        inputs: Tensor,
        indexes: Tensor,
        means: Optional[Tensor] = None,
        *,
        lanes: Union[None, str, int, type(Ellipsis)] = ...,
    ) -> List[bytes]:
        """Compress `inputs` (N, C, ...) to one string per batch element.

        `lanes` overrides the module's `lanes` for this call (None: CompressAI stream; "auto": the
        native interleaved stream; "multilane"/int: the multi-lane stream)."""
        check_compress_args(inputs, indexes)
        return self.compress_symbols(ops.quantize_symbols(inputs, means), indexes, lanes=lanes)

    def compress_symbols(
        self, symbols: Tensor, indexes: Tensor, *, lanes: Union[None, str, int, type(Ellipsis)] = ...
    ) -> List[bytes]:
        """The coding half of :meth:`compress`: already quantised int32 ``symbols`` (N, C, ...), as
        ``ops.quantize_symbols(inputs, means)`` gives them, to one string per batch element. An
        encoder that quantises on a GPU can gather the symbols of many calls and bring them to
        the host at once."""
        lanes = self.lanes if lanes is ... else check_lanes(lanes)
        check_compress_args(symbols, indexes)
        if symbols.dtype != torch.int32:
            raise TypeError(f"symbols must be an int32 tensor, got {symbols.dtype}")
        tables = self._coder_tables()
        symbols = symbols.cpu()
        indexes = self._as_indexes(indexes)  # the coder checks their range
        n = symbols.size(0)
        return coding.encode_batch(symbols.reshape(n, -1), indexes.reshape(n, -1), tables, lanes)

    def decompress(
        self,
        strings: List[bytes],
        indexes: Tensor,
        dtype: torch.dtype = torch.float,
        means: Optional[Tensor] = None,
        *,
        lanes: Union[None, str, int, type(Ellipsis)] = ...,
        deferred: Optional[list] = None,
    ) -> Tensor:
        """Decode the strings of compress() back to the dequantized tensor (N, C, ...).

        In CompressAI mode (`lanes` None, the module's or this call's), a string that carries the
        native header is decoded as a native stream, so strings made with compress(..., lanes=k)
        decode without telling decompress. `deferred` (a list; native `lanes`): interleaved
        streams are decoded where `indexes` are, on a GPU without waiting for it, and their
        statuses are appended to the list for the caller to check once
        (:func:`dualres_ext.ops.rans_interleaved.check_statuses`): a decoder of many calls in a row."""
        lanes = self.lanes if lanes is ... else check_lanes(lanes)
        check_decompress_args(strings, indexes, means)
        tables = self._coder_tables()
        on_device = deferred is not None and lanes is not None
        flat = self._as_indexes(indexes, host=not on_device).reshape(indexes.size(0), -1)  # the coder checks them
        if not on_device and _dequantize_in_decoder(indexes, means, dtype):
            rows = None if means is None else means.reshape(flat.shape)
            values = coding.decode_batch(strings, flat, tables, native_only=lanes is not None, means=rows, dtype=dtype)
            return values.reshape(indexes.shape)
        symbols = coding.decode_batch(strings, flat, tables, native_only=lanes is not None, deferred=deferred)
        symbols = symbols.reshape(indexes.shape).to(indexes.device)
        return self.dequantize(symbols, means, dtype)


class EntropyBottleneck(EntropyModel):
    """Factorized prior (Ballé et al. 2018), CompressAI's EntropyBottleneck on the native coder."""

    _offset: Tensor

    def __init__(
        self,
        channels: int,
        *args: Any,
        tail_mass: float = 1e-9,
        init_scale: float = 10,
        filters: Tuple[int, ...] = (3, 3, 3, 3),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        self.init_scale = float(init_scale)
        self.tail_mass = float(tail_mass)

        filters = (1,) + self.filters + (1,)
        scale = self.init_scale ** (1 / (len(self.filters) + 1))
        channels = self.channels

        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(self.filters) + 1):
            init = math.log(math.expm1(1 / scale / filters[i + 1]))
            matrix = torch.Tensor(channels, filters[i + 1], filters[i])
            matrix.data.fill_(init)
            self.matrices.append(nn.Parameter(matrix))

            bias = torch.Tensor(channels, filters[i + 1], 1)
            nn.init.uniform_(bias, -0.5, 0.5)
            self.biases.append(nn.Parameter(bias))

            if i < len(self.filters):
                factor = torch.Tensor(channels, filters[i + 1], 1)
                nn.init.zeros_(factor)
                self.factors.append(nn.Parameter(factor))

        self.quantiles = nn.Parameter(torch.Tensor(channels, 1, 3))
        init = torch.Tensor([-self.init_scale, 0, self.init_scale])
        self.quantiles.data = init.repeat(self.quantiles.size(0), 1, 1)

        target = math.log(2 / self.tail_mass - 1)
        self.register_buffer("target", torch.Tensor([-target, 0, target]))

    def _get_medians(self) -> Tensor:
        return self.quantiles[:, :, 1:2]

    def update(self, force: bool = False, update_quantiles: bool = False) -> bool:
        """Build the coder tables from the learnt density (CompressAI's semantics, same tables)."""
        if self._offset.numel() > 0 and not force:
            return False
        if update_quantiles:
            self._update_quantiles()

        medians = self.quantiles[:, 0, 1]
        minima = torch.clamp(torch.ceil(medians - self.quantiles[:, 0, 0]).int(), min=0)
        maxima = torch.clamp(torch.ceil(self.quantiles[:, 0, 2] - medians).int(), min=0)
        self._offset = -minima

        pmf_start = medians - minima
        pmf_length = maxima + minima + 1
        max_length = pmf_length.max().item()
        device = pmf_start.device
        samples = torch.arange(max_length, device=device)
        samples = samples[None, :] + pmf_start[:, None, None]

        with torch.no_grad():
            pmf, lower, upper = self._likelihood(samples, stop_gradient=True)
        pmf = pmf[:, 0, :]
        tail_mass = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])

        # Row i: pmf[i, :length_i] then its tail mass, like CompressAI's _pmf_to_cdf.
        lengths = pmf_length.to(torch.int64).cpu()
        rows = torch.zeros(pmf.size(0), max_length + 1, dtype=torch.float32)
        rows[:, :max_length] = pmf.detach().cpu().float()
        valid = torch.arange(max_length + 1)[None, :] < lengths[:, None]
        rows = rows.masked_fill(~valid, 0.0)
        rows.scatter_(1, lengths[:, None], tail_mass.detach().cpu().float())
        cdf = ops.pmf_to_quantized_cdf(rows, lengths + 1, self.entropy_coder_precision)
        self._quantized_cdf = cdf.to(device)
        self._cdf_length = (pmf_length + 2).to(torch.int32)
        return True

    def loss(self) -> Tensor:
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        return torch.abs(logits - self.target).sum()

    def _logits_cumulative(self, inputs: Tensor, stop_gradient: bool) -> Tensor:
        logits = inputs
        for i in range(len(self.filters) + 1):
            matrix = self.matrices[i]
            if stop_gradient:
                matrix = matrix.detach()
            logits = torch.matmul(F.softplus(matrix), logits)

            bias = self.biases[i]
            if stop_gradient:
                bias = bias.detach()
            logits = logits + bias

            if i < len(self.filters):
                factor = self.factors[i]
                if stop_gradient:
                    factor = factor.detach()
                logits = logits + torch.tanh(factor) * torch.tanh(logits)
        return logits

    def _likelihood(self, inputs: Tensor, stop_gradient: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        half = float(0.5)
        lower = self._logits_cumulative(inputs - half, stop_gradient=stop_gradient)
        upper = self._logits_cumulative(inputs + half, stop_gradient=stop_gradient)
        likelihood = torch.sigmoid(upper) - torch.sigmoid(lower)
        return likelihood, lower, upper

    def forward(self, x: Tensor, training: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
        if training is None:
            training = self.training
        # B x C x ... -> C x B x ...
        perm = [1, 0] + list(range(2, x.dim()))
        x = x.permute(*perm).contiguous()
        shape = x.size()
        values = x.reshape(x.size(0), 1, -1)

        outputs = self.quantize(values, "noise" if training else "dequantize", self._get_medians())
        likelihood = self._bounded_likelihood(outputs)

        outputs = outputs.reshape(shape).permute(*perm).contiguous()
        likelihood = likelihood.reshape(shape).permute(*perm).contiguous()
        return outputs, likelihood

    def _bounded_likelihood(self, values: Tensor) -> Tensor:
        likelihood, _, _ = self._likelihood(values)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        return likelihood

    def likelihood(self, values: Tensor) -> Tensor:
        """Likelihood (with the lower bound, as ``forward`` gives it) of ``values`` (B, C, ...)
        that are already quantised or noised: ``forward`` without its quantisation step."""
        perm = [1, 0] + list(range(2, values.dim()))
        v = values.permute(*perm).contiguous()
        lik = self._bounded_likelihood(v.reshape(v.size(0), 1, -1))
        return lik.reshape(v.shape).permute(*perm).contiguous()

    @staticmethod
    def _build_indexes(size) -> Tensor:
        """Channel index of every element of a (N, C, ...) tensor, int32."""
        n, c = size[0], size[1]
        view = [1, -1] + [1] * (len(size) - 2)
        return torch.arange(c, dtype=torch.int32).view(*view).expand(n, c, *size[2:]).contiguous()

    @staticmethod
    def _extend_ndims(tensor: Tensor, n: int) -> Tensor:
        return tensor.reshape(-1, *([1] * n)) if n > 0 else tensor.reshape(-1)

    @torch.no_grad()
    def _update_quantiles(self, search_radius=1e5, rtol=1e-4, atol=1e-3):
        """Quantiles by bisection on the learnt CDF (CompressAI's fast alternative to the aux loss)."""
        device = self.quantiles.device
        shape = (self.channels, 1, 1)
        low = torch.full(shape, -search_radius, device=device)
        high = torch.full(shape, search_radius, device=device)

        def f(y, self=self):
            return self._logits_cumulative(y, stop_gradient=True)

        for i in range(len(self.target)):
            q_i = self._search_target(f, self.target[i], low, high, rtol, atol)
            self.quantiles[:, :, i] = q_i[:, :, 0]

    @staticmethod
    def _search_target(f, target, low, high, rtol=1e-4, atol=1e-3, strict=False):
        assert (low <= high).all()
        if strict:
            assert ((f(low) <= target) & (target <= f(high))).all()
        else:
            low = torch.where(target <= f(high), low, high)
            high = torch.where(f(low) <= target, high, low)
        while not torch.isclose(low, high, rtol=rtol, atol=atol).all():
            mid = (low + high) / 2
            f_mid = f(mid)
            low = torch.where(f_mid <= target, mid, low)
            high = torch.where(f_mid >= target, mid, high)
        return (low + high) / 2

    def _medians_like(self, batch: int, spatial_dims: int) -> Tensor:
        medians = self._extend_ndims(self._get_medians().detach(), spatial_dims)
        return medians.expand(batch, *([-1] * (spatial_dims + 1)))

    def compress(self, x: Tensor, *, lanes: Union[None, str, int, type(Ellipsis)] = ...) -> List[bytes]:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError("x must be a tensor of shape (N, C, ...)")
        if x.size(1) != self.channels:
            raise ValueError(f"x has {x.size(1)} channels, the bottleneck {self.channels}")
        indexes = self._build_indexes(x.size())
        medians = self._medians_like(x.size(0), x.dim() - 2)
        return super().compress(x, indexes, medians, lanes=lanes)

    def decompress(self, strings: List[bytes], size, *, lanes: Union[None, str, int, type(Ellipsis)] = ...) -> Tensor:
        output_size = (len(strings), self._quantized_cdf.size(0), *size)
        indexes = self._build_indexes(output_size).to(self._quantized_cdf.device)
        medians = self._medians_like(len(strings), len(size))
        return super().decompress(strings, indexes, medians.dtype, medians, lanes=lanes)


@functools.lru_cache(maxsize=8)  # every GaussianConditional of a model usually shares one table, slow to build
def _gaussian_cdf_tables(scale_table: tuple, dtype: torch.dtype, tail_mass: float, precision: int):
    return ops.gaussian_cdf_tables(torch.tensor(scale_table, dtype=dtype), tail_mass, precision)


class GaussianConditional(EntropyModel):
    """Gaussian conditional (Ballé et al. 2018), CompressAI's GaussianConditional on native kernels."""

    _RESIZABLE_BUFFERS = EntropyModel._RESIZABLE_BUFFERS + ("scale_table",)

    def __init__(
        self,
        scale_table: Optional[Union[List, Tuple]],
        *args: Any,
        scale_bound: float = 0.11,
        tail_mass: float = 1e-9,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(scale_table, (type(None), list, tuple)):
            raise ValueError(f'Invalid type for scale_table "{type(scale_table)}"')
        if isinstance(scale_table, (list, tuple)) and len(scale_table) < 1:
            raise ValueError(f'Invalid scale_table length "{len(scale_table)}"')
        if scale_table and (list(scale_table) != sorted(scale_table) or any(s <= 0 for s in scale_table)):
            raise ValueError(f'Invalid scale_table "({scale_table})"')

        self.tail_mass = float(tail_mass)
        if scale_bound is None and scale_table:
            scale_bound = scale_table[0]
        if scale_bound is None or scale_bound <= 0:
            raise ValueError("Invalid parameters")
        self.lower_bound_scale = LowerBound(scale_bound)

        self.register_buffer("scale_table", self._prepare_scale_table(scale_table) if scale_table else torch.Tensor())
        self.register_buffer("scale_bound", torch.Tensor([float(scale_bound)]))
        self._tables_key = None

    @staticmethod
    def _prepare_scale_table(scale_table):
        return torch.Tensor(tuple(float(s) for s in scale_table))

    def _standardized_cumulative(self, inputs: Tensor) -> Tensor:
        # erfc keeps the precision in the tails.
        return 0.5 * torch.erfc(float(-(2**-0.5)) * inputs)

    @staticmethod
    def _standardized_quantile(quantile):
        return torch.special.ndtri(torch.tensor(float(quantile), dtype=torch.float64)).item()

    def update_scale_table(self, scale_table, force: bool = False) -> bool:
        if self._offset.numel() > 0 and not force:
            return False
        device = self.scale_table.device
        self.scale_table = self._prepare_scale_table(scale_table).to(device)
        self.update(force=True)
        return True

    def _table_key(self):
        return (tuple(self.scale_table.tolist()), self.scale_table.dtype, self.tail_mass, self.entropy_coder_precision)

    def update(self, force: bool = False) -> bool:
        """Build the coder tables from `scale_table` (identical to CompressAI's update()).

        Unlike CompressAI (which always rebuilds), a call without `force` is a no-op when the
        tables were already built from the current scale table; returns whether it rebuilt them.
        """
        if self.scale_table.numel() == 0:
            raise ValueError("scale_table is empty: pass one to the constructor or update_scale_table()")
        key = self._table_key()
        if not force and self._offset.numel() > 0 and key == self._tables_key:
            return False
        tables = _gaussian_cdf_tables(*key)
        device = self.scale_table.device
        cdf, lengths, offsets = (t.clone().to(device) for t in tables)
        self._quantized_cdf = cdf
        self._cdf_length = lengths
        self._offset = offsets
        self._tables_key = key
        return True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._tables_key = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _likelihood(self, inputs: Tensor, scales: Tensor, means: Optional[Tensor] = None) -> Tensor:
        """Likelihood without the likelihood lower bound (CompressAI's _likelihood), fused."""
        return ops.gaussian_likelihood(
            inputs, scales, means, scale_bound=self.lower_bound_scale.as_arg(), likelihood_bound=None
        )

    def forward(
        self,
        inputs: Tensor,
        scales: Tensor,
        means: Optional[Tensor] = None,
        training: Optional[bool] = None,
    ) -> Tuple[Tensor, Tensor]:
        if training is None:
            training = self.training
        outputs = self.quantize(inputs, "noise" if training else "dequantize", means)
        return outputs, self.likelihood(outputs, scales, means)

    def likelihood(self, values: Tensor, scales: Tensor, means: Optional[Tensor] = None) -> Tensor:
        """Likelihood (with the lower bound, as ``forward`` gives it) of ``values`` that are
        already quantised or noised: ``forward`` without its quantisation step."""
        likelihood_bound = self.likelihood_lower_bound.as_arg() if self.use_likelihood_bound else None
        return ops.gaussian_likelihood(
            values, scales, means, scale_bound=self.lower_bound_scale.as_arg(), likelihood_bound=likelihood_bound
        )

    def build_indexes(self, scales: Tensor) -> Tensor:
        """CompressAI's build_indexes in one pass. NaN scales raise; negative/inf are clamped."""
        if self.scale_table.numel() == 0:
            raise ValueError("scale_table is empty: run update_scale_table() first")
        return self._scale_table().build_indexes(scales, strict=False)

    def quantize_and_index(self, inputs: Tensor, scales: Tensor, means: Optional[Tensor] = None):
        """(symbols, indexes) in one pass over inputs, means and scales: what ``compress`` codes, with
        the table index of every element."""
        return self._scale_table().quantize_and_index(inputs, scales, means, strict=False)

    def _scale_table(self) -> ops.ScaleTable:
        return coding.scale_table(self, self.scale_table, self.lower_bound_scale.bound)
