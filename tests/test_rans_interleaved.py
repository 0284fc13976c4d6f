"""Interleaved rANS stream v2 (csrc/rans/rans_interleaved.h, dualres_ext.ops.rans_interleaved):
round trips, byte identity across SIMD paths / threads / the CUDA warp body emulated on the host,
groups and split points, hostile streams, size on the Gaussian workload."""

import os
import struct
import sys

import pytest
import torch

from dualres_ext import ops
from dualres_ext.ops import rans_interleaved as iv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rans_testlib import crc32c, gaussian_workload, hostile_variants, ideal_bits, random_symbols, random_tables  # noqa: E402

ISAS = iv.supported_isas()  # scalar, the SIMD paths this CPU runs, and "warp"


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


def reseal(stream: bytes) -> bytes:
    """A v2 stream with its CRC-32C (bytes 6..9, over bytes 10..end) recomputed."""
    if len(stream) < 10:
        return stream
    return stream[:6] + struct.pack("<I", crc32c(stream[10:])) + stream[10:]


@pytest.mark.parametrize("precision", [16, 15, 12, 8, 4, 2, 1])
def test_round_trip_and_byte_identity(gen, precision):
    cdfs, lengths, offsets = random_tables(gen, int(torch.randint(1, 10, (1,), generator=gen)), precision)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    for n in (0, 1, 15, 16, 17, 31, 32, 33, 1000, 20011):
        sym, idx = random_symbols(gen, cdfs, lengths, offsets, (n,))
        for width in (1, 2, 8, 16, 32):
            for groups, chained in ((1, False), (3, False), (5, True)):
                streams = {
                    isa: iv.encode(sym, idx, tables=tb, width=width, groups=groups, chained=chained, isa=isa)
                    for isa in ISAS
                }
                ref = streams["scalar"]
                for isa, d in streams.items():
                    assert d == ref, (isa, n, width, groups, chained)
                for isa in ISAS:
                    assert torch.equal(iv.decode(ref, idx, tables=tb, isa=isa), sym), (isa, n, width, groups)
                info = iv.stream_info(ref)
                assert info["symbols"] == n and info["width"] == width
                assert info["groups"] == min(groups, -(-n // width))


def test_int32_extremes_and_escapes(gen):
    cdfs, lengths, offsets = random_tables(gen, 4, 16)
    offsets = torch.tensor([-(2**31), 2**31 - 1, 0, 5], dtype=torch.int32)
    vals = torch.tensor([-(2**31), 2**31 - 1, 0, -1, 1, 2**30, -(2**30)], dtype=torch.int32)
    sym = vals.repeat(40)
    idx = torch.arange(sym.numel(), dtype=torch.int32) % 4
    for isa in ISAS:
        for width in iv.WIDTHS:
            d = iv.encode(sym, idx, cdfs, lengths, offsets, width=width, isa=isa)
            assert torch.equal(iv.decode(d, idx, cdfs, lengths, offsets, isa=isa), sym)


def test_threads_do_not_change_bytes(gen):
    cdfs, lengths, offsets = random_tables(gen, 8)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (3, 50000))
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            d = iv.encode(sym, idx, cdfs, lengths, offsets, groups=7)
            assert torch.equal(iv.decode(d, idx, cdfs, lengths, offsets), sym)
            outs.append(d)
        assert outs[0] == outs[1]
    finally:
        torch.set_num_threads(old)


def test_split_points_cost_only_when_asked_and_chain_is_one_encoding(gen):
    sym, idx, cdfs, lengths, offsets = gaussian_workload(gen, n_ch=64)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    one = iv.encode(sym, idx, tables=tb)
    chained = iv.encode(sym, idx, tables=tb, groups=8, chained=True)
    indep = iv.encode(sym, idx, tables=tb, groups=8)
    for d in (one, chained, indep):
        for isa in ISAS:
            assert torch.equal(iv.decode(d, idx, tables=tb, isa=isa), sym)
    ic, i1 = iv.stream_info(chained), iv.stream_info(one)
    assert ic["chained"] and ic["groups"] == 8 and i1["groups"] == 1
    # A chain is one encoding: its words are the single group's words, cut at the split points.
    assert sum(ic["group_words"]) == i1["group_words"][0]
    assert chained[-2 * i1["group_words"][0] :] == one[-2 * i1["group_words"][0] :]
    # Each extra group costs its 4 * W state bytes and a length varint.
    assert len(chained) - len(one) <= 7 * (4 * 32 + 3)


def test_size_over_ideal_on_gaussian_workload(gen):
    sym, idx, cdfs, lengths, offsets = gaussian_workload(gen, n_ch=320)
    ideal = ideal_bits(sym, idx, cdfs, lengths, offsets)
    for width, groups, budget in ((32, 1, 0.003), (16, 1, 0.003), (32, 2, 0.003)):
        d = iv.encode(sym, idx, cdfs, lengths, offsets, width=width, groups=groups)
        excess = len(d) * 8 / ideal - 1
        assert excess < budget, (width, groups, excess)
        assert torch.equal(iv.decode(d, idx, cdfs, lengths, offsets), sym)


@pytest.mark.parametrize("chained", [False, True])
def test_hostile_streams_raise_value_error(gen, chained):
    cdfs, lengths, offsets = random_tables(gen, 6)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (4000,))
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    data = iv.encode(sym, idx, tables=tb, groups=4, chained=chained)
    hdr = len(data) - 2 * sum(iv.stream_info(data)["group_words"])
    cases = list(hostile_variants(data, gen))
    # Payload damage re-sealed with a valid CRC, so that it reaches the group decoders.
    for _ in range(60):
        pos = int(torch.randint(10, len(data), (1,), generator=gen))
        c = bytearray(data)
        c[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        cases.append((f"resealed flip at {pos}", reseal(bytes(c))))
    for cut in (hdr, hdr + 2, len(data) - 2, len(data) - 64):
        cases.append((f"resealed cut at {cut}", reseal(data[:cut])))
    cases.append(("resealed zero words", reseal(data[:hdr] + bytes(len(data) - hdr))))
    cases.append(("resealed ff words", reseal(data[:hdr] + b"\xff" * (len(data) - hdr))))
    cases.append(("huge group count", reseal(data[:10] + bytes([0xA0, 0x1F]) + b"\xff\xff\x03" + data[13:])))
    cases.append(("bad width", reseal(data[:4] + b"\x18" + data[5:])))
    cases.append(("other width", reseal(data[:4] + b"\x08" + data[5:])))
    cases.append(("unknown flag", reseal(data[:5] + b"\x02" + data[6:])))
    for name, bad in cases:
        if bad == data:
            continue
        for isa in ISAS:
            try:
                out = iv.decode(bad, idx, tables=tb, isa=isa)
            except ValueError:
                continue
            # A damaged stream that still decodes must be detected unless it decodes to the same
            # symbols (e.g. a flipped bit in a group length the CRC re-seal made consistent).
            assert not torch.equal(out, sym) or name.startswith("resealed"), (name, isa)
    with pytest.raises(ValueError):
        iv.decode(data, idx[:-1], tables=tb)  # symbol count mismatch
    with pytest.raises(ValueError):
        iv.decode(ops.rans_encode(sym, idx, cdfs, lengths, offsets), idx, tables=tb)  # a v1 stream


def test_resealed_payload_damage_is_caught(gen):
    """Every re-sealed single-bit flip in the states or words is an error (or decodes to the
    original symbols, which a flip in unused state bits could); never a crash."""
    cdfs, lengths, offsets = random_tables(gen, 5)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (3000,), escapes=False)
    data = iv.encode(sym, idx, cdfs, lengths, offsets, groups=3)
    caught = 0
    for pos in range(10, len(data), max(1, len(data) // 300)):
        c = bytearray(data)
        c[pos] ^= 0x10
        try:
            out = iv.decode(reseal(bytes(c)), idx, cdfs, lengths, offsets, isa="scalar")
            assert out.shape == sym.shape
        except ValueError:
            caught += 1
    assert caught > 0


def test_argument_checks(gen):
    cdfs, lengths, offsets = random_tables(gen, 3)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (100,))
    with pytest.raises(ValueError):
        iv.encode(sym, idx, cdfs, lengths, offsets, width=24)
    with pytest.raises(ValueError):
        iv.encode(sym, idx, cdfs, lengths, offsets, width=0)
    with pytest.raises(ValueError):
        iv.encode(sym, idx, cdfs, lengths, offsets, width="widest")
    with pytest.raises(ValueError):
        iv.encode(sym, idx, cdfs, lengths, offsets, groups=0)
    with pytest.raises(ValueError):
        iv.encode(sym, idx + 100, cdfs, lengths, offsets)
    with pytest.raises(ValueError):
        iv.encode(sym, idx, cdfs, lengths, offsets, isa="neon")
    bad = cdfs.clone()
    bad[0, 1] = bad[0, 0]  # zero frequency in row 0
    only_other_rows = torch.where(idx == 0, 1, idx).int()
    d = iv.encode(sym, only_other_rows, bad, lengths, offsets)  # unused invalid rows are fine
    assert torch.equal(iv.decode(d, only_other_rows, bad, lengths, offsets), sym)
    with pytest.raises(ValueError):
        iv.encode(sym, idx.clone().fill_(0), bad, lengths, offsets)


def test_auto_width_spends_at_most_a_quarter_percent_on_states(gen):
    """width="auto" is the widest W whose 4 W bytes of states per group stay within 0.25% of the
    words; a stream too short for even one state gets W = 1. Bytes as the explicit width's."""
    cdfs, lengths, offsets = random_tables(gen, 6, 16)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    seen = set()
    for n in (0, 1, 300, 5_000, 40_000, 200_000):
        sym, idx = random_symbols(gen, cdfs, lengths, offsets, (n,))
        for groups in (1, 4):
            d = iv.encode(sym, idx, tables=tb, width="auto", groups=groups)
            info = iv.stream_info(d)
            words = 2 * sum(info["group_words"])
            fits = [w for w in iv.WIDTHS if 4 * w * info["groups"] <= iv.AUTO_STATE_BUDGET * words]
            # (the words hardly depend on W, so the rule holds for the stream as written)
            assert info["width"] == (max(fits) if fits else 1) or n == 0, (n, groups, info)
            assert d == iv.encode(sym, idx, tables=tb, width=info["width"], groups=groups)
            assert torch.equal(iv.decode(d, idx, tables=tb), sym)
            seen.add(info["width"])
    assert {1, 32} <= seen and len(seen) >= 3


def test_embedded_form_round_trips_and_refuses_damage(gen):
    """embed drops magic, version, precision, CRC and count (9-11 bytes); restore rebuilds the
    stream byte for byte; damaged embedded bytes are a ValueError there or in the decoder."""
    cdfs, lengths, offsets = random_tables(gen, 5, 14)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    for n, width, groups in ((0, 32, 1), (1, 1, 1), (777, 4, 3), (9000, 16, 2)):
        sym, idx = random_symbols(gen, cdfs, lengths, offsets, (n,))
        data = iv.encode(sym, idx, tables=tb, width=width, groups=groups)
        emb = iv.embed(data, n, 14)
        assert 9 <= len(data) - len(emb) <= 11 or n == 0
        assert iv.restore(emb, n, 14) == data
        with pytest.raises(ValueError):
            iv.embed(data, n + 1, 14)  # another symbol count
        if n:
            with pytest.raises(ValueError):
                iv.embed(data, n, 16)  # another precision
        for cut in range(0, len(emb), max(1, len(emb) // 25)):
            try:
                out = iv.decode(iv.restore(emb[:cut], n, 14), idx, tables=tb)
            except ValueError:
                continue
            assert cut == len(emb) or not torch.equal(out, sym) or n == 0
        for _ in range(40):
            c = bytearray(emb)
            if not c:
                break
            c[int(torch.randint(0, len(c), (1,), generator=gen))] ^= 0x41
            try:
                iv.decode(iv.restore(bytes(c), n, 14), idx, tables=tb)
            except ValueError:
                pass


def test_stream_kind_tells_the_formats_apart(gen):
    cdfs, lengths, offsets = random_tables(gen, 4, 16)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (3000,), escapes=False)
    v2 = iv.encode(sym, idx, cdfs, lengths, offsets, width=4)
    v1 = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
    compat = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    assert [ops.stream_kind(d) for d in (v2, v1, compat, b"", v2[:-1], v1[:20])] == [
        "interleaved",
        "multilane",
        None,
        None,
        None,
        None,
    ]
    assert iv.is_stream(v2) and not iv.is_stream(v1) and ops.is_native_stream(v1) and not ops.is_native_stream(v2)


def test_deferred_decode_and_status_check(gen):
    """decode_deferred gives decode's symbols and zero statuses; check_statuses raises on any
    non-zero status (what a GPU decoder leaves for a bad stream) and reads them all at once."""
    cdfs, lengths, offsets = random_tables(gen, 4, 16)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (5000,))
    data = iv.encode(sym, idx, cdfs, lengths, offsets, width=16, groups=3)
    out, status = iv.decode_deferred(data, idx, cdfs, lengths, offsets)
    assert torch.equal(out, sym) and status.dtype == torch.int32 and status.tolist() == [0, 0, 0]
    iv.check_statuses([status, torch.zeros(1, dtype=torch.int32)])
    iv.check_statuses([])
    with pytest.raises(ValueError, match="corrupt stream.*1 of 4 groups"):
        iv.check_statuses([status, torch.tensor([3], dtype=torch.int32)])
    with pytest.raises(ValueError):
        iv.decode_deferred(data[:-2], idx, cdfs, lengths, offsets)  # the CPU decoder raises at once


def test_table_cache_sees_in_place_changes(gen):
    cdfs, lengths, offsets = random_tables(gen, 3)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (500,))
    d = iv.encode(sym, idx, cdfs, lengths, offsets)
    offsets += 1  # in place: the cached preparation must not be reused
    d2 = iv.encode(sym, idx, cdfs, lengths, offsets)
    assert torch.equal(iv.decode(d2, idx, cdfs, lengths, offsets), sym)
    offsets -= 1
    assert torch.equal(iv.decode(d, idx, cdfs, lengths, offsets), sym)


