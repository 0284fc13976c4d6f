"""Streams decode to the same latents under other ATen CPU kernels (the vector or scalar code a
CPU without AVX2 runs), other oneDNN instruction sets and other thread counts, each in its own
process: everything the decoder compares or hashes is fixed bit for bit, not recomputed with the
platform's maths."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from dualres_ext import codec
from dualres_ext.models import get_scale_table

DECODE_LATENTS = r"""
import hashlib, sys, torch
from dualres_ext import codec
from dualres_ext.models import get_scale_table
torch.set_num_threads(int(sys.argv[1]))
model, wid = codec.resolve_model(None, None)
for path in sys.argv[2:]:
    head = codec.parse_header(open(path, "rb").read())
    y_h, y_l = codec._decode_latents(model, wid, [head])
    print(hashlib.sha256(y_h.numpy().tobytes() + y_l.numpy().tobytes()).hexdigest())
print(get_scale_table().numpy().tobytes().hex())
"""


def _picture(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0) * 90, yy * 255.0 / h, (xx * yy) % 255], -1) + 60
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streams")
    paths, expected = [], []
    model, wid = codec.resolve_model(None, None)
    for i, (quality, h, w) in enumerate([(0, 96, 160), (5, 96, 160), (2.5, 130, 70)]):
        data = codec.encode(_picture(i, h, w), quality=quality)
        path = folder / f"{i}.drx"
        path.write_bytes(data)
        paths.append(str(path))
        y_h, y_l = codec._decode_latents(model, wid, [codec.parse_header(data)])
        expected.append(hashlib.sha256(y_h.numpy().tobytes() + y_l.numpy().tobytes()).hexdigest())
    return paths, expected


@pytest.mark.parametrize(
    "env",
    [
        {"ATEN_CPU_CAPABILITY": "default"},
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "threads": "1"},
    ],
    ids=["aten-default", "avx2", "scalar-sse41-1thread"],
)
def test_latents_are_identical_under_other_cpu_kernels(streams, env, package_env):
    paths, expected = streams
    env = dict(env)
    threads = env.pop("threads", "2")
    out = subprocess.run(
        [sys.executable, "-c", DECODE_LATENTS, threads, *paths],
        env={**package_env, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[:-1] == expected
    assert lines[-1] == get_scale_table().numpy().tobytes().hex()


def test_scale_table_is_fixed_bit_for_bit():
    table = get_scale_table()
    assert table.dtype == torch.float32 and table.numel() == 64
    computed = torch.exp(torch.linspace(np.log(0.11), np.log(256.0), 64, dtype=torch.float64))
    # within a few float32 roundings (of the log-spaced values and of exp) of the exact table
    torch.testing.assert_close(table.double(), computed, rtol=1e-6, atol=0)
    assert bool((table[1:] > table[:-1]).all())
