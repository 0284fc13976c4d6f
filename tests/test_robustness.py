"""Robustness of the public API: decompression-bomb guard, concurrent use from threads."""

import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch

from dualres_ext import codec, ops
from dualres_ext.models import build


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    m = build("compact").eval()
    m.update(force=True)
    return m


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, 1 - xx * yy]) * 0.6
    return (base + 0.4 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


def _forge_size(data: bytes, width: int, height: int) -> bytes:
    """The same stream with another declared size and a valid CRC: only the limit can stop it."""
    b = bytearray(data[:-4])
    struct.pack_into("<HH", b, 15, width - 1, height - 1)  # version 3: u16 width-1, height-1 at 15
    return bytes(b) + struct.pack("<I", zlib.crc32(b) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def stream(model):
    return codec.encode(_image(64, 48, 1), quality=2, weights=model)


def test_bomb_header_refused_before_model_work(model, stream, monkeypatch):
    forged = _forge_size(stream, 65536, 65536)  # 4.3 Gpx: hundreds of GiB if decoded
    assert codec.parse_header(forged)["width"] == 65536  # the header itself is valid
    calls = []
    monkeypatch.setattr(model, "decompress", lambda *a, **k: calls.append(1))
    t0 = time.perf_counter()
    with pytest.raises(codec.ImageTooLargeError, match="65536x65536"):
        codec.decode(forged, weights=model)
    # Refused from the header alone: no model call, and no time spent allocating (generous bound:
    # decoding would take minutes and hundreds of GiB).
    assert not calls and time.perf_counter() - t0 < 5.0
    assert issubclass(codec.ImageTooLargeError, codec.BitstreamError)
    # Just above the default limit: still refused.
    w, h = 65536, codec.MAX_PIXELS // 65536 + 1
    with pytest.raises(codec.ImageTooLargeError):
        codec.decode(_forge_size(stream, w, h), weights=model)


def test_encode_applies_the_same_pixel_limit(model, monkeypatch):
    img = np.random.default_rng().integers(0, 256, (40, 30, 3), dtype=np.uint8)
    calls = []
    monkeypatch.setattr(model, "compress", lambda *a, **k: calls.append(1))
    with pytest.raises(codec.ImageTooLargeError, match="30x40"):
        codec.encode(img, weights=model, max_pixels=40 * 30 - 1)
    monkeypatch.setenv("DUALRES_MAX_PIXELS", "1000")
    with pytest.raises(codec.ImageTooLargeError, match="limit of 1000"):
        codec.encode(img, weights=model)
    assert not calls  # refused before any model work
    monkeypatch.undo()
    data = codec.encode(img, weights=model, max_pixels=40 * 30)
    assert codec.decode(data, weights=model, output="numpy", max_pixels=40 * 30).shape == img.shape


def test_pixel_limit_configuration(model, stream, monkeypatch):
    img = codec.decode(stream, weights=model, output="numpy")
    assert img.shape == (64, 48, 3)
    # The argument.
    with pytest.raises(codec.ImageTooLargeError):
        codec.decode(stream, weights=model, max_pixels=64 * 48 - 1)
    assert np.array_equal(codec.decode(stream, weights=model, output="numpy", max_pixels=64 * 48), img)
    # The environment variable (the argument wins over it).
    monkeypatch.setenv("DUALRES_MAX_PIXELS", "1000")
    with pytest.raises(codec.ImageTooLargeError):
        codec.decode(stream, weights=model)
    assert codec.decode(stream, weights=model, output="numpy", max_pixels=10**6).shape == img.shape
    monkeypatch.setenv("DUALRES_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="DUALRES_MAX_PIXELS"):
        codec.decode(stream, weights=model)
    monkeypatch.delenv("DUALRES_MAX_PIXELS")
    # The module default.
    monkeypatch.setattr(codec, "MAX_PIXELS", 100)
    with pytest.raises(codec.ImageTooLargeError):
        codec.decode(stream, weights=model)
    monkeypatch.undo()
    for bad, exc in ((0, ValueError), (-5, ValueError), (1.5e9, TypeError), ("9", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="max_pixels"):
            codec.decode(stream, weights=model, max_pixels=bad)


def _run_threads(fn, args_list):
    results, errors = [None] * len(args_list), []

    def work(i, args):
        try:
            results[i] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_codec_concurrent_threads(model):
    """Several Python threads encoding and decoding different images with one shared model give
    exactly the bytes and pixels of a serial run."""
    jobs = [(_image(64 + 64 * (i % 2), 64, 10 + i), i % 4) for i in range(4)]
    serial = [codec.encode(img, quality=q, weights=model) for img, q in jobs]
    serial_dec = [codec.decode(s, weights=model, output="numpy") for s in serial]

    def round_trip(img, q):
        s = codec.encode(img, quality=q, weights=model)
        return s, codec.decode(s, weights=model, output="numpy")

    for _ in range(2):
        out = _run_threads(round_trip, jobs)
        for (s, d), s0, d0 in zip(out, serial, serial_dec):
            assert s == s0
            assert np.array_equal(d, d0)


def test_rans_ops_concurrent_threads():
    cdfs, lengths, offsets = ops.gaussian_cdf_tables(torch.tensor([0.11, 0.5, 2.0, 8.0, 30.0]))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    cases = []
    for i in range(6):
        n = 50_000 + 1000 * i
        idx = torch.randint(0, cdfs.shape[0], (n,), generator=gen, dtype=torch.int32)
        sym = (torch.randn(n, generator=gen) * 6).round().to(torch.int32)
        cases.append((sym, idx))

    def work(sym, idx):
        out = []
        for _ in range(5):
            nat = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
            com = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
            out.append(
                torch.equal(ops.rans_decode(nat, idx, cdfs, lengths, offsets), sym)
                and torch.equal(ops.rans_decode_compat(com, idx, cdfs, lengths, offsets), sym)
                and nat == ops.rans_encode(sym, idx, cdfs, lengths, offsets)
            )
        return all(out)

    assert all(_run_threads(work, cases))