# ---- CUDA (tests/conftest.py skips them without a GPU) --------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("precision", [16, 11, 1])
def test_cuda_byte_identity_and_cross_decoding(gen, precision):
    """The warp kernels write the CPU's bytes and decode the CPU's streams (and vice versa)."""
    cdfs, lengths, offsets = random_tables(gen, int(torch.randint(1, 10, (1,), generator=gen)), precision)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    for n in (0, 1, 31, 32, 33, 20011):
        sym, idx = random_symbols(gen, cdfs, lengths, offsets, (n,))
        g_sym, g_idx = sym.cuda(), idx.cuda()
        for width in (1, 8, 16, 32):
            for groups, chained in ((1, False), (7, False), (5, True)):
                ref = iv.encode(sym, idx, tables=tb, width=width, groups=groups, chained=chained)
                d = iv.encode(g_sym, g_idx, tables=tb, width=width, groups=groups, chained=chained)
                assert d == ref, (n, width, groups, chained)
                out = iv.decode(ref, g_idx, tables=tb)
                assert out.device.type == "cuda" and torch.equal(out.cpu(), sym), (n, width, groups)


@pytest.mark.cuda
def test_cuda_many_groups_and_escapes(gen):
    cdfs, lengths, offsets = random_tables(gen, 64, 16)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (32, 48, 32))
    ref = iv.encode(sym, idx, tables=tb, groups=16)
    assert iv.encode(sym.cuda(), idx.cuda(), tables=tb, groups=16) == ref
    assert torch.equal(iv.decode(ref, idx.cuda(), tables=tb).cpu(), sym)
    cdfs, lengths, _ = random_tables(gen, 4, 16)
    offsets = torch.tensor([-(2**31), 2**31 - 1, 0, 5], dtype=torch.int32)
    sym = torch.tensor([-(2**31), 2**31 - 1, 0, -1, 1, 2**30, -(2**30)], dtype=torch.int32).repeat(40)
    idx = torch.arange(sym.numel(), dtype=torch.int32) % 4
    ref = iv.encode(sym, idx, cdfs, lengths, offsets)
    assert iv.encode(sym.cuda(), idx.cuda(), cdfs, lengths, offsets) == ref
    assert torch.equal(iv.decode(ref, idx.cuda(), cdfs, lengths, offsets).cpu(), sym)


