"""Image-quality metrics and the Bjøntegaard delta-rate, as learned-compression papers report them."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _as_float_tensor(img) -> torch.Tensor:
    """(N,C,H,W) float64 in [0, 255] from an HxWxC uint8 array or a (N,)C,H,W float tensor in [0,1]."""
    if isinstance(img, np.ndarray):
        t = torch.from_numpy(np.array(img, dtype=np.float64))  # a private copy (input may be read-only)
        t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
        return t[None]
    t = img.detach().double() * 255
    return t[None] if t.ndim == 3 else t


def psnr(a, b, peak: float = 255.0) -> float:
    """PSNR in dB over all channels (RGB PSNR, as CompressAI's eval reports it)."""
    mse = torch.mean((_as_float_tensor(a) - _as_float_tensor(b)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(t: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over the last two dimensions with 'valid' borders (Wang et al.), as
    weighted sums of shifted views: in float64 ~3x faster than sliding-window products and ~8x
    faster than a depthwise conv2d, which has no fast float64 path on CPU."""
    taps = window.tolist()
    k = len(taps)
    w = t.shape[-1] - k + 1
    rows = t[..., :w] * taps[0]
    for i in range(1, k):
        rows.add_(t[..., i : i + w], alpha=taps[i])
    h = rows.shape[-2] - k + 1
    out = rows[..., :h, :] * taps[0]
    for i in range(1, k):
        out.add_(rows[..., i : i + h, :], alpha=taps[i])
    return out


def _ssim_terms(x, y, window, data_range):
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    # The five local moments in one pass over a stacked tensor.
    mx, my, exx, eyy, exy = _blur(torch.stack([x, y, x * x, y * y, x * y]), window)
    sxx, syy, sxy = exx - mx**2, eyy - my**2, exy - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = ((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * cs
    return ssim.mean(dim=(2, 3)), cs.mean(dim=(2, 3))  # per image and channel


def ms_ssim(a, b, data_range: float = 255.0) -> float:
    """Multi-scale SSIM (Wang, Simoncelli, Bovik 2003) with the standard 5 scales and weights.

    Needs images of at least 161 pixels on the short side (the 11-tap window at the coarsest of the
    five scales); smaller images raise ValueError rather than giving a meaningless number.
    """
    x, y = _as_float_tensor(a), _as_float_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"ms_ssim: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < 161:
        raise ValueError(f"ms_ssim: images must be at least 161 px on each side, got {tuple(x.shape[-2:])}")
    window = _gaussian_window()
    weights = torch.tensor(_MS_SSIM_WEIGHTS, dtype=torch.float64)
    values = []
    for level in range(len(weights)):
        ssim, cs = _ssim_terms(x, y, window, data_range)
        values.append(torch.relu(cs) if level < len(weights) - 1 else torch.relu(ssim))
        if level < len(weights) - 1:
            # Odd sides are padded rather than cropped (as pytorch_msssim and CompressAI's eval do).
            pad = (x.shape[-2] % 2, x.shape[-1] % 2)
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    # Per-channel MS-SSIM averaged over channels, as pytorch_msssim (and so CompressAI's eval) reports it.
    stacked = torch.stack(values, dim=0)  # (levels, N, C)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean().item()


def bd_rate(
    rate_anchor: Sequence[float], psnr_anchor: Sequence[float], rate_test: Sequence[float], psnr_test: Sequence[float]
) -> float:
    """Bjøntegaard delta-rate in percent (negative: the test codec needs fewer bits for the same quality).

    Classic formulation (VCEG-M33): fit log-rate as a cubic polynomial of PSNR for each curve and
    compare the integrals over the PSNR interval both curves cover. Needs at least 4 points each.
    """
    ra, pa, rt, pt = (np.asarray(v, dtype=np.float64) for v in (rate_anchor, psnr_anchor, rate_test, psnr_test))
    if min(len(ra), len(rt)) < 4 or len(ra) != len(pa) or len(rt) != len(pt):
        raise ValueError("bd_rate needs two curves of at least 4 (rate, psnr) points each")
    if np.any(ra <= 0) or np.any(rt <= 0):
        raise ValueError("bd_rate: rates must be positive")
    fa = np.polyfit(pa, np.log(ra), 3)
    ft = np.polyfit(pt, np.log(rt), 3)
    lo, hi = max(pa.min(), pt.min()), min(pa.max(), pt.max())
    if lo >= hi:
        raise ValueError("bd_rate: the two curves do not overlap in quality")
    ia, it = np.polyint(fa), np.polyint(ft)
    avg_diff = ((np.polyval(it, hi) - np.polyval(it, lo)) - (np.polyval(ia, hi) - np.polyval(ia, lo))) / (hi - lo)
    return float((math.exp(avg_diff) - 1) * 100)
