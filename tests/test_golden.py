"""Golden streams: encoding gives the very bytes, and decoding the very values, that the
generator (tests/data/make_golden.py) recorded. A failure here means the bitstream or the
decoded result changed; if that is intended, regenerate the file and document the change."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("golden_inputs", HERE / "golden_inputs.py")
golden_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_inputs)

GOLDEN = torch.load(HERE / "data" / "golden_streams.pt", weights_only=True)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(GOLDEN["codec"]))
def test_codec_stream_and_pixels(name, one_thread):
    from dualres_ext import decode, encode

    image, kwargs = golden_inputs.codec_cases()[name]
    want = GOLDEN["codec"][name]
    data = encode(image, **kwargs)
    assert data == want["stream"], f"{name}: {len(data)} bytes, golden {len(want['stream'])}"
    assert hashlib.sha256(decode(want["stream"], output="numpy").tobytes()).hexdigest() == want["pixels"]


@pytest.mark.parametrize("name", sorted(GOLDEN["entropy"]))
def test_entropy_model_strings(name):
    cases = golden_inputs.entropy_cases()
    if name not in cases:
        pytest.skip("compressai is not installed")
    run_encode, run_decode = cases[name]
    want = GOLDEN["entropy"][name]
    assert run_encode() == want["strings"]
    assert _digest(run_decode(want["strings"])) == want["decoded"]


@pytest.mark.parametrize("name", sorted(GOLDEN["rans"]))
def test_rans_streams(name):
    run_encode, run_decode = golden_inputs.rans_cases()[name]
    want = GOLDEN["rans"][name]
    assert run_encode() == want["stream"]
    assert _digest(run_decode(want["stream"])) == want["decoded"]