@pytest.mark.cuda
def test_cuda_busy_side_stream(gen):
    """Inputs produced asynchronously on a busy side stream, the op called under that stream: the
    kernels must run on the current stream (not the default one) or they read unfinished inputs."""
    cdfs, lengths, offsets = random_tables(gen, 6, 16)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (50021,))
    ref = iv.encode(sym, idx, tables=tb, groups=9)
    side = torch.cuda.Stream()
    h_sym, h_idx = sym.pin_memory(), idx.pin_memory()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the copies
        g_sym = h_sym.to("cuda", non_blocking=True)
        g_idx = h_idx.to("cuda", non_blocking=True)
        assert iv.encode(g_sym, g_idx, tables=tb, groups=9) == ref
        torch.cuda._sleep(200_000_000)
        g_idx2 = h_idx.to("cuda", non_blocking=True)
        out = iv.decode(ref, g_idx2, tables=tb)
        res = out.to("cpu", non_blocking=False)
    assert torch.equal(res, sym)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_cuda_second_device(gen):
    cdfs, lengths, offsets = random_tables(gen, 6, 16)
    tb = iv.prepare_tables(cdfs, lengths, offsets)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (20011,))
    ref = iv.encode(sym, idx, tables=tb, groups=5)
    dev = torch.device("cuda", 1)
    assert iv.encode(sym.to(dev), idx.to(dev), tables=tb, groups=5) == ref
    out = iv.decode(ref, idx.to(dev), tables=tb)
    assert out.device == dev and torch.equal(out.cpu(), sym)
