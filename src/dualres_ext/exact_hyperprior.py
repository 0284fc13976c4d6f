"""Portable hyperprior models: the hyper synthesis of a CompressAI hyperprior model on integers.

Used by :func:`dualres_ext.compat.accelerate` with ``portable=True``; independent of compressai
itself (it works on any model whose ``h_s`` is an ``nn.Sequential`` of ``Conv2d`` /
``ConvTranspose2d`` and ``ReLU`` / ``LeakyReLU`` layers, as in bmshj2018-hyperprior and
mbt2018-mean). No retraining: the layers of :mod:`dualres_ext.integer` are made from the float
weights after calibrating activation ranges (on samples of ẑ drawn from the model's own factorized
prior, or on pictures given).

While such a model codes (``compress`` / ``decompress``), its ``h_s`` returns the integer
network's outputs as float32 values that are exact on every machine: scales that are multiples of
``2^-SCALE_BITS`` (so that comparing them with the scale table, as ``build_indexes`` does, gives
the same index everywhere) and means that are multiples of ``2^-LATENT_BITS``. Its ``forward``
(training, evaluation) keeps the float network. The y strings are marked (:data:`MARK`): they do
not decode with CompressAI, nor with a model not made portable the same way, and a portable model
refuses unmarked strings.
"""

from __future__ import annotations

import contextvars
import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .integer import IntConv, IntLUT

MARK = b"DRXP\x01"  # prefix of every y string a portable model writes
LATENT_BITS, SCALE_BITS = 6, 12
DEFAULTS = dict(weight_bits=10, act_bits=12, margin=1.5)

_coding = contextvars.ContextVar("dualres_portable_coding", default=False)

__all__ = ["MARK", "ExactHyperSynthesis", "make_portable", "is_portable"]


class ExactHyperSynthesis(nn.Module):
    """The integer form of a hyper synthesis ``h_s``: ẑ (float32) -> exact float32 scales (and
    means, for a mean-scale model) as the float ``h_s`` would return them."""

    def __init__(self, layers: Sequence[nn.Module], z_bound: int, means: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.z_bound = int(z_bound)
        self.means = bool(means)

    def forward(self, z_hat: Tensor) -> Tensor:
        x = torch.round(z_hat.double() * float(1 << LATENT_BITS)).clamp_(-self.z_bound, self.z_bound).float()
        for layer in self.layers:
            x = layer(x)
        if not self.means:
            return x * (2.0**-SCALE_BITS)
        s = x.size(1) // 2
        return torch.cat([x[:, :s] * (2.0**-SCALE_BITS), x[:, s:] * (2.0**-LATENT_BITS)], 1)


def _sample_prior(entropy_bottleneck, shape, generator) -> Tensor:
    """ẑ drawn from a CompressAI EntropyBottleneck's quantised prior (its coder tables):
    (N, C, H, W) float32 values ``symbol + median``."""
    cdf = entropy_bottleneck._quantized_cdf.detach().cpu().to(torch.float64)
    lengths = entropy_bottleneck._cdf_length.detach().cpu().to(torch.int64)
    offsets = entropy_bottleneck._offset.detach().cpu().to(torch.int64)
    medians = entropy_bottleneck._get_medians().detach().cpu().reshape(-1)
    n, c, h, w = shape
    out = torch.empty(n, c, h, w)
    for ch in range(c):
        length = int(lengths[ch])
        pmf = (cdf[ch, 1:length] - cdf[ch, : length - 1]).clamp(min=0)
        draws = torch.multinomial(pmf, n * h * w, replacement=True, generator=generator)
        out[:, ch] = (draws + offsets[ch]).float().reshape(n, h, w) + float(medians[ch])
    return out


@torch.no_grad()
def _calibrate(h_s: nn.Sequential, z_samples: Sequence[Tensor]) -> dict:
    stats: dict = {}
    ref = [m.double() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) else m for m in _copy(h_s)]
    for z in z_samples:
        x = z.double()
        stats["in"] = max(stats.get("in", 0.0), float(x.abs().max()))
        for i, layer in enumerate(ref):
            x = layer(x)
            stats[i] = max(stats.get(i, 0.0), float(x.abs().max()))
    return stats


def _copy(h_s: nn.Sequential):
    return [copy.deepcopy(m).cpu() for m in h_s]


