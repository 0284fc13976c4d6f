"""Inputs of the golden-stream test (tests/test_golden.py) and its generator
(tests/data/make_golden.py): every case rebuilt from a seeded NumPy generator or from the
package's bundled photo, so that the bytes they code to can be compared across code changes.

Each ``*_cases()`` returns ``{name: ...}``; the codec cases give ``(image, encode kwargs)``, the
others a pair ``(encode() -> bytes or strings, decode(that) -> tensor)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _photo() -> np.ndarray:
    import dualres_ext

    path = Path(dualres_ext.__file__).resolve().parent / "assets" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB"))


def _synthetic(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A gradient, a hard-edged block of text-like stripes and noise: flat, edges and texture."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200 + 20
    img[h // 4 : h // 2, w // 5 : 4 * w // 5] = np.where((xx[h // 4 : h // 2, w // 5 : 4 * w // 5] // 3) % 2, 250, 10)[
        ..., None
    ]
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def codec_cases() -> dict:
    """``encode`` on the bundled photo, a crop, grey and synthetic pictures and rate control (default
    weights), as version 3, 4 and 5 streams."""
    photo = _photo()
    synthetic = _synthetic(_rng(1), 90, 130)
    grey = _synthetic(_rng(2), 80, 96)[..., 0]
    v3 = {"version": 3}  # the float64 entropy parameters: streams of earlier writers, still written on request
    v4 = {"version": 4}  # integer entropy parameters, multi-lane sections: earlier writers' too
    return {
        "photo_q0": (photo, {"quality": 0, **v3}),
        "photo_q2.5": (photo, {"quality": 2.5, **v3}),
        "photo_q5": (photo, {"quality": 5, **v3}),
        "crop_q3": (np.ascontiguousarray(photo[37:107, 11:111]), {"quality": 3, **v3}),
        "grey_q1": (grey, {"quality": 1, **v3}),
        "synthetic_q4": (synthetic, {"quality": 4, **v3}),
        "photo_max_bytes": (photo, {"max_bytes": 6000, **v3}),
        # version 4 (exact integer entropy parameters)
        "v4_photo_q0": (photo, {"quality": 0, **v4}),
        "v4_photo_q2.5": (photo, {"quality": 2.5, **v4}),
        "v4_photo_q5": (photo, {"quality": 5, **v4}),
        "v4_crop_q3": (np.ascontiguousarray(photo[37:107, 11:111]), {"quality": 3, **v4}),
        "v4_grey_q1": (grey, {"quality": 1, **v4}),
        "v4_synthetic_q4": (synthetic, {"quality": 4, **v4}),
        "v4_photo_max_bytes": (photo, {"max_bytes": 6000, **v4}),
        # version 5 (version 4's parameters, interleaved rANS sections), the default writer's
        "v5_photo_q0": (photo, {"quality": 0}),
        "v5_photo_q5": (photo, {"quality": 5}),
        "v5_crop_q3": (np.ascontiguousarray(photo[37:107, 11:111]), {"quality": 3}),
        "v5_grey_q1": (grey, {"quality": 1}),
        "v5_synthetic_q4": (synthetic, {"quality": 4}),
        "v5_photo_max_bytes": (photo, {"max_bytes": 6000}),
    }


def _gaussian_inputs(seed: int, shape=(2, 12, 9, 7)):
    rng = _rng(seed)
    scales = torch.from_numpy(np.exp(rng.uniform(math.log(0.05), math.log(60.0), shape))).float()
    means = torch.from_numpy(rng.normal(0, 3, shape)).float()
    y = means + scales * torch.from_numpy(rng.standard_normal(shape)).float()
    y.view(-1)[:5] = torch.tensor([1e4, -2e4, 300.5, -0.5, 0.5])  # escapes and ties
    return y, scales, means


def _seeded_bottleneck(cls, seed: int, channels: int = 8):
    eb = cls(channels)
    rng = _rng(seed)
    with torch.no_grad():
        for name, p in sorted(eb.named_parameters()):
            # biases start random (torch's generator): replaced; the rest start fixed: perturbed
            base = torch.zeros_like(p) if name.startswith("biases") else p.detach().clone()
            p.copy_(base + torch.from_numpy(rng.normal(0, 0.3, tuple(p.shape))).float())
        eb.quantiles.copy_(torch.from_numpy(np.sort(rng.normal(0, 4, (channels, 1, 3)), -1)).float())
    return eb


def entropy_cases() -> dict:
    """dualres_ext's entropy models in every stream format, and CompressAI's accelerated ones."""
    from dualres_ext.entropy_models import EntropyBottleneck, GaussianConditional
    from dualres_ext.models import get_scale_table

    cases = {}
    y, scales, means = _gaussian_inputs(3)
    for lanes in (None, "auto", "multilane", 3):
        gc = GaussianConditional(None, lanes=lanes)
        gc.update_scale_table(get_scale_table())
        idx = gc.build_indexes(scales)
        cases[f"gaussian_lanes_{lanes}"] = (
            lambda gc=gc, idx=idx: gc.compress(y, idx, means=means),
            lambda s, gc=gc, idx=idx: gc.decompress(s, idx, means=means),
        )
    x = torch.from_numpy(_rng(4).normal(0, 5, (2, 8, 6, 5))).float()
    for lanes in (None, "auto", "multilane"):
        eb = _seeded_bottleneck(lambda c, lanes=lanes: EntropyBottleneck(c, lanes=lanes), 5)
        eb.update(force=True)
        cases[f"bottleneck_lanes_{lanes}"] = (
            lambda eb=eb: eb.compress(x),
            lambda s, eb=eb: eb.decompress(s, x.shape[-2:]),
        )
    try:
        import compressai.entropy_models as cai
    except ImportError:
        return cases
    from dualres_ext.compat import accelerate

    for lanes in (None, "auto", "multilane"):
        holder = torch.nn.Module()
        holder.entropy_bottleneck = _seeded_bottleneck(cai.EntropyBottleneck, 5)
        holder.gaussian_conditional = cai.GaussianConditional(None)
        holder.entropy_bottleneck.update(force=True)
        holder.gaussian_conditional.update_scale_table(get_scale_table().tolist())
        accelerate(holder, lanes=lanes)
        gc, eb = holder.gaussian_conditional, holder.entropy_bottleneck
        idx = gc.build_indexes(scales)
        cases[f"compat_gaussian_lanes_{lanes}"] = (
            lambda gc=gc, idx=idx: gc.compress(y, idx, means=means),
            lambda s, gc=gc, idx=idx: gc.decompress(s, idx, means=means),
        )
        cases[f"compat_bottleneck_lanes_{lanes}"] = (
            lambda eb=eb: eb.compress(x),
            lambda s, eb=eb: eb.decompress(s, x.shape[-2:]),
        )
    return cases


def _tables(seed: int, count: int = 24, precision: int = 16):
    rng = _rng(seed)
    lengths = rng.integers(2, 40, count)
    pmf = np.zeros((count, int(lengths.max())), np.float32)
    for t, n in enumerate(lengths):
        pmf[t, :n] = rng.random(n) ** 3 + 1e-4
        pmf[t, :n] /= pmf[t, :n].sum()
    from dualres_ext import ops

    cdfs = ops.pmf_to_quantized_cdf(torch.from_numpy(pmf), torch.from_numpy(lengths).int(), precision)
    offsets = torch.from_numpy(rng.integers(-20, 5, count)).int()
    return cdfs, torch.from_numpy(lengths + 1).int(), offsets


def rans_cases() -> dict:
    """The native streams (multi-lane at several lane counts, interleaved at several widths and
    groups), their embedded forms, and CompressAI's."""
    from dualres_ext import ops
    from dualres_ext.ops import rans_interleaved

    cdfs, lengths, offsets = _tables(6)
    rng = _rng(7)
    n = 20_000
    idx = torch.from_numpy(rng.integers(0, cdfs.size(0), n)).int()
    sym = (torch.from_numpy(rng.random(n)) * (lengths[idx.long()] - 2)).long() + offsets[idx.long()]
    sym[::997] += torch.from_numpy(rng.integers(-500, 500, sym[::997].numel()))  # escapes
    sym = sym.int()
    tables = (cdfs, lengths, offsets)
    cases = {}
    for lanes in (None, 1, 7):
        cases[f"native_lanes_{lanes}"] = (
            lambda lanes=lanes: ops.rans_encode(sym, idx, *tables, lanes=lanes),
            lambda d: ops.rans_decode(d, idx, *tables),
        )
    cases["embedded"] = (
        lambda: ops.rans_embed(ops.rans_encode(sym, idx, *tables), n),
        lambda d: ops.rans_decode(ops.rans_restore(d, n), idx, *tables),
    )
    for width, groups, chained in ((32, 1, False), (16, 3, False), (16, 3, True), (4, 1, False), ("auto", 1, False)):
        cases[f"interleaved_w{width}_g{groups}{'_chained' if chained else ''}"] = (
            lambda width=width, groups=groups, chained=chained: rans_interleaved.encode(
                sym, idx, *tables, width=width, groups=groups, chained=chained
            ),
            lambda d: rans_interleaved.decode(d, idx, *tables),
        )
    cases["interleaved_embedded"] = (
        lambda: rans_interleaved.embed(rans_interleaved.encode(sym, idx, *tables, width=8), n),
        lambda d: rans_interleaved.decode(rans_interleaved.restore(d, n), idx, *tables),
    )
    cases["compat"] = (
        lambda: ops.rans_encode_compat(sym, idx, *tables),
        lambda d: ops.rans_decode_compat(d, idx, *tables),
    )
    return cases
