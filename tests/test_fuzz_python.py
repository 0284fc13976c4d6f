"""Python-level fuzzing: thousands of mutated valid streams through the public decoders.

Mutations: bit flips, byte overwrites, truncations, extensions, splices of two streams, edits of
length/size/count fields, random garbage. Many are re-sealed (the container's CRC-32 and/or the
rANS stream's CRC-32C recomputed) so they get past the checksums into the parsers and the
entropy decoder. Whatever the input, only the documented exceptions may come out
(ValueError -- BitstreamError is one -- and TypeError); never a crash, a hang or another type.
A crash would kill the pytest process; a hang is caught by a per-call time bound.
"""

import os
import random
import struct
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch

import dualres_ext
from dualres_ext import ans, codec, container, ops
from dualres_ext.models import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rans_testlib import reseal_native  # noqa: E402

ALLOWED = (ValueError, TypeError)
SLOW_CALL_S = 5.0  # a single decode of these small inputs takes milliseconds


def reseal_container(data: bytes) -> bytes:
    """Recompute the DualRes container's trailing CRC-32 over everything before it."""
    if len(data) < 4:
        return data
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One random mutation of ``data`` (``other``: a second valid stream for splices)."""
    b = bytearray(data)
    kind = rng.randrange(8)
    if kind == 0 and b:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:  # byte overwrites (special values)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif kind == 2:  # truncation
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 3:  # extension
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 4:  # splice with another stream
        i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
        b = b[:i] + other[j:]
    elif kind == 5 and len(b) >= 4:  # a 32-bit field set to an edge value
        i = rng.randrange(len(b) - 3)
        b[i : i + 4] = struct.pack(
            "<I", rng.choice((0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)))
        )
    elif kind == 6 and b:  # delete or duplicate a run
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 8))
        b = b[:i] + b[j:] if rng.random() < 0.5 else b[:j] + b[i:j] + b[j:]
    else:  # random garbage of similar size
        b = bytearray(rng.randrange(256) for _ in range(rng.randrange(2 * len(b) + 2)))
    return bytes(b)


def _call(fn, *args, **kwargs):
    """Run one decode; return 'ok' or the exception type name; fail on anything undocumented."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(*args, **kwargs)
        outcome = "ok"
    except ALLOWED as exc:
        outcome = type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{fn.__name__} raised an undocumented {type(exc).__name__}: {exc}")
    dt = time.perf_counter() - t0
    assert dt < SLOW_CALL_S, f"{fn.__name__} took {dt:.1f} s on a small input (hang?)"
    return outcome


# ----------------------------------------------------------------------------- low-level ops
@pytest.fixture(scope="module")
def tables():
    return ops.gaussian_cdf_tables(torch.tensor([0.11, 0.4, 1.0, 3.0, 9.0]))


def _symbols(gen, idx, cdfs, lengths, offsets):
    span = (lengths[idx.long()] - 2).clamp(min=1)
    sym = (torch.rand(idx.shape, generator=gen) * span).long() + offsets[idx.long()]
    esc = torch.rand(idx.shape, generator=gen) < 0.03  # some escapes, short and long
    big = torch.randint(-(2**28), 2**28, idx.shape, generator=gen)
    return torch.where(esc, big, sym).to(torch.int32)


def test_fuzz_rans_ops(tables):
    cdfs, lengths, offsets = tables
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    rng = random.Random(int(torch.randint(0, 2**31, (1,))))
    cases = []
    for n in (1, 5, 200, 3000):
        idx = torch.randint(0, cdfs.shape[0], (n,), generator=gen, dtype=torch.int32)
        sym = _symbols(gen, idx, cdfs, lengths, offsets)
        native = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=min(n, 4))
        compat = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
        assert torch.equal(ops.rans_decode(native, idx, cdfs, lengths, offsets), sym)
        assert torch.equal(ops.rans_decode_compat(compat, idx, cdfs, lengths, offsets), sym)
        cases.append((idx, sym, native, compat))
    outcomes = {}
    deep = 0
    for it in range(1500):
        idx, sym, native, compat = cases[it % len(cases)]
        other = cases[(it + 1) % len(cases)]
        bad_native = mutate(rng, native, other[2])
        if it % 2:
            bad_native = reseal_native(bad_native)  # past the CRC-32C into the lane decoder
        r = _call(ops.rans_decode, bad_native, idx, cdfs, lengths, offsets)
        outcomes[r] = outcomes.get(r, 0) + 1
        if r == "ok":
            deep += 1
        bad_compat = mutate(rng, compat, other[3])
        _call(ops.rans_decode_compat, bad_compat, idx, cdfs, lengths, offsets)
        # Chunked decoding through CompressAI's RansDecoder API.
        dec = ans.RansDecoder()
        dec.set_stream(bad_compat)
        step = max(1, idx.numel() // rng.randint(1, 6))
        for b in range(0, idx.numel(), step):
            if _call(dec.decode_stream, idx[b : b + step], cdfs, lengths, offsets) != "ok":
                break
    # Nearly everything must be refused; the ValueErrors came from the decoder's own checks.
    assert outcomes.get("ValueError", 0) > 1200, outcomes
    # A mutated stream that still decodes is legal only if it decodes to the right count.
    assert deep < 150, outcomes


def test_fuzz_rans_forged_state(tables):
    """rans_decode_compat_stream takes a caller-held state: any (position, state) pair is safe."""
    cdfs, lengths, offsets = tables
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    idx = torch.randint(0, cdfs.shape[0], (500,), generator=gen, dtype=torch.int32)
    sym = _symbols(gen, idx, cdfs, lengths, offsets)
    data = torch.frombuffer(bytearray(ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)), dtype=torch.uint8)
    edge = [0, 1, 2**31, 2**63 - 1, -1, -(2**63), data.numel(), data.numel() + 1, 7]
    for pos in edge:
        for x in edge + [int(torch.randint(-(2**62), 2**62, (1,)))]:
            state = torch.tensor([pos, x], dtype=torch.int64)
            _call(ops.rans_decode_compat_stream, data, state, idx, cdfs, lengths, offsets)


