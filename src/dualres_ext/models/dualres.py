"""DualRes: a two-branch learned image codec with conditional (channel-wise) entropy coding.

After "Learned Image Compression with Dual-Branch Encoder and Conditional Information Coding"
(Fu, Liang, Liang, Fang, Zhang, Han). The shape:

    x ──stem (stride 4)──┬── g_a^H (stride 8)  ─► y_H   (fewer channels: local detail)
                         └── g_a^L (stride 16) ─► y_L   (more channels: global content)
    h_a(down(y_H) ⊕ y_L) ─► z (stride 64), factorized prior (EntropyBottleneck)
    h_s(ẑ) ─► hyper features F_L (stride 16) and F_H (stride 8)
    y_H slice by slice: (μ, σ) = net_i(F_H, ŷ_H[<i]);             LRP_i adds a bounded correction
    y_L slice by slice: (μ, σ) = net_j(F_L, down(ŷ_H), ŷ_L[<j]);  LRP_j likewise
    x̂ = g_s(up(ŷ_L) ⊕ ŷ_H)  (deconvolutions + IGDN)

The two analysis branches share a stride-4 stem: the image-resolution layers are the costly
ones, and computing them once halves the encoder's cost at no visible loss of flexibility
(each branch still has its own strided layers and its own latent).

Entropy coding is channel-wise autoregressive (Minnen & Singh 2020, with latent residual
prediction) and has no spatial context: every position of a slice is coded at once, the only
serial loop is over the slices. ``y_L``'s networks see the decoded ``ŷ_H`` (downsampled to
stride 16): the high-resolution latent conditions the low-resolution one.

Variable rate comes from gain units (Cui et al. 2021): per quality, a positive gain per latent
channel multiplies ``y_H``/``y_L`` before quantisation and an inverse gain multiplies ``ŷ`` before
the synthesis. A float quality interpolates between the two neighbouring gain vectors in the
log domain, so ``quality`` is continuous in ``[0, num_qualities - 1]``.

Gain units alone make all six rates share one analysis and one synthesis, and the rates compete
for them. ``modulation=True`` adds, after every (I)GDN of both transforms, a per-quality, per-channel
affine map ``x * exp(s_q) + b_q`` (the conditional convolution of Choi et al. 2019, without its
extra layers), interpolated like the gains. It
starts as the identity, so a trained model gains it without changing what it computes
(:func:`dualres_ext.models.widen.add_modulation`), and costs 6.5 k parameters (compact) and one
multiply-add per activation. The shipped weights do not use it.

Quantisation in training (as CompressAI's recent models do): the likelihoods see additive
uniform noise (``GaussianConditional``/``EntropyBottleneck`` in training mode), while the
synthesis and the conditioning networks see ``round(y - μ) + μ`` with a straight-through
gradient, i.e. exactly the values the decoder will have. In eval mode ``forward`` uses plain
``torch.round`` so that its ``x_hat`` is bit-identical to ``decompress(compress(x))``.

Portable streams: the decoder must derive every slice's scale table index and mean from the values
it decoded exactly as the encoder did, or the rANS lanes desynchronise. float32 convolutions are
not reproducible across thread counts, CPU instruction sets or devices (oneDNN, cuDNN and BLAS
split their sums differently), and with ~0.5 M coded symbols per photo a scale lands within
float32 noise of a table boundary in most streams. So coding never runs the networks between the
decoded symbols and (μ, σ) -- the hyper synthesis, the slice coders and ``down(ŷ_H)`` -- in float32:

* with :attr:`DualRes.exact` (integer networks made from the weights by
  :mod:`dualres_ext.models.exact`, stored in the weights file; bitstream versions 4 and 5) they run on
  integers, exactly: the same indexes and means on every CPU, GPU and thread count;
* otherwise (and for streams of versions 2 and 3) on float64 copies of their weights, with ``ŷ``
  in float64 on that path: rounding differences ~1e-16 relative instead of ~1e-7, a boundary
  crossing some 10^8 times less likely than in float32, but not impossible.

The analysis and the synthesis stay float32: the encoder's ``y`` is only ever rounded on the
encoder, and the synthesis only makes the picture.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..cache import TensorCache
from ..entropy_models import EntropyBottleneck, GaussianConditional
from ..layers import GDN, conv, deconv
from ..ops import rans_interleaved
from .exact import ExactStep
from .quantize import quantize_latent

_INT32_MAX = float(2**31 - 1)  # the largest symbol the coders take, as the float64 rounding's bound

# CompressAI's MSE lambdas for its qualities 1..6 (rate + lambda * 255^2 * MSE), the trained
# operating points of the default quality ladder; quality index 0 is the lowest rate.
DEFAULT_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483)

# Scale table of the Gaussian conditional: CompressAI's default (64 scales, log-spaced).
SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64

CONFIGS: Dict[str, dict] = {
    # Sized to train on a couple of CPU cores and to be fast on CPU at inference. The synthesis
    # widths (N_s, N1_s) may differ from the analysis': python/widen_model.py grows a trained
    # model's widths, and docs/TRAINING.md gives the shipped weights' lineage.
    "compact": dict(
        N=128,
        N1=48,
        k1=3,
        M_H=48,
        M_L=96,
        N_hyper=64,
        Z=48,
        slices_H=(16, 32),
        slices_L=(16, 32, 48),
        hidden=64,
        lambdas=DEFAULT_LAMBDAS,
        N_s=96,
        N1_s=48,
        k1_s=3,
    ),
    # The paper's size: N=192 and 320 latent channels in total (y_H + y_L); 128 channels at
    # stride 2, where a layer costs 4x more per channel (benchmarks/RESULTS.md has its speed).
    "paper": dict(
        N=192,
        N1=128,
        k1=5,
        M_H=128,
        M_L=192,
        N_hyper=192,
        Z=128,
        slices_H=(32, 32, 64),
        slices_L=(32, 32, 64, 64),
        hidden=128,
        lambdas=DEFAULT_LAMBDAS,
    ),
}


# The default scale table, fixed bit for bit: the 64 float32 values of
# exp(linspace(log 0.11, log 256, 64)) as CompressAI computes it. A decoder compares scales
# against these values (and the weights id hashes them), so they must not be recomputed with a
# platform's exp, whose last bit differs between ATen's scalar and vector kernels.
_SCALE_TABLE_BITS = (
    "0x1.c28f5c0000000p-4",
    "0x1.fd8f260000000p-4",
    "0x1.2024600000000p-3",
    "0x1.45df8e0000000p-3",
    "0x1.708b900000000p-3",
    "0x1.a0ce080000000p-3",
    "0x1.d762480000000p-3",
    "0x1.0a8e140000000p-2",
    "0x1.2d759a0000000p-2",
    "0x1.54ef340000000p-2",
    "0x1.81941c0000000p-2",
    "0x1.b411940000000p-2",
    "0x1.ed2b980000000p-2",
    "0x1.16dfe40000000p-1",
    "0x1.3b64680000000p-1",
    "0x1.64b1120000000p-1",
    "0x1.9366300000000p-1",
    "0x1.c8390c0000000p-1",
    "0x1.01fb560000000p+0",
    "0x1.23c37a0000000p+0",
    "0x1.49f80e0000000p+0",
    "0x1.752d5e0000000p+0",
    "0x1.a60b1e0000000p+0",
    "0x1.dd4ef80000000p+0",
    "0x1.0de7b80000000p+1",
    "0x1.313f8e0000000p+1",
    "0x1.59382c0000000p+1",
    "0x1.866cb80000000p+1",
    "0x1.b98ca20000000p+1",
    "0x1.f35e5e0000000p+1",
    "0x1.1a612e0000000p+2",
    "0x1.3f5b300000000p+2",
    "0x1.692cb60000000p+2",
    "0x1.98781c0000000p+2",
    "0x1.cdf4f00000000p+2",
    "0x1.0539620000000p+3",
    "0x1.276e360000000p+3",
    "0x1.4e1dba0000000p+3",
    "0x1.79de0e0000000p+3",
    "0x1.ab59060000000p+3",
    "0x1.e34eb00000000p+3",
    "0x1.114c200000000p+4",
    "0x1.3515b00000000p+4",
    "0x1.5d8ee80000000p+4",
    "0x1.8b54e20000000p+4",
    "0x1.bf19520000000p+4",
    "0x1.f9a5160000000p+4",
    "0x1.1dedba0000000p+5",
    "0x1.435eb20000000p+5",
    "0x1.6db6ca0000000p+5",
    "0x1.9d9a600000000p+5",
    "0x1.d3c3400000000p+5",
    "0x1.0881e00000000p+6",
    "0x1.2b24c60000000p+6",
    "0x1.5250ba0000000p+6",
    "0x1.7e9dd80000000p+6",
    "0x1.b0b80c0000000p+6",
    "0x1.e961bc0000000p+6",
    "0x1.14bb7a0000000p+7",
    "0x1.38f8300000000p+7",
    "0x1.61f39c0000000p+7",
    "0x1.904ce40000000p+7",
    "0x1.c4b7d60000000p+7",
    "0x1.0000000000000p+8",
)


def get_scale_table(min_=SCALES_MIN, max_=SCALES_MAX, levels=SCALES_LEVELS) -> torch.Tensor:
    """CompressAI's default scale table (log-spaced), as a float32 tensor: exactly
    :data:`_SCALE_TABLE_BITS` for the default arguments (what every DualRes model codes with),
    otherwise computed (and then only as reproducible as the platform's ``exp``)."""
    if (min_, max_, levels) == (SCALES_MIN, SCALES_MAX, SCALES_LEVELS):
        return torch.tensor([float.fromhex(v) for v in _SCALE_TABLE_BITS], dtype=torch.float32)
    return torch.exp(torch.linspace(math.log(min_), math.log(max_), levels))


# The networks on the entropy-parameter path (see "Portable streams" above); coding runs float64
# copies of them, made by DualRes.coding_nets.
CODING_NETS = ("h_s", "h_s_up_h", "cond_down_h", "coder_h", "coder_l")
# The float64 copies follow the model's weights (an optimiser step or load_state_dict changes
# them). Kept outside the model so that state_dict, deepcopy and pickling never see them.
_coding_nets_cache: TensorCache[nn.ModuleDict] = TensorCache()

# What a slice loop does with one slice: ``step(i, scales, means)`` returns slice i's quantised
# values (before the latent residual prediction), coding or measuring it on the way.
SliceStep = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


# Where the quality modulation sits: after these layers (the (I)GDNs) of these Sequentials.
MODULATED_LAYERS = {"g_a_stem": (1, 3), "g_a_l": (1,), "g_s_up_l": (1,), "g_s": (2, 4)}


class QualityModulation(nn.Module):
    """``x * exp(log_scale[q]) + shift[q]`` per channel, for a (possibly fractional) quality ``q``.

    ``log_scale`` is interpolated linearly between the two neighbouring qualities (log-linearly
    in the scale, as the gains are), ``shift`` linearly. Both start at zero: the identity.
    """

    def __init__(self, channels: int, num_qualities: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(num_qualities, channels))
        self.shift = nn.Parameter(torch.zeros(num_qualities, channels))

    def forward(self, x: torch.Tensor, point) -> torch.Tensor:
        scale = torch.exp(_interpolate(self.log_scale, point))[:, :, None, None]
        return x * scale + _interpolate(self.shift, point)[:, :, None, None]


def _interpolate(table: torch.Tensor, point) -> torch.Tensor:
    """Rows ``lo`` and ``hi`` of ``table`` (qualities x channels) mixed by ``t``: (B or 1, C)."""
    lo, hi, t = point
    return table[lo] * (1 - t) + table[hi] * t


class _SliceCoder(nn.Module):
    """Parameter and LRP networks of one latent split into channel slices.

    Slice ``i``'s context is ``cat(features, extra, ŷ[<i])`` where ``features`` are the hyper
    features and ``extra`` an optional extra conditioning tensor (``down(ŷ_H)`` for ``y_L``).
    One 3x3 layer gathers the context's neighbourhood (all positions at once: no spatial
    causality), 1x1 layers mix channels into (scale, mean). The latent residual prediction
    (Minnen & Singh 2020) reuses those 3x3 features with the decoded slice, through 1x1 layers:
    the 3x3 layers are the coders' main cost, and a second set for LRP would double it.
    """

    def __init__(self, slices: Sequence[int], ctx_ch: int, hidden: int):
        super().__init__()
        self.slices = [int(s) for s in slices]
        self.context_nets = nn.ModuleList()
        self.param_nets = nn.ModuleList()
        self.lrp_nets = nn.ModuleList()
        done = 0
        for s in self.slices:
            self.context_nets.append(nn.Sequential(nn.Conv2d(ctx_ch + done, hidden, 3, padding=1), nn.GELU()))
            self.param_nets.append(nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.GELU(), nn.Conv2d(hidden, 2 * s, 1)))
            self.lrp_nets.append(
                nn.Sequential(nn.Conv2d(hidden + s, hidden // 2, 1), nn.GELU(), nn.Conv2d(hidden // 2, s, 1))
            )
            done += s

    def params(self, i: int, ctx: torch.Tensor):
        """(scales, means, features) of slice ``i``; ``features`` feed :meth:`lrp`."""
        h = self.context_nets[i](ctx)
        scales, means = self.param_nets[i](h).chunk(2, dim=1)
        return scales, means, h

    def lrp(self, i: int, h: torch.Tensor, y_hat_slice: torch.Tensor) -> torch.Tensor:
        # A bounded correction of the quantisation error, from what the decoder knows (no bits).
        return y_hat_slice + 0.5 * torch.tanh(self.lrp_nets[i](torch.cat([h, y_hat_slice], 1)))

    def split(self, y: torch.Tensor):
        """``y`` cut into its slices along the channels."""
        return y.split(self.slices, 1)

    def run(self, features: torch.Tensor, extra: Optional[torch.Tensor], step: SliceStep) -> torch.Tensor:
        """The slice loop, the only serial part of coding: for each slice in turn, its context
        (``features``, ``extra`` and the slices decoded so far) gives (scales, means); ``step``
        quantises (and codes, decodes or measures) the slice; the LRP corrects it. Returns ŷ.
        Training, ``forward``, the encoder, the decoder and the refining encoder all run this
        loop, so they see the same values in the same order."""
        decoded: List[torch.Tensor] = []
        base = [features] if extra is None else [features, extra]
        for i in range(len(self.slices)):
            scales, means, h = self.params(i, torch.cat(base + decoded, 1))
            decoded.append(self.lrp(i, h, step(i, scales, means)))
        return torch.cat(decoded, 1)


class DualRes(nn.Module):
    """The DualRes model. Build it through :func:`dualres_ext.models.build`.

    ``forward(x, quality)``: ``x`` is (B, 3, H, W) in [0, 1] with H, W multiples of 64;
    ``quality`` an int in ``[0, num_qualities)``, a float (interpolates the gains) or a 1-D
    tensor of per-sample qualities. Returns ``{"x_hat", "likelihoods": {"y_h", "y_l", "z"}}``.
    """

    stride = 64  # input sizes must be multiples of this (z's stride)

    def __init__(
        self,
        N: int = 64,
        N1: Optional[int] = None,
        k1: int = 5,
        M_H: int = 48,
        M_L: int = 96,
        N_hyper: int = 64,
        Z: int = 48,
        slices_H: Sequence[int] = (16, 32),
        slices_L: Sequence[int] = (16, 32, 48),
        hidden: int = 64,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        N_s: Optional[int] = None,
        N1_s: Optional[int] = None,
        k1_s: Optional[int] = None,
        modulation: bool = False,
        lanes: Union[None, str, int] = "auto",
        name: str = "custom",
    ):
        super().__init__()
        if sum(slices_H) != M_H or sum(slices_L) != M_L:
            raise ValueError(
                f"slices_H {tuple(slices_H)} must sum to M_H={M_H} and slices_L {tuple(slices_L)} to M_L={M_L}"
            )
        if len(lambdas) < 2:
            raise ValueError("lambdas: at least two quality levels are needed")
        self.name = name
        N1 = N if N1 is None else int(N1)
        k1 = int(k1)
        # The synthesis widths default to the analysis' (N_s = N, N1_s = N1, k1_s = k1).
        N_s = N if N_s is None else int(N_s)
        N1_s = N1 if N1_s is None else int(N1_s)
        k1_s = k1 if k1_s is None else int(k1_s)
        if k1 not in (3, 5) or k1_s not in (3, 5):
            raise ValueError(f"k1 and k1_s must be 3 or 5, got {k1} and {k1_s}")
        self.config = dict(
            N=N,
            N1=N1,
            k1=k1,
            M_H=M_H,
            M_L=M_L,
            N_hyper=N_hyper,
            Z=Z,
            slices_H=tuple(int(s) for s in slices_H),
            slices_L=tuple(int(s) for s in slices_L),
            hidden=hidden,
            lambdas=tuple(float(v) for v in lambdas),
            N_s=N_s,
            N1_s=N1_s,
            k1_s=k1_s,
            modulation=bool(modulation),
        )
        self.lambdas: List[float] = [float(v) for v in lambdas]
        self.num_qualities = len(self.lambdas)

        # Analysis: shared stride-4 stem, then one branch per latent.
        # N1: the width at stride 2, where a layer costs 4x more per channel than at stride 4;
        # k1: the kernel of the layers between strides 2 and 4 (the costliest pair).
        self.g_a_stem = nn.Sequential(conv(3, N1, 5, 2), GDN(N1), conv(N1, N, k1, 2), GDN(N))
        self.g_a_h = conv(N, M_H, 5, 2)
        self.g_a_l = nn.Sequential(conv(N, N, 5, 2), GDN(N), conv(N, M_L, 5, 2))

        # Synthesis: ŷ_L up to stride 8, joined with ŷ_H, then three x2 deconvolutions + IGDN.
        self.g_s_up_l = nn.Sequential(deconv(M_L, N_s, 5, 2), GDN(N_s, inverse=True))
        # The join is a 1x1 fusion to N channels: a 5x5 deconvolution on all N + M_H channels
        # at stride 8 cost as much as the rest of the stride-8 synthesis.
        self.g_s = nn.Sequential(
            nn.Conv2d(N_s + M_H, N_s, 1),
            deconv(N_s, N_s, 5, 2),
            GDN(N_s, inverse=True),
            deconv(N_s, N1_s, k1_s, 2),
            GDN(N1_s, inverse=True),
            deconv(N1_s, 3, 5, 2),
        )

        # Hyperprior: z from down(y_H) ⊕ y_L; h_s gives features at strides 16 and 8.
        self.h_a_down_h = conv(M_H, N_hyper, 3, 2)
        self.h_a = nn.Sequential(
            conv(N_hyper + M_L, N_hyper, 3, 1),
            nn.GELU(),
            conv(N_hyper, N_hyper, 5, 2),
            nn.GELU(),
            conv(N_hyper, Z, 5, 2),
        )
        self.h_s = nn.Sequential(
            deconv(Z, N_hyper, 5, 2),
            nn.GELU(),
            deconv(N_hyper, N_hyper, 5, 2),
            nn.GELU(),
            conv(N_hyper, M_L, 3, 1),
        )
        self.h_s_up_h = nn.Sequential(nn.GELU(), deconv(M_L, M_H, 5, 2))

        # ŷ_H conditions y_L: brought to stride 16.
        self.cond_down_h = conv(M_H, M_H, 3, 2)
        self.coder_h = _SliceCoder(slices_H, M_H, hidden)
        self.coder_l = _SliceCoder(slices_L, M_L + M_H, hidden)

        # Gain units: log gains per quality and channel. Initialised so that the quantisation
        # step scales like lambda^-1/2 (the high-rate optimum), centred on the middle quality.
        ref = self.lambdas[len(self.lambdas) // 2]
        log_g = torch.tensor([0.5 * math.log(lam / ref) for lam in self.lambdas])
        self.gain_h = nn.Parameter(log_g[:, None].repeat(1, M_H).clone())
        self.gain_l = nn.Parameter(log_g[:, None].repeat(1, M_L).clone())
        self.inv_gain_h = nn.Parameter((-log_g)[:, None].repeat(1, M_H).clone())
        self.inv_gain_l = nn.Parameter((-log_g)[:, None].repeat(1, M_L).clone())

        # lanes: "auto" = dualres_ext's interleaved rANS stream, "multilane"/int = the multi-lane
        # one (the encoder picks width or lanes and writes them; decoding does not depend on the
        # thread count), None = CompressAI's single-lane stream.
        self.entropy_bottleneck = EntropyBottleneck(Z, lanes=lanes)
        self.gaussian_conditional = GaussianConditional(None, lanes=lanes)

        # The integer entropy-parameter networks (models/exact.py), when converted: buffers only,
        # state-dict keys "exact.*" (None: the model codes with its float64 copies only).
        self.register_module("exact", None)

        # Registered last, so that a model gaining it keeps its other parameters' order (which
        # the optimiser's saved state is indexed by). Keys: "<Sequential>_<layer index>".
        self.modulation = None
        if modulation:
            self.modulation = nn.ModuleDict(
                {
                    f"{seq}_{i}": QualityModulation(self._channels_after(getattr(self, seq)[i]), self.num_qualities)
                    for seq, layers in MODULATED_LAYERS.items()
                    for i in layers
                }
            )

    # ------------------------------------------------------------------ gains
    @staticmethod
    def _channels_after(layer: nn.Module) -> int:
        return int(layer.beta.numel())  # (I)GDN: one beta per channel

    def _quality_point(self, quality, device, dtype):
        """``(lo, hi, t)``: quality ``quality`` (number or 1-D tensor) between rows ``lo`` and ``hi``
        of the per-quality tables, ``t`` (B or 1, 1) the fraction of the way; checked."""
        n = self.num_qualities
        if isinstance(quality, torch.Tensor):
            if quality.dim() > 1 or quality.is_complex() or quality.dtype == torch.bool:
                raise ValueError(
                    f"quality: a number or a 1-D tensor of per-sample qualities, "
                    f"got shape {tuple(quality.shape)} {quality.dtype}"
                )
            q = quality.detach().reshape(-1).to(dtype)
            # Checked where it lives (CPU: no sync). A trace (torch.compile, export) cannot read
            # values: compiled code takes tensor qualities unchecked, so validate them outside it.
            if not torch.compiler.is_compiling():
                bad = ~torch.isfinite(q) | (q < 0) | (q > n - 1)
                if bool(bad.any()):
                    raise ValueError(f"quality must lie in [0, {n - 1}], got {quality.tolist()}")
            q = q.to(device)
        else:
            if isinstance(quality, bool) or not isinstance(quality, (int, float)):
                raise TypeError(f"quality must be an int, a float or a tensor, got {type(quality).__name__}")
            if not (math.isfinite(quality) and 0 <= quality <= n - 1):
                raise ValueError(f"quality must lie in [0, {n - 1}], got {quality!r}")
            q = torch.tensor([float(quality)], device=device, dtype=dtype)
        lo = q.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        return lo, hi, (q - lo.to(q.dtype))[:, None]

    def _gain(self, table: torch.Tensor, quality) -> torch.Tensor:
        """Gain vector(s) for ``quality`` as (B or 1, C, 1, 1), log-linear interpolation.
        ``quality`` may also be a point from :meth:`_quality_point`."""
        point = quality if isinstance(quality, tuple) else self._quality_point(quality, table.device, table.dtype)
        return torch.exp(_interpolate(table, point))[:, :, None, None]

    def _run(self, name: str, x: torch.Tensor, point) -> torch.Tensor:
        """The Sequential ``name`` on ``x``, with its quality modulation if the model has one."""
        seq = getattr(self, name)
        if self.modulation is None:
            return seq(x)
        for i, layer in enumerate(seq):
            x = layer(x)
            key = f"{name}_{i}"
            if key in self.modulation:
                x = self.modulation[key](x, point)
        return x

    # ------------------------------------------------------------------ pieces
    def analysis(self, x: torch.Tensor, quality):
        """The latents ``(y_h, y_l)`` of ``x`` at ``quality``, already scaled by its gains."""
        if x.dim() != 4 or x.size(1) != 3:
            raise ValueError(f"x must be (B, 3, H, W), got {tuple(x.shape)}")
        if x.size(2) % self.stride or x.size(3) % self.stride:
            raise ValueError(
                f"x: H and W must be multiples of {self.stride}, got "
                f"{tuple(x.shape[-2:])} (pad the image; the codec does)"
            )
        point = self._quality_point(quality, x.device, x.dtype)
        f = self._run("g_a_stem", x, point)
        y_h = self.g_a_h(f) * self._gain(self.gain_h, point)
        y_l = self._run("g_a_l", f, point) * self._gain(self.gain_l, point)
        return y_h, y_l

    def hyper_analysis(self, y_h: torch.Tensor, y_l: torch.Tensor) -> torch.Tensor:
        """The hyper-latent ``z`` of both latents."""
        return self.h_a(torch.cat([self.h_a_down_h(y_h), y_l], 1))

    def hyper_synthesis(self, z_hat: torch.Tensor, nets: Optional[nn.Module] = None):
        """Hyper features ``(f_h, f_l)`` (strides 8 and 16) of the decoded ``ẑ``, computed by
        ``nets`` (:meth:`coding_nets` when coding; default the model's own float32 networks)."""
        nets = self if nets is None else nets
        f_l = nets.h_s(z_hat)
        return nets.h_s_up_h(f_l), f_l

    def coding_nets(self) -> nn.ModuleDict:
        """float64 copies of the entropy-parameter networks (:data:`CODING_NETS`), rebuilt
        whenever one of their weights changed or moved."""
        sources = [getattr(self, name) for name in CODING_NETS]

        def build() -> nn.ModuleDict:
            with torch.no_grad():
                nets = nn.ModuleDict({name: copy.deepcopy(m) for name, m in zip(CODING_NETS, sources)})
                return nets.to(torch.float64).requires_grad_(False).eval()

        return _coding_nets_cache.get(self, [p for m in sources for p in m.parameters()], build)

    def forget_coding_nets(self) -> None:
        """Drop the cached :meth:`coding_nets` (after changing how the networks compute, not
        their weights: e.g. :func:`dualres_ext.models.fake_quant.install`)."""
        _coding_nets_cache.clear(self)

    def synthesis(self, y_h_hat: torch.Tensor, y_l_hat: torch.Tensor, quality) -> torch.Tensor:
        """The picture (not clamped) from the decoded latents at ``quality``."""
        point = self._quality_point(quality, y_h_hat.device, y_h_hat.dtype)
        y_h_hat = y_h_hat * self._gain(self.inv_gain_h, point)
        y_l_hat = y_l_hat * self._gain(self.inv_gain_l, point)
        return self._run("g_s", torch.cat([self._run("g_s_up_l", y_l_hat, point), y_h_hat], 1), point)

    def z_offset(self) -> torch.Tensor:
        """The factorized prior's medians, around which ``z`` is quantised (C, 1, 1)."""
        return self.entropy_bottleneck._get_medians().detach()

    def decode_latents(
        self, z_hat: torch.Tensor, step_h: SliceStep, step_l: SliceStep, nets: Optional[nn.Module] = None
    ):
        """``(ŷ_H, ŷ_L)`` from ``ẑ``: the hyper synthesis, then the slice loop of ``y_H``, then that
        of ``y_L`` conditioned on ``down(ŷ_H)``, with ``step_h`` / ``step_l`` quantising (and
        coding, decoding or measuring) each slice (:meth:`_SliceCoder.run`). ``nets``: which
        networks compute it (:meth:`coding_nets` for coding; default the model's own)."""
        nets = self if nets is None else nets
        f_h, f_l = self.hyper_synthesis(z_hat, nets)
        y_h_hat = nets.coder_h.run(f_h, None, step_h)
        y_l_hat = nets.coder_l.run(f_l, nets.cond_down_h(y_h_hat), step_l)
        return y_h_hat, y_l_hat

    # ------------------------------------------------------------------ training
    def _likelihood_step(self, y: torch.Tensor, coder: _SliceCoder, likelihoods: list) -> SliceStep:
        """The training / evaluation step: likelihoods of the slices (noisy in training), then
        their quantised values."""
        pieces = coder.split(y)
        gc = self.gaussian_conditional

        def step(i, scales, means):
            likelihoods.append(gc(pieces[i], scales, means=means)[1])
            return quantize_latent(pieces[i], means, self.training, gc)

        return step

    def forward(self, x: torch.Tensor, quality=None):
        if quality is None:
            quality = self.num_qualities - 1
        y_h, y_l = self.analysis(x, quality)
        z = self.hyper_analysis(y_h, y_l)
        _, z_likelihoods = self.entropy_bottleneck(z)
        z_hat = quantize_latent(z, self.z_offset(), self.training, self.entropy_bottleneck)
        dtype = y_h.dtype
        if self.exact is not None and not (self.training or torch.is_grad_enabled()):
            # Inference with the exact networks: the values the decoder of versions 4 and 5 gets.
            lik_h, lik_l = [], []
            y_h_hat, y_l_hat = self.exact.decode_latents(
                z_hat,
                self._exact_likelihood_step(y_h, self.coder_h, lik_h),
                self._exact_likelihood_step(y_l, self.coder_l, lik_l),
            )
            x_hat = self.synthesis(y_h_hat.to(dtype), y_l_hat.to(dtype), quality)
            return {
                "x_hat": x_hat,
                "likelihoods": {
                    "y_h": torch.cat(lik_h, 1).to(dtype),
                    "y_l": torch.cat(lik_l, 1).to(dtype),
                    "z": z_likelihoods,
                },
            }
        if self.training or torch.is_grad_enabled():
            nets = self
        else:
            # Inference: the very float64 path compress/decompress take, so that x_hat (and the
            # likelihoods) are what the decoder gets. Training and gradients stay in float32.
            nets = self.coding_nets()
            y_h, y_l, z_hat = y_h.double(), y_l.double(), z_hat.double()
        lik_h: List[torch.Tensor] = []
        lik_l: List[torch.Tensor] = []
        y_h_hat, y_l_hat = self.decode_latents(
            z_hat,
            self._likelihood_step(y_h, nets.coder_h, lik_h),
            self._likelihood_step(y_l, nets.coder_l, lik_l),
            nets,
        )
        x_hat = self.synthesis(y_h_hat.to(dtype), y_l_hat.to(dtype), quality)
        return {
            "x_hat": x_hat,
            "likelihoods": {
                "y_h": torch.cat(lik_h, 1).to(dtype),
                "y_l": torch.cat(lik_l, 1).to(dtype),
                "z": z_likelihoods,
            },
        }

    def _exact_likelihood_step(self, y: torch.Tensor, coder: _SliceCoder, likelihoods: list) -> ExactStep:
        """The evaluation step of the exact path: likelihoods under the scale the coder uses
        (the table entry of each index), then the quantised values (float64, exact)."""
        pieces = coder.split(y)
        gc = self.gaussian_conditional

        def step(i, indexes, means):
            y_hat = quantize_latent(pieces[i].double(), means, False, gc)
            scales = gc.scale_table.to(means.device)[indexes.long()].to(means.dtype)
            likelihoods.append(gc.likelihood(y_hat, scales, means))
            return y_hat

        return step

    def aux_loss(self) -> torch.Tensor:
        """The factorized prior's quantile loss (optimise with its own optimizer, as in CompressAI)."""
        return self.entropy_bottleneck.loss()

    # ------------------------------------------------------------------ coding
    def update(self, scale_table=None, force: bool = False) -> bool:
        """Build the CDF tables of both entropy models (call after training / loading)."""
        if scale_table is None:
            scale_table = get_scale_table()
        updated = self.gaussian_conditional.update_scale_table(scale_table, force=force)
        updated |= self.entropy_bottleneck.update(force=force)
        return bool(updated)

    def lmbda(self, quality) -> float:
        """The rate-distortion trade-off ``quality`` was trained for (loss = bpp + lmbda * 255^2 *
        MSE): ``lambdas[quality]``, log-linearly interpolated for a fractional quality, like the gains."""
        log_lambdas = torch.tensor(self.lambdas, dtype=torch.float64).log()[:, None]
        point = self._quality_point(quality, log_lambdas.device, log_lambdas.dtype)
        return math.exp(float(_interpolate(log_lambdas, point)))

    @torch.no_grad()
    def compress(self, x: torch.Tensor, quality=None):
        """Encode ``x`` (B, 3, H, W), H and W multiples of 64, into byte strings.

        Returns ``{"strings": [z, y_H slice 0, ..., y_L slice 0, ...], "shape": z's (h, w)}``,
        each entry a list with one ``bytes`` per batch element (CompressAI's convention).
        :meth:`analysis`, :meth:`hyper_analysis` and :meth:`compress_latents` are its two halves;
        an encoder may change the latents in between (:mod:`dualres_ext.models.refine`).
        """
        if quality is None:
            quality = self.num_qualities - 1
        if isinstance(quality, torch.Tensor) and quality.dim() > 0:
            raise ValueError("compress: quality must be a single int or float")
        y_h, y_l = self.analysis(x, quality)
        return self.compress_latents(y_h, y_l, self.hyper_analysis(y_h, y_l))

    def _encode_step(self, y: torch.Tensor, coder: _SliceCoder, strings: list, lanes) -> SliceStep:
        pieces = coder.split(y)
        gc = self.gaussian_conditional

        def step(i, scales, means):
            strings.append(gc.compress(pieces[i], gc.build_indexes(scales), means=means, lanes=lanes))
            return quantize_latent(pieces[i], means, False, gc)

        return step

    def _decode_step(self, strings: Sequence) -> SliceStep:
        gc = self.gaussian_conditional

        def step(i, scales, means):
            return gc.decompress(strings[i], gc.build_indexes(scales), means=means).to(means.dtype)

        return step

    def _exact_encode_step(self, y: torch.Tensor, coder: _SliceCoder, pending: list) -> ExactStep:
        """Quantises each slice where the model runs and keeps its symbols, indexes and a flag
        saying the symbols are int32 values there (``pending``): the slice loop never waits for
        the host; :meth:`_code_pending` checks the flags and codes them after it."""
        pieces = coder.split(y)

        def step(i, indexes, means):
            rounded = torch.round(pieces[i].double() - means)  # ops.quantize_symbols' rounding: half to even
            valid = (rounded.abs() <= _INT32_MAX).all()  # False for NaN too
            # Kept finite for the next slices' integer networks when y is not (refused after the loop).
            symbols = rounded.clamp_(-_INT32_MAX, _INT32_MAX).nan_to_num_(0.0)
            pending.append((symbols, indexes, valid))
            return symbols + means  # the decoder's dequantize(symbols, means), exactly

        return step

    def _code_pending(self, pending: list, lanes) -> list:
        """One string list per slice from ``pending`` ``(symbols, indexes, valid)``: symbols and
        indexes as int32 where they are, brought to the host in one transfer with the flags (they
        may live on a GPU)."""
        if not pending:
            return []
        tensors = [t.to(torch.int32) for symbols, indexes, _ in pending for t in (symbols, indexes)]
        tensors.append(torch.stack([valid for *_, valid in pending]).to(torch.int32))
        parts = torch.cat([t.reshape(-1) for t in tensors]).cpu().split([t.numel() for t in tensors])
        if not bool(parts[-1].all()):
            raise ValueError("compress: y - means has values that are not finite or outside the int32 range")
        gc = self.gaussian_conditional
        out = []
        for k, (symbols, indexes, _) in enumerate(pending):
            host_symbols, host_indexes = parts[2 * k].view(symbols.shape), parts[2 * k + 1].view(indexes.shape)
            out.append(gc.compress_symbols(host_symbols, host_indexes, lanes=lanes))
        return out

    def _exact_decode_step(self, strings: Sequence, deferred: list) -> ExactStep:
        """Decodes each slice where the model runs (on a GPU without waiting for it); the streams'
        statuses go to ``deferred``, checked once after the loop."""
        gc = self.gaussian_conditional

        def step(i, indexes, means):
            return gc.decompress(strings[i], indexes, means=means, deferred=deferred).to(means.dtype)

        return step

    def _use_exact(self, exact: Optional[bool]) -> bool:
        if exact is None:
            return self.exact is not None
        if exact and self.exact is None:
            raise ValueError(
                "exact=True: the model has no exact (integer) entropy-parameter networks; "
                "convert it first (dualres_ext.models.exact, python/convert_exact.py)"
            )
        return bool(exact)

    @torch.no_grad()
    def compress_latents(
        self, y_h: torch.Tensor, y_l: torch.Tensor, z: torch.Tensor, exact: Optional[bool] = None, lanes=...
    ):
        """The coding half of :meth:`compress`: latents (already scaled by the quality's gains,
        as :meth:`analysis` gives them) to byte strings. The quality only enters the decoder
        through the synthesis. ``exact``: code the entropy parameters with the integer networks
        (:attr:`exact`, bitstream versions 4 and 5) or, False, with the float64 copies (versions
        2/3); default: the integer ones when the model has them. The decoder must be told the
        same. ``lanes``: the entropy models' stream for this call (default: their own ``lanes``);
        decoders read it from the strings."""
        strings = [self.entropy_bottleneck.compress(z, lanes=lanes)]
        z_hat = quantize_latent(z, self.z_offset(), False, self.entropy_bottleneck)
        if self._use_exact(exact):
            pending = []
            self.exact.decode_latents(
                z_hat,
                self._exact_encode_step(y_h, self.coder_h, pending),
                self._exact_encode_step(y_l, self.coder_l, pending),
            )
            return {"strings": strings + self._code_pending(pending, lanes), "shape": tuple(z.shape[-2:])}
        nets = self.coding_nets()  # float64: see "Portable streams" in the module docstring
        self.decode_latents(
            z_hat.double(),
            self._encode_step(y_h.double(), nets.coder_h, strings, lanes),
            self._encode_step(y_l.double(), nets.coder_l, strings, lanes),
            nets,
        )
        return {"strings": strings, "shape": tuple(z.shape[-2:])}

    @torch.no_grad()
    def decompress(self, strings, shape, quality=None):
        """Inverse of :meth:`compress`: ``{"x_hat": (B, 3, 64*h, 64*w)}`` (not clamped)."""
        if quality is None:
            quality = self.num_qualities - 1
        y_h_hat, y_l_hat = self.decompress_latents(strings, shape)
        return {"x_hat": self.synthesis(y_h_hat, y_l_hat, quality)}

    @torch.no_grad()
    def decompress_latents(self, strings, shape, exact: Optional[bool] = None):
        """The decoding half of :meth:`decompress`: the decoded latents ``(ŷ_H, ŷ_L)`` (in the
        synthesis' dtype), which :meth:`synthesis` turns into the picture at any quality.
        ``exact``: as the encoder's :meth:`compress_latents` was told."""
        n_h = len(self.coder_h.slices)
        n_expected = 1 + n_h + len(self.coder_l.slices)
        if len(strings) != n_expected:
            raise ValueError(f"strings: expected {n_expected} entries (z + slices), got {len(strings)}")
        shape = tuple(int(s) for s in shape)
        z_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        dtype = z_hat.dtype
        if self._use_exact(exact):
            deferred: list = []
            y_h_hat, y_l_hat = self.exact.decode_latents(
                z_hat,
                self._exact_decode_step(strings[1 : 1 + n_h], deferred),
                self._exact_decode_step(strings[1 + n_h :], deferred),
            )
            rans_interleaved.check_statuses(deferred)
            return y_h_hat.to(dtype), y_l_hat.to(dtype)
        y_h_hat, y_l_hat = self.decode_latents(
            z_hat.double(),
            self._decode_step(strings[1 : 1 + n_h]),
            self._decode_step(strings[1 + n_h :]),
            self.coding_nets(),
        )
        return y_h_hat.to(dtype), y_l_hat.to(dtype)

    def symbol_counts(self, shape) -> List[int]:
        """Symbols in each string :meth:`compress` writes per image, for ``z`` of size ``shape``
        (h, w): ``z``, then the slices of ``y_H`` (stride 8: 8h x 8w), then those of ``y_L``
        (stride 16: 4h x 4w). The codec's container leaves them out of the rANS streams."""
        h, w = (int(v) for v in shape)
        return (
            [self.config["Z"] * h * w]
            + [c * 64 * h * w for c in self.coder_h.slices]
            + [c * 16 * h * w for c in self.coder_l.slices]
        )