@torch.no_grad()
def convert_hyper_synthesis(
    h_s: nn.Sequential,
    stats: dict,
    weight_bits: int = DEFAULTS["weight_bits"],
    act_bits: int = DEFAULTS["act_bits"],
    margin: float = DEFAULTS["margin"],
) -> ExactHyperSynthesis:
    """The :class:`ExactHyperSynthesis` of ``h_s`` from calibration ``stats``."""
    layers = list(h_s)
    kinds = []
    for i, layer in enumerate(layers):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            kinds.append("conv")
        elif isinstance(layer, (nn.ReLU, nn.LeakyReLU)):
            kinds.append("act")
        else:
            raise TypeError(
                f"portable: h_s layer {i} is a {type(layer).__name__}: only convolutions, "
                "ReLU and LeakyReLU are supported"
            )
    if kinds[0] != "conv":
        raise TypeError("portable: h_s must start with a convolution")
    ends_with_act = kinds[-1] == "act"
    q_act = (1 << act_bits) - 1
    lat = 2.0**-LATENT_BITS
    z_bound = int(round(stats["in"] * margin / lat)) + 1
    first = layers[0]
    in_ch = first.in_channels
    scale = torch.full((in_ch,), lat, dtype=torch.float64)
    bound = torch.full((in_ch,), z_bound, dtype=torch.int64)
    out: list = []
    convs = [i for i, k in enumerate(kinds) if k == "conv"]
    for i in convs:
        layer = layers[i]
        n = layer.out_channels
        if i != convs[-1]:
            s = max(stats[i], 1e-3) * margin / q_act
            out.append(
                IntConv.convert(
                    layer,
                    scale,
                    bound,
                    torch.full((n,), s, dtype=torch.float64),
                    torch.full((n,), -q_act),
                    torch.full((n,), q_act),
                    weight_bits,
                )
            )
            act = layers[i + 1]
            slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
            out.append(IntLUT.tabulate(lambda v, slope=slope: torch.where(v >= 0, v, v * slope), s, q_act, s, q_act))
            scale = torch.full((n,), s, dtype=torch.float64)
            bound = torch.full((n,), q_act, dtype=torch.int64)
            continue
        # The last convolution: scales (and means) on their fixed grids.
        peak = max(stats[i], 1.0) * margin
        sigma_high = int(min(peak * 2**SCALE_BITS, (1 << 24) - 1))
        if ends_with_act:  # scales only, after a ReLU: clamped at 0 like it
            out_scale = torch.full((n,), 2.0**-SCALE_BITS, dtype=torch.float64)
            low, high = torch.zeros(n, dtype=torch.int64), torch.full((n,), sigma_high)
        else:
            half = n // 2
            mu = int(round(peak / lat)) + 1
            out_scale = torch.cat(
                [
                    torch.full((half,), 2.0**-SCALE_BITS, dtype=torch.float64),
                    torch.full((n - half,), lat, dtype=torch.float64),
                ]
            )
            low = torch.cat([torch.zeros(half, dtype=torch.int64), torch.full((n - half,), -mu)])
            high = torch.cat([torch.full((half,), sigma_high), torch.full((n - half,), mu)])
        out.append(IntConv.convert(layer, scale, bound, out_scale, low, high, weight_bits))
    return ExactHyperSynthesis(out, z_bound, means=not ends_with_act).eval()


def _h_s_forward(h_s: nn.Sequential):
    """``h_s.forward`` that runs the integer network while the model codes."""
    float_forward = type(h_s).forward

    def forward(x):
        exact = h_s.__dict__.get("_dualres_exact")
        if _coding.get() and exact is not None:
            return exact.to(x.device)(x).to(x.dtype)
        return float_forward(h_s, x)

    return forward


class _PortableCall:
    """``compress`` / ``decompress`` of a portable model: the exact ``h_s`` while it runs, marked
    y strings."""

    def __init__(self, model: nn.Module, method: str, previous):
        self.model, self.method, self.previous = model, method, previous

    def __call__(self, *args, **kwargs):
        token = _coding.set(True)
        try:
            if self.method == "compress":
                out = self.previous(*args, **kwargs)
                out["strings"][0] = [MARK + bytes(s) for s in out["strings"][0]]
                return out
            strings = list(args[0] if args else kwargs.pop("strings"))
            y = []
            for s in strings[0]:
                if bytes(s[: len(MARK)]) != MARK:
                    raise ValueError(
                        "portable model: the y string is not marked as portable (written by "
                        "CompressAI or by a model without portable=True): decode it with such a model"
                    )
                y.append(bytes(s[len(MARK) :]))
            strings[0] = y
            return self.previous(strings, *args[1:], **kwargs)
        finally:
            _coding.reset(token)


def is_portable(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("compress"), _PortableCall)


@torch.no_grad()
def make_portable(
    model: nn.Module, calibration: Optional[Sequence[Tensor]] = None, seed: int = 0, **options
) -> nn.Module:
    """Give a hyperprior model (``h_s``, ``entropy_bottleneck``, ``gaussian_conditional``, after
    ``update()``) the integer hyper synthesis and the marked ``compress`` / ``decompress``.
    ``calibration``: ẑ tensors to calibrate on (default: 4 draws of 16 x 16 from the prior)."""
    h_s = getattr(model, "h_s", None)
    if not isinstance(h_s, nn.Sequential) or not hasattr(model, "entropy_bottleneck"):
        raise TypeError(
            "portable=True: a hyperprior model with an nn.Sequential h_s and an entropy_bottleneck "
            "(bmshj2018-hyperprior, mbt2018-mean)"
        )
    eb = model.entropy_bottleneck
    if eb._quantized_cdf.numel() == 0:
        model.update(force=True)
    if calibration is None:
        g = torch.Generator().manual_seed(seed)
        calibration = [_sample_prior(eb, (1, eb.channels, 16, 16), g) for _ in range(4)]
    stats = _calibrate(h_s, calibration)
    exact = convert_hyper_synthesis(h_s, stats, **options)
    device = next(h_s.parameters()).device
    h_s.__dict__["_dualres_exact"] = exact.to(device)
    h_s.__dict__["forward"] = _h_s_forward(h_s)
    for method in ("compress", "decompress"):
        previous = model.__dict__.get(method)
        if isinstance(previous, _PortableCall):
            previous = previous.previous
        if previous is None:
            previous = getattr(model, method)
        model.__dict__[method] = _PortableCall(model, method, previous)
    return model