# ----------------------------------------------------------------------------- the codec
@pytest.fixture(scope="module")
def codec_setup():
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    model = build("compact").eval()
    model.update(force=True)
    # A smooth image with texture (not constant: the latents then use many table entries).
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    img = torch.stack([xx, yy, (xx * yy) ** 0.5]) * 0.7 + 0.3 * torch.rand(3, 64, 64)
    streams = [codec.encode(img.clamp(0, 1), quality=3, weights=model)]
    grey = codec.encode(img[0].clamp(0, 1), quality=1, weights=model)
    return model, streams + [grey]


def test_fuzz_codec_decode(codec_setup):
    model, streams = codec_setup
    rng = random.Random(int(torch.randint(0, 2**31, (1,))))
    for s in streams:  # the valid streams decode
        assert codec.decode(s, weights=model, output="numpy").shape[:2] == (64, 64)
    outcomes = {}
    t_end = time.perf_counter() + 6.0  # time-bounded: a decode that reaches the model costs ~0.1 s
    for it in range(4000):
        data, other = streams[it % len(streams)], streams[(it + 1) % len(streams)]
        bad = mutate(rng, data, other)
        if it % 32 == 0:  # one in 32 goes past the container CRC
            bad = reseal_container(bad)
        r = _call(codec.decode, bad, weights=model, output="numpy")
        outcomes[r] = outcomes.get(r, 0) + 1
        if it >= 400 and time.perf_counter() > t_end:
            break
    assert sum(outcomes.values()) >= 400, outcomes
    assert outcomes.get("ValueError", 0) + outcomes.get("BitstreamError", 0) > 0.9 * sum(outcomes.values())


def test_fuzz_codec_sections_resealed(codec_setup):
    """Mutate inside one section (an embedded native rANS stream, which has no checksum of its
    own) and re-seal the container's CRC-32: the stream restorer, the entropy decoder and the
    model see the corrupt data itself."""
    model, streams = codec_setup
    rng = random.Random(int(torch.randint(0, 2**31, (1,))))
    outcomes = {}
    t_end = time.perf_counter() + 3.0
    for it in range(150):
        if it >= 15 and time.perf_counter() > t_end:
            break
        head = codec.parse_header(streams[it % len(streams)])
        secs = list(head["sections"])
        k = rng.randrange(len(secs))
        secs[k] = mutate(rng, secs[k], secs[(k + 1) % len(secs)])
        flags = codec.FLAG_GREY if head["grey"] else 0
        forged = container.pack(
            head["config_id"], flags, head["quality"], head["weights_id"], head["width"], head["height"], secs
        )
        r = _call(codec.decode, forged, weights=model, output="numpy")
        outcomes[r] = outcomes.get(r, 0) + 1
    assert outcomes.get("BitstreamError", 0) > 0.7 * sum(outcomes.values()), outcomes


def test_fuzz_codec_header_fields_resealed(codec_setup):
    """Every header field set to edge values with a valid CRC: only documented errors."""
    model, streams = codec_setup
    data = streams[0]
    # Version 3: config, flags, quality, weights id, width-1, height-1, section count, then the
    # section lengths (varints) from offset 20.
    assert data[4] == 3
    fields = {5: "B", 6: "B", 7: "f", 11: "I", 15: "H", 17: "H", 19: "B", 20: "B", 21: "B", 22: "I"}
    values = {
        "B": (0, 2, 3, 4, 0x80, 255),
        "H": (0, 5, 7, 0xFFFF),
        "I": (0, 65, 65536, 0xFFFFFFFF),
        "f": (-1.0, 5.0, float("nan"), float("inf")),
    }
    for off, fmt in fields.items():
        for v in values[fmt]:
            b = bytearray(data)
            struct.pack_into("<" + fmt, b, off, v)
            _call(codec.decode, reseal_container(bytes(b)), weights=model, output="numpy", max_pixels=1 << 20)
    # wrong argument types are TypeErrors, not crashes
    for bad in (None, 3, "abc", [1, 2], np.zeros(4, np.uint8)):
        with pytest.raises(TypeError):
            codec.decode(bad, weights=model)
    assert isinstance(dualres_ext.codec.BitstreamError("x"), ValueError)
