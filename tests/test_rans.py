"""Native multi-lane rANS ops: round trips, size, thread independence, hostile input, GIL release.

The torch-free core also has its own C++ test (csrc/rans/tests/test_rans_core.cpp), built here
with g++ and the sanitizers when they are available.
"""

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from dualres_ext import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rans_testlib import gaussian_workload, hostile_variants, ideal_bits, random_symbols, random_tables  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


@pytest.mark.parametrize("shape", [(0,), (1,), (2,), (3, 5), (1, 7, 9, 11), (70001,)])
@pytest.mark.parametrize("lanes", [None, 1, 3, 64, 100000])
def test_round_trip_random_tables(gen, shape, lanes):
    for precision in (16, 11):
        cdfs, lengths, offsets = random_tables(gen, int(torch.randint(1, 12, (1,), generator=gen)), precision)
        sym, idx = random_symbols(gen, cdfs, lengths, offsets, shape)
        data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=lanes)
        assert isinstance(data, bytes)
        out = ops.rans_decode(data, idx, cdfs, lengths, offsets)
        assert out.dtype == torch.int32 and out.shape == idx.shape
        assert torch.equal(out, sym)
        # Every accepted input type for the data decodes the same.
        for d in (
            bytearray(data),
            memoryview(data),
            torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
        ):
            assert torch.equal(ops.rans_decode(d, idx, cdfs, lengths, offsets), sym)


def test_size_near_ideal_on_gaussian_data(gen):
    sym, idx, cdfs, lengths, offsets = gaussian_workload(gen, n_ch=320)
    ideal = ideal_bits(sym, idx, cdfs, lengths, offsets)
    # Default lanes must stay within 0.5% of ideal; an explicit 64 lanes (16 state bytes each)
    # within a budget of 1%.
    for lanes, budget in ((None, 0.005), (1, 0.005), (16, 0.005), (64, 0.01)):
        data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=lanes)
        excess = len(data) * 8 / ideal - 1
        assert excess < budget, f"lanes={lanes}: {100 * excess:.3f}% over ideal"
        assert torch.equal(ops.rans_decode(data, idx, cdfs, lengths, offsets), sym)


def test_low_entropy_data_gets_fewer_lanes(gen):
    # Nearly deterministic symbols: the encoder must keep the lane overhead below the budget.
    sym, idx, cdfs, lengths, offsets = gaussian_workload(gen, n_ch=320)
    idx = torch.zeros_like(idx)  # smallest scale: ~0.0002 bits/symbol
    sym = torch.zeros_like(sym) + torch.where(torch.rand(sym.shape, generator=gen) < 1e-4, 1, 0).int()
    ideal = ideal_bits(sym, idx, cdfs, lengths, offsets)
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
    assert len(data) * 8 < ideal * 1.005 + 8 * 64, (len(data), ideal / 8)
    assert torch.equal(ops.rans_decode(data, idx, cdfs, lengths, offsets), sym)


def test_small_streams_get_fewer_interleaved_states(gen):
    """A chosen layout keeps 4 interleaved states per lane (the fastest) only while their 16 bytes
    a lane stay under 0.25% of the payload: small streams (a latent slice at a low rate) get 2 or
    1 and save up to 12 bytes a lane; explicit lane counts keep 4."""
    cdfs, lengths, offsets = random_tables(gen, 6)
    seen = {}
    for n in (200, 3000, 20000, 400000):
        sym, idx = random_symbols(gen, cdfs, lengths, offsets, (n,), escapes=False)
        data = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
        info = ops.rans_stream_info(data)
        payload = sum(info["lane_bytes"])
        k = info["states_per_lane"]
        assert k == 1 or 4 * k * info["lanes"] * 400 <= payload, (n, info["lanes"], k, payload)
        assert k == 4 or 4 * 2 * k * info["lanes"] * 400 > payload, (n, info["lanes"], k, payload)
        assert torch.equal(ops.rans_decode(data, idx, cdfs, lengths, offsets), sym)
        explicit = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=1)
        assert ops.rans_stream_info(explicit)["states_per_lane"] == 4
        if k < 4 and info["lanes"] == 1:  # 4 state bytes fewer per state (the renormalisation
            assert abs(len(explicit) - len(data) - 4 * (4 - k)) <= 3  # bytes shift a little)
        seen[n] = k
    assert seen[200] == 1 and seen[400000] == 4, seen


