"""Exact entropy parameters (bitstream versions 4 and 5): integer layers, the converted shipped
weights, the default streams and their decoding in other processes (other ATen/oneDNN kernels,
threads)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualres_ext import codec
from dualres_ext import integer as I
from dualres_ext.models.zoo import load_weights, save_weights, weights_id


def _float64_reference(conv: I.IntConv, a: torch.Tensor) -> torch.Tensor:
    """``bias + conv(clamp(a))`` by the float64 fallback (im2col + GEMM, exact below 2^53)."""
    with I.float64_convolutions():
        return conv.accumulate(a.double())


def _int64_reference(conv: I.IntConv, a: torch.Tensor) -> torch.Tensor:
    """The same sum in int64 arithmetic, by explicit products and sums (no float at all)."""
    transposed, stride, padding, output_padding = conv._settings()
    bound = conv.in_bound[None, :, None, None]
    a = torch.maximum(torch.minimum(a.round().to(torch.int64), bound), -bound)
    w = conv.weight.to(torch.int64)
    if transposed:  # scatter each input position's products into the (cropped) output
        n, c_in, h, wd = a.shape
        c_out, k = w.shape[1], w.shape[-1]
        full = torch.zeros(
            n, c_out, (h - 1) * stride + k + output_padding, (wd - 1) * stride + k + output_padding, dtype=torch.int64
        )
        for ky in range(k):
            for kx in range(k):
                contrib = torch.einsum("nihw,io->nohw", a, w[:, :, ky, kx])
                full[:, :, ky : ky + (h - 1) * stride + 1 : stride, kx : kx + (wd - 1) * stride + 1 : stride] += contrib
        ho, wo = (
            (h - 1) * stride - 2 * padding + k + output_padding,
            (wd - 1) * stride - 2 * padding + k + output_padding,
        )
        out = full[:, :, padding : padding + ho, padding : padding + wo]
    else:
        k = w.shape[-1]
        ap = F.pad(a, (padding,) * 4)
        n, _, h, wd = ap.shape
        ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
        out = torch.zeros(n, w.shape[0], ho, wo, dtype=torch.int64)
        for ky in range(k):
            for kx in range(k):
                patch = ap[:, :, ky : ky + (ho - 1) * stride + 1 : stride, kx : kx + (wo - 1) * stride + 1 : stride]
                out += torch.einsum("nihw,oi->nohw", patch, w[:, :, ky, kx])
    return out + conv.bias[None, :, None, None]


def _extreme_inputs(conv: I.IntConv, shape, seed: int):
    """Inputs at the layer's bounds (all +A, all -A, random signs of A) and random ones within."""
    g = torch.Generator().manual_seed(seed)
    bound = conv.in_bound.double()[None, :, None, None]
    signs = torch.randint(0, 2, (1, bound.shape[1]) + shape, generator=g).double() * 2 - 1
    uniform = torch.round((torch.rand((1, bound.shape[1]) + shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
    # weights' signs aligned: the largest partial sums the bound allows
    w = conv.weight.double()
    align = torch.sign(w.sum(dim=(1, 2, 3)) if conv._settings()[0] else w.sum(dim=(0, 2, 3)))
    return [
        bound.expand_as(signs).clone(),
        -bound.expand_as(signs),
        signs * bound,
        uniform,
        align[None, :, None, None].expand_as(signs) * bound,
    ]


def _random_layer(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "conv3x3":
        return nn.Conv2d(96, 40, 3, padding=1)
    if kind == "conv1x1":
        return nn.Conv2d(80, 24, 1)
    if kind == "conv5x5s2":
        return nn.Conv2d(48, 32, 5, stride=2, padding=2)
    return nn.ConvTranspose2d(64, 32, 5, stride=2, padding=2, output_padding=1)


@pytest.mark.parametrize("kind", ["conv3x3", "conv1x1", "conv5x5s2", "deconv5x5s2"])
@pytest.mark.parametrize("act_bits", [9, 12, 15])
def test_int_conv_is_exact_at_its_bounds(kind, act_bits):
    layer = _random_layer(kind, act_bits)
    c_in, c_out = layer.in_channels, layer.out_channels
    in_scale = torch.full((c_in,), 0.01, dtype=torch.float64)
    in_bound = torch.full((c_in,), (1 << act_bits) - 1, dtype=torch.int64)
    in_bound[::3] = (1 << (act_bits - 2)) - 1  # channels with other bounds (concatenated inputs)
    conv = I.IntConv.convert(
        layer,
        in_scale,
        in_bound,
        torch.full((c_out,), 0.05, dtype=torch.float64),
        torch.full((c_out,), -4095),
        torch.full((c_out,), 4095),
        weight_bits=10,
    )
    for i, a in enumerate(_extreme_inputs(conv, (7, 9), act_bits)):
        want = _int64_reference(conv, a)
        assert torch.equal(_float64_reference(conv, a), want.double())
        assert torch.equal(conv.accumulate(a.float()), want.double()), f"input {i}"
        with torch.backends.mkldnn.flags(enabled=False):  # ATen's own float32 kernels
            assert torch.equal(conv.accumulate(a.float()), want.double()), f"input {i}, no oneDNN"
    # Out-of-bound inputs are clamped, never overflow the proof.
    a = _extreme_inputs(conv, (7, 9), 0)[0] * 1000
    assert torch.equal(conv.accumulate(a.float()), _int64_reference(conv, a).double())


def test_int_conv_approximates_the_float_layer():
    layer = _random_layer("conv3x3", 0)
    x = torch.randn(1, 96, 12, 12)
    s_in, s_out = 4.0 / 4095, float(layer(x).detach().abs().max()) * 1.5 / 4095
    conv = I.IntConv.convert(
        layer,
        torch.full((96,), s_in, dtype=torch.float64),
        torch.full((96,), 4095),
        torch.full((40,), s_out, dtype=torch.float64),
        torch.full((40,), -4095),
        torch.full((40,), 4095),
        weight_bits=10,
    )
    got = conv(torch.round(x / s_in)) * s_out
    torch.testing.assert_close(got, layer(x).detach(), atol=8 * s_out, rtol=0.01)


def test_lut_and_batches():
    lut = I.IntLUT.tabulate(I.gelu, 0.01, 100, 0.01, 100)
    q = torch.arange(-150, 151, dtype=torch.float32)
    want = torch.round(I.gelu(q.clamp(-100, 100).double() * 0.01) / 0.01).float()
    assert torch.equal(lut(q), want)
    # batches of 16 and more run 8 at a time (ATen would consider NNPACK's Winograd for them)
    layer = _random_layer("conv3x3", 1)
    conv = I.IntConv.convert(
        layer,
        torch.full((96,), 0.01, dtype=torch.float64),
        torch.full((96,), 2047),
        torch.full((40,), 0.05, dtype=torch.float64),
        torch.full((40,), -4095),
        torch.full((40,), 4095),
        weight_bits=10,
    )
    a = torch.randint(-2047, 2048, (17, 96, 5, 6)).float()
    assert torch.equal(conv.accumulate(a), _int64_reference(conv, a).double())


def test_scale_indexes_are_threshold_counts():
    from dualres_ext.models import get_scale_table
    from dualres_ext.models.exact import scale_indexes

    table = get_scale_table()
    for bits in (8, 12):
        thresholds = torch.floor(table[:-1].double() * 2.0**bits)
        sigma = torch.arange(0, int(thresholds[-1]) + 3, dtype=torch.float32)[None, None, None]
        want = (thresholds[:, None] < sigma.double().reshape(1, -1)).sum(0).reshape(sigma.shape)
        assert torch.equal(scale_indexes(sigma, table, bits).long(), want)


# ---------------------------------------------------------------------------- the shipped weights
@pytest.fixture(scope="module")
def shipped():
    model, _ = codec.resolve_model(None, None)
    if model.exact is None:
        pytest.skip("the shipped weights have no exact networks")
    return model


def test_shipped_exact_layers_are_exact(shipped):
    for name, conv in shipped.exact.named_modules():
        if isinstance(conv, I.IntConv):
            for a in _extreme_inputs(conv, (5, 6), 1)[::2]:
                want = _int64_reference(conv, a).double()
                assert torch.equal(conv.accumulate(a.float()), want), name
                assert torch.equal(_float64_reference(conv, a), want), name


def test_layer_inputs_stay_within_bounds(shipped):
    """The layers skip their input clamps where the producers guarantee the bounds: check on a
    real decode that every input is within them (so the clamp would change nothing)."""
    seen = []

    def hook(module, inputs):
        a = inputs[0] if isinstance(inputs[0], torch.Tensor) else torch.cat(list(inputs[0]), 1)
        a = a.double()
        bound = module.in_bound.double()[None, :, None, None]
        seen.append(bool((a.abs() <= bound).all()))

    handles = [m.register_forward_pre_hook(hook) for m in shipped.exact.modules() if isinstance(m, I.IntConv)]
    try:
        rng = np.random.default_rng(3)
        for q in (0, 5):
            codec.decode(codec.encode((rng.random((64, 128, 3)) * 255).astype(np.uint8), quality=q))
    finally:
        for h in handles:
            h.remove()
    assert seen and all(seen)


def test_versions_and_ids(shipped, tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((70, 100, 3)) * 255).astype(np.uint8)
    v5 = codec.encode(img, quality=2)
    v4 = codec.encode(img, quality=2, version=4)
    v3 = codec.encode(img, quality=2, version=3)
    assert v5[4] == 5 and v4[4] == 4 and v3[4] == 3
    assert codec.parse_header(v5)["weights_id"] == codec.parse_header(v4)["weights_id"] == weights_id(shipped)
    assert codec.parse_header(v3)["weights_id"] == weights_id(shipped, float_only=True)
    assert weights_id(shipped) != weights_id(shipped, float_only=True)
    # Versions 4 and 5 code the same symbols with the same entropy parameters: the same latents.
    assert codec.decode(v5, output="numpy").tobytes() == codec.decode(v4, output="numpy").tobytes()
    for data in (v3, v4, v5):
        out = codec.decode(data, output="numpy")
        assert out.shape == img.shape
    # A weights file keeps the exact networks bit for bit.
    path = tmp_path / "w.pt"
    save_weights(shipped, path)
    again = load_weights(path)
    assert weights_id(again) == weights_id(shipped)
    assert codec.decode(v4, weights=str(path), output="numpy").tobytes() == codec.decode(v4, output="numpy").tobytes()
    # A model without exact networks writes version 3 and refuses version 4 streams.
    plain = copy.deepcopy(shipped)
    plain.exact = None
    assert codec.encode(img, quality=2, weights=plain) == v3
    for version, data in ((4, v4), (5, v5)):
        with pytest.raises(codec.BitstreamError, match=f"version {version}"):
            codec.decode(data, weights=plain)
        with pytest.raises(ValueError, match=f"version={version}"):
            codec.encode(img, weights=plain, version=version)


def test_forward_matches_the_decoder(shipped):
    rng = np.random.default_rng(1)
    img = (rng.random((64, 128, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        out = shipped(x, 3)
        y = shipped.compress(x, 3)
        y_h, y_l = shipped.decompress_latents(y["strings"], y["shape"])
        assert torch.equal(out["x_hat"], shipped.synthesis(y_h, y_l, 3))


# A decoder in another process: the scale indexes and means of every slice, hashed.
TRACE = r"""
import hashlib, sys, torch
from dualres_ext import codec
torch.set_num_threads(int(sys.argv[1]))
model, wid = codec.resolve_model(None, None)
for path in sys.argv[2:]:
    head = codec.parse_header(open(path, "rb").read())
    digest = hashlib.sha256()
    step = model._exact_decode_step
    def traced(*args, step=step):
        inner = step(*args)
        def run(i, indexes, means):
            digest.update(indexes.numpy().tobytes()); digest.update(means.numpy().tobytes())
            return inner(i, indexes, means)
        return run
    model._exact_decode_step = traced
    y_h, y_l = codec._decode_latents(model, wid, [head])
    model._exact_decode_step = step
    digest.update(y_h.numpy().tobytes() + y_l.numpy().tobytes())
    print(digest.hexdigest())
"""


def _child_env() -> dict:
    """As conftest's ``package_env``: the child imports the dualres_ext these tests import."""
    import dualres_ext

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(dualres_ext.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _pictures():
    """Flat, noise, gradients and text-like edges, and odd sizes."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:96, 0:160]
    flat = np.full((64, 64, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)
    grad = np.stack([xx * 255 / 160, yy * 255 / 96, (xx + yy) % 256], -1).astype(np.uint8)
    text = np.where(((xx // 3) % 2 == 0) & ((yy // 5) % 3 != 0), 250, 5).astype(np.uint8)[..., None].repeat(3, -1)
    return [(flat, 0), (noise, 5), (grad, 2.5), (text, 4), (noise[:70, :130], 1)]


@pytest.fixture(scope="module")
def v4_streams(shipped, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v4")
    paths = []
    torch.set_num_threads(2)
    for i, (img, q) in enumerate(_pictures()):
        path = folder / f"{i}.drx"
        path.write_bytes(codec.encode(img, quality=q))
        paths.append(str(path))
    out = subprocess.run(
        [sys.executable, "-c", TRACE, "2", *paths], capture_output=True, text=True, timeout=600, env=_child_env()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return paths, out.stdout.split()


@pytest.mark.parametrize(
    "env",
    [
        {"threads": "1"},
        {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "threads": "1"},
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "threads": "3"},
    ],
    ids=["1thread", "scalar-sse41", "avx2-3threads"],
)
def test_v4_indexes_and_means_identical_under_other_kernels(v4_streams, env, package_env):
    paths, expected = v4_streams
    env = dict(env)
    threads = env.pop("threads")
    out = subprocess.run(
        [sys.executable, "-c", TRACE, threads, *paths],
        env={**package_env, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == expected