def test_lane_count_reduced_twice_in_a_row(gen):
    """Regression (found by the Kodak evaluation, kodim07): a stream whose re-encode with the
    affordable lane count shrank the payload below the next budget boundary got its header sized
    for fewer lanes than were copied into it -- a heap overflow and an undecodable stream.

    The payload is swept across the two-lane budget (2 x 19 bytes per lane x 400 = 15,200 bytes)
    with the 8 default lanes of 196,608 symbols, in ~5-byte steps."""
    n = 196608
    cdfs = torch.tensor([[0, 65000, 65535, 65536]], dtype=torch.int32)  # 0: ~0.012 bits, 1: ~6.9 bits
    lengths, offsets = torch.tensor([4], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    idx = torch.zeros(n, dtype=torch.int32)
    lane_counts = set()
    for ones in range(16700, 17400, 6):
        sym = torch.zeros(n, dtype=torch.int32)
        sym[torch.randperm(n, generator=gen)[:ones]] = 1
        data = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
        assert torch.equal(ops.rans_decode(data, idx, cdfs, lengths, offsets), sym), (ones, len(data))
        lane_counts.add(ops.rans_stream_info(data)["lanes"])
    assert {1, 2} <= lane_counts  # the sweep crossed the two-lane budget


def test_decode_identical_for_1_and_2_threads(gen):
    sym, idx, cdfs, lengths, offsets = gaussian_workload(gen, n_ch=96)
    old = torch.get_num_threads()
    try:
        results = {}
        for nt in (1, 2):
            torch.set_num_threads(nt)
            data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=9)
            results[nt] = (data, ops.rans_decode(data, idx, cdfs, lengths, offsets))
        assert results[1][0] == results[2][0], "encoder output depends on the thread count"
        assert torch.equal(results[1][1], results[2][1]) and torch.equal(results[1][1], sym)
    finally:
        torch.set_num_threads(old)


def test_hostile_streams_raise_value_error(gen):
    cdfs, lengths, offsets = random_tables(gen, 6)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (20000,))
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=5)
    for what, bad in hostile_variants(data, gen):
        with pytest.raises(ValueError):
            ops.rans_decode(bad, idx, cdfs, lengths, offsets)
            pytest.fail(f"{what}: decoded without error")
    # A valid stream for other indexes (different count) is refused, not misread.
    with pytest.raises(ValueError, match="symbol count"):
        ops.rans_decode(data, idx[:-1], cdfs, lengths, offsets)


def test_stream_info_reads_the_header(gen):
    cdfs, lengths, offsets = random_tables(gen, 5, precision=14)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (3001,))
    for lanes in (1, 7):
        data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=lanes)
        info = ops.rans_stream_info(data)
        assert (info["precision"], info["states_per_lane"], info["symbols"], info["lanes"]) == (14, 4, 3001, lanes)
        assert len(info["lane_bytes"]) == lanes and all(b >= 16 for b in info["lane_bytes"])
        # The lane payloads are the whole rest of the stream, after a header of a few bytes.
        assert 9 + 2 < len(data) - sum(info["lane_bytes"]) <= 9 + 2 * 3 + 3 * lanes
    empty = ops.rans_encode(sym[:0], idx[:0], cdfs, lengths, offsets)
    info = ops.rans_stream_info(empty)  # no table used: the precision byte is the default, 16
    assert (info["symbols"], info["lanes"], info["lane_bytes"]) == (0, 0, [])
    # It validates as the decoder does: checksum, truncation, magic, type. (Not the precision byte:
    # the CRC does not cover it, a decoder checks it against its tables.)
    for what, bad in hostile_variants(data, gen):
        if what not in ("bit flip at 3", "wrong precision") and not what.startswith("garbage"):
            with pytest.raises(ValueError):
                ops.rans_stream_info(bad)
                pytest.fail(f"{what}: accepted")
    with pytest.raises(TypeError, match="data"):
        ops.rans_stream_info([1, 2, 3])


def test_is_native_stream_is_the_header_check(gen):
    """is_native_stream says what rans_stream_info accepts: native streams (empty ones included),
    not CompressAI streams, nor native streams that are corrupt or truncated."""
    cdfs, lengths, offsets = random_tables(gen, 5)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (2000,), escapes=False)
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=3)
    assert ops.is_native_stream(data) and ops.is_native_stream(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert ops.is_native_stream(ops.rans_encode(sym[:0], idx[:0], cdfs, lengths, offsets))
    assert not ops.is_native_stream(ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets))
    assert not ops.is_native_stream(b"")
    assert not ops.is_native_stream(data[:-1])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x10
    assert not ops.is_native_stream(bytes(flipped))
    with pytest.raises(TypeError, match="data"):
        ops.is_native_stream([1, 2, 3])


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (70001,)])
@pytest.mark.parametrize("lanes", [None, 1, 7])
def test_embedded_form_round_trips_byte_for_byte(gen, shape, lanes):
    precision = 16 if lanes != 7 else 12
    cdfs, lengths, offsets = random_tables(gen, 4, precision)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, shape)
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=lanes)
    n = sym.numel()
    embedded = ops.rans_embed(data, n, precision)
    # What is left out: magic, version, precision, CRC-32C (9 bytes) and the symbol count's varint,
    # less the states-per-lane byte kept at the front.
    varint_bytes = max(1, (n.bit_length() + 6) // 7)
    assert len(data) - len(embedded) == 9 + varint_bytes - 1
    assert embedded[0] == ops.rans_stream_info(data)["states_per_lane"]
    assert ops.rans_restore(embedded, n, precision) == data
    assert torch.equal(ops.rans_decode(ops.rans_restore(embedded, n, precision), idx, cdfs, lengths, offsets), sym)


def test_embedded_form_refuses_what_it_cannot_restore(gen):
    cdfs, lengths, offsets = random_tables(gen, 4, 16)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (5000,))
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=3)
    # embed validates like a decoder: its symbol count and precision must be the ones given.
    with pytest.raises(ValueError, match="symbol count or precision"):
        ops.rans_embed(data, 4999, 16)
    with pytest.raises(ValueError, match="symbol count or precision"):
        ops.rans_embed(data, 5000, 15)
    for what, bad in hostile_variants(data, gen):
        if what in ("bit flip at 3", "wrong precision") or what.startswith("garbage"):
            continue  # a stream the CRC does not cover there, or a valid-looking one
        with pytest.raises(ValueError):
            ops.rans_embed(bad, 5000, 16)
            pytest.fail(f"{what}: embedded")
    # restore takes untrusted bytes: a damaged lane table is refused there, a damaged payload
    # restores (the CRC it writes protects nothing) and is refused by the decoder.
    embedded = ops.rans_embed(data, 5000, 16)
    refused_early = 0
    for what, bad in hostile_variants(embedded, gen):
        if bad == embedded:
            continue
        try:
            restored = ops.rans_restore(bad, 5000, 16)
        except ValueError:
            refused_early += 1
            continue
        try:
            out = ops.rans_decode(restored, idx, cdfs, lengths, offsets)
        except ValueError:
            continue
        assert not torch.equal(out, sym) or what.startswith("bit flip"), what  # an undetected flip
    assert refused_early > 10
    for bad_args, error in [
        ((embedded, -1, 16), ValueError),
        ((embedded, 5000, 0), ValueError),
        ((embedded, 5000, 17), ValueError),
        ((embedded, 5000.0, 16), TypeError),
        ((embedded, True, 16), TypeError),
        (([1, 2], 5000, 16), TypeError),
    ]:
        with pytest.raises(error):
            ops.rans_restore(*bad_args)
        with pytest.raises(error):
            ops.rans_embed(*bad_args)


def test_argument_validation(gen):
    cdfs, lengths, offsets = random_tables(gen, 3)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (10,), escapes=False)
    with pytest.raises(ValueError, match="indexes"):
        ops.rans_encode(sym, torch.full_like(idx, 3), cdfs, lengths, offsets)
    with pytest.raises(ValueError, match="indexes"):
        ops.rans_encode(sym, torch.full_like(idx, -1), cdfs, lengths, offsets)
    with pytest.raises(TypeError, match="symbols"):
        ops.rans_encode(sym.float(), idx, cdfs, lengths, offsets)
    with pytest.raises(ValueError, match="same shape"):
        ops.rans_encode(sym[:5], idx, cdfs, lengths, offsets)
    bad = cdfs.clone()
    bad[0, 1] = bad[0, 2]  # a zero-frequency symbol
    with pytest.raises(ValueError, match="increasing"):
        ops.rans_encode(sym, torch.zeros_like(idx), bad, lengths, offsets)
    with pytest.raises(ValueError, match="cdf_lengths"):
        ops.rans_encode(sym, idx, cdfs, lengths + cdfs.shape[1], offsets)
    with pytest.raises(ValueError, match="offsets"):
        ops.rans_encode(sym, idx, cdfs, lengths, offsets[:-1])
    with pytest.raises(ValueError, match="lanes"):
        ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=0)
    with pytest.raises(TypeError, match="data"):
        ops.rans_decode("not bytes", idx, cdfs, lengths, offsets)
    # Lists and numpy arrays are accepted too.
    data = ops.rans_encode(sym.tolist(), idx.numpy(), cdfs, lengths, offsets)
    assert torch.equal(ops.rans_decode(data, idx, cdfs, lengths, offsets), sym)


def test_ops_release_the_gil(gen):
    # A second Python thread must make progress while an op runs. The switch interval is raised
    # so the interpreter never takes the GIL away from the calling thread by itself: if the op
    # kept the GIL, the counter could not move at all between the two reads around the call.
    sym, idx, cdfs, lengths, offsets = gaussian_workload(gen, n_ch=320)
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=1)
    compat = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    calls = [
        lambda: ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=1),
        lambda: ops.rans_decode(data, idx, cdfs, lengths, offsets),
        lambda: ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets),
        lambda: ops.rans_decode_compat(compat, idx, cdfs, lengths, offsets),
    ]
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)  # hands the GIL back after every step

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    th = threading.Thread(target=spin)
    th.start()
    try:
        time.sleep(0.02)
        for call in calls:
            moved = 0
            for _ in range(5):
                c0 = count[0]
                call()
                moved += count[0] - c0
            assert moved > 0, "the other thread never ran during the op: the GIL was held"
    finally:
        stop.set()
        th.join()
        sys.setswitchinterval(old_interval)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_core_standalone_cpp(tmp_path):
    src = os.path.join(ROOT, "csrc", "rans", "tests", "test_rans_core.cpp")
    exe = str(tmp_path / "test_rans_core")
    base = ["g++", "-std=c++20", "-O1", "-g", "-Wall", "-Wextra", src, "-o", exe]
    sanitized = base[:-3] + ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"] + base[-3:]
    if subprocess.run(sanitized, capture_output=True).returncode != 0:
        subprocess.run(base, check=True, capture_output=True)  # no sanitizer runtime here
    r = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all tests passed" in r.stdout


def test_bench_rans_command_runs(capsys):
    from dualres_ext.__main__ import main

    assert main(["bench-rans", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "Msym/s" in out and "all round trips exact" in out
