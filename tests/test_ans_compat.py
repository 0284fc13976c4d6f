"""dualres_ext.ans against compressai.ans 1.2.8: identical bytes, mutual decoding, robustness."""

import os
import sys

import numpy as np
import pytest
import torch

compressai_ans = pytest.importorskip("compressai.ans")

from dualres_ext import ans, ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rans_testlib import gaussian_workload  # noqa: E402
from rans_testlib import random_tables as _random_tables  # noqa: E402


def random_tables(gen, T, max_len=40):
    # At least 2 symbols per table: CompressAI stores frequencies as uint16, so a one-symbol
    # table (frequency 65536) makes it divide by zero. Ours handles that case (tests/test_rans.py).
    return _random_tables(gen, T, max_len=max_len, min_len=3)


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


def compat_symbols(gen, cdfs, lengths, offsets, n, escapes=True):
    """Symbols CompressAI can code: in-table mostly, escapes (negative and large) with |value| < 2^26.

    CompressAI's encoder loops forever from 2^27 on (it shifts an int32 by 32 when counting
    bypass chunks); ours codes the whole int32 range its decoder can read back.
    """
    T = cdfs.shape[0]
    idx = torch.randint(0, T, (n,), generator=gen, dtype=torch.int32)
    span = (lengths[idx.long()] - 1).long()
    sym = (torch.rand(n, generator=gen) * span).long() + offsets[idx.long()].long()
    if escapes:
        r = torch.rand(n, generator=gen)
        sym = torch.where(r < 0.05, sym + torch.randint(-500, 500, (n,), generator=gen), sym)
        sym = torch.where(r > 0.99, torch.randint(-(2**26), 2**26, (n,), generator=gen), sym)
    return sym.int(), idx


def as_lists(cdfs, lengths, offsets):
    # CompressAI's callers pass padded rows (quantized_cdf.tolist()); ragged rows must work too.
    return [row[: int(n)].tolist() for row, n in zip(cdfs, lengths)], lengths.tolist(), offsets.tolist()


@pytest.mark.parametrize("n", [2, 3, 100, 20000])
def test_encode_byte_identical_to_compressai(gen, n):
    for _ in range(3):
        cdfs, lengths, offsets = random_tables(gen, int(torch.randint(1, 10, (1,), generator=gen)))
        sym, idx = compat_symbols(gen, cdfs, lengths, offsets, n)
        tables = as_lists(cdfs, lengths, offsets)
        ours = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
        # CompressAI's encoder writes into a buffer of one 32-bit word per symbol, which a few
        # symbols of small frequency or with escapes overrun (heap corruption, an abort now and
        # then): it is the reference where its output fits, CompressAI's decoder below otherwise.
        if len(ours) <= 4 * n:
            ref = compressai_ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables)
            assert ours == ref
        ref = ours
        assert ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables) == ref
        # Tensors / numpy give the same bytes.
        assert ans.RansEncoder().encode_with_indexes(sym, idx.numpy(), cdfs, lengths, offsets) == ref
        # Both decoders read it.
        assert compressai_ans.RansDecoder().decode_with_indexes(ref, idx.tolist(), *tables) == sym.tolist()
        assert ans.RansDecoder().decode_with_indexes(ref, idx.tolist(), *tables) == sym.tolist()
        out = ans.RansDecoder().decode_with_indexes(ref, idx, cdfs, lengths, offsets)
        assert isinstance(out, torch.Tensor) and torch.equal(out, sym)


def test_gaussian_conditional_streams(gen):
    # The real thing: CompressAI's GaussianConditional writes, we read, and vice versa.
    from compressai.entropy_models import GaussianConditional
    from compressai.models.google import get_scale_table

    gc = GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    scales = torch.exp(torch.rand(1, 24, 16, 12, generator=gen) * 5 - 2)
    y = torch.randn(1, 24, 16, 12, generator=gen) * scales * 1.5
    idx = gc.build_indexes(scales)
    strings = gc.compress(y, idx)
    sym = gc.quantize(y, "symbols").int()
    tables = (gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist())
    mine = ans.RansEncoder().encode_with_indexes(sym.reshape(-1).tolist(), idx.reshape(-1).int().tolist(), *tables)
    assert mine == strings[0]
    dec = ans.RansDecoder().decode_with_indexes(strings[0], idx.reshape(-1).int().tolist(), *tables)
    assert dec == sym.reshape(-1).tolist()


def test_buffered_encoder_and_stream_decoder(gen):
    # Serial-context-model usage: many small encode calls (two different table sets) then flush;
    # decoding with set_stream + decode_stream in the same pieces.
    t1 = random_tables(gen, 5)
    t2 = random_tables(gen, 3, max_len=80)
    lists = {1: as_lists(*t1), 2: as_lists(*t2)}
    pieces = []
    ref_enc, my_enc = compressai_ans.BufferedRansEncoder(), ans.BufferedRansEncoder()
    for k in range(30):
        which = 1 if k % 3 else 2
        sym, idx = compat_symbols(gen, *(t1 if which == 1 else t2), int(torch.randint(1, 50, (1,), generator=gen)))
        pieces.append((which, sym.tolist(), idx.tolist()))
        ref_enc.encode_with_indexes(sym.tolist(), idx.tolist(), *lists[which])
        my_enc.encode_with_indexes(sym.tolist(), idx.tolist(), *lists[which])
    ref = ref_enc.flush()
    assert my_enc.flush() == ref
    for Decoder in (compressai_ans.RansDecoder, ans.RansDecoder):
        dec = Decoder()
        dec.set_stream(ref)
        for which, sym, idx in pieces:
            assert dec.decode_stream(idx, *lists[which]) == sym
    # The buffer is empty after flush, as in CompressAI.
    sym, idx = compat_symbols(gen, *t1, 7)
    my_enc.encode_with_indexes(sym.tolist(), idx.tolist(), *lists[1])
    ref_enc.encode_with_indexes(sym.tolist(), idx.tolist(), *lists[1])
    assert my_enc.flush() == ref_enc.flush()


def test_zero_and_one_symbols(gen):
    # CompressAI aborts the process here; we must not.
    cdfs, lengths, offsets = random_tables(gen, 4)
    tables = as_lists(cdfs, lengths, offsets)
    empty = ans.RansEncoder().encode_with_indexes([], [], *tables)
    assert ans.RansDecoder().decode_with_indexes(empty, [], *tables) == []
    assert ans.BufferedRansEncoder().flush() == empty
    for _ in range(20):
        sym, idx = compat_symbols(gen, cdfs, lengths, offsets, 1)
        data = ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables)
        assert ans.RansDecoder().decode_with_indexes(data, idx.tolist(), *tables) == sym.tolist()
        dec = ans.RansDecoder()
        dec.set_stream(data)
        assert dec.decode_stream(idx.tolist(), *tables) == sym.tolist()


def test_hostile_compat_streams_raise(gen):
    cdfs, lengths, offsets = random_tables(gen, 6)
    tables = as_lists(cdfs, lengths, offsets)
    # Escape-free symbols: then every bit of the stream feeds the coder state, so almost every
    # flip shows at the end (bypass bits are stored verbatim in CompressAI's format and cannot be
    # checked). "Almost": CompressAI's format has no checksum, and tables with neighbouring
    # frequency-1 symbols make some one-bit edits another symbol sequence's exact encoding. The
    # decoder may accept such a stream only if it is exactly that: the encoding of what it returns.
    sym, idx = compat_symbols(gen, cdfs, lengths, offsets, 5000, escapes=False)
    esc = (sym.long() - offsets[idx.long()].long()) >= (lengths[idx.long()].long() - 2)
    sym, idx = sym[~esc], idx[~esc]
    data = ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables)
    dec = ans.RansDecoder()
    refused = 0
    for k in range(60):
        b = bytearray(data)
        if k % 3 == 0:
            b = b[: int(torch.randint(0, len(b), (1,), generator=gen))]
        elif k % 3 == 1:
            b[int(torch.randint(0, len(b), (1,), generator=gen))] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        else:
            start = int(torch.randint(0, len(b), (1,), generator=gen))
            b[start:] = os.urandom(len(b) - start)
        try:
            out = dec.decode_with_indexes(bytes(b), idx.tolist(), *tables)
        except ValueError:
            refused += 1
            continue
        assert k % 3 != 0, "a truncated stream was accepted"
        assert ans.RansEncoder().encode_with_indexes(out, idx.tolist(), *tables) == bytes(b)
    # Measured: 0.14% of one-bit flips are another valid stream with these tables (11 of 8000).
    assert refused >= 55
    # Streaming over the end of a truncated stream raises too, and a hostile escape count is bounded.
    dec.set_stream(data[: len(data) // 2])
    with pytest.raises(ValueError):
        for i in range(0, len(idx), 100):
            dec.decode_stream(idx[i : i + 100].tolist(), *tables)
    with pytest.raises(ValueError):
        ans.RansDecoder().decode_with_indexes(b"\xff" * 64, [0] * 40, *tables)


def test_table_cache_is_by_identity(gen):
    cdfs, lengths, offsets = random_tables(gen, 3)
    tables = as_lists(cdfs, lengths, offsets)
    sym, idx = compat_symbols(gen, cdfs, lengths, offsets, 50)
    a = ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables)
    # New lists with other contents must not hit the cache of the old ones.
    cdfs2, lengths2, offsets2 = random_tables(gen, 3)
    sym2, idx2 = compat_symbols(gen, cdfs2, lengths2, offsets2, 50)
    tables2 = as_lists(cdfs2, lengths2, offsets2)
    b = ans.RansEncoder().encode_with_indexes(sym2.tolist(), idx2.tolist(), *tables2)
    assert b == compressai_ans.RansEncoder().encode_with_indexes(sym2.tolist(), idx2.tolist(), *tables2)
    assert a == compressai_ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables)


def test_workload_round_trip_compat(gen):
    sym, idx, cdfs, lengths, offsets = gaussian_workload(gen, n_ch=64)
    data = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    out = ops.rans_decode_compat(data, idx, cdfs, lengths, offsets)
    assert out.shape == idx.shape and torch.equal(out, sym)
    assert np.array_equal(ans.RansDecoder().decode_with_indexes(data, idx.numpy(), cdfs, lengths, offsets), sym.numpy())


def lookup_tables(gen, T):
    """Rows for every case of the compat decoder's bucket lookup (64 buckets of 1024 slots):
    long heavy-tailed rows (many symbols per bucket), rows with one symbol of frequency >= 2^15
    (a bucket range spanning most of the row), three-symbol rows, a row whose boundaries fall
    on bucket edges (a bucket ending exactly where its second symbol ends) and one whose
    boundaries fall inside buckets (two or three symbols per bucket)."""
    long_rows = _random_tables(gen, T, max_len=3000, min_len=600)
    rows = [long_rows[0][t, : int(long_rows[1][t])].tolist() for t in range(T)]
    for _ in range(T):
        big = int(torch.randint(1 << 15, (1 << 16) - 40, (1,), generator=gen))
        rest = torch.rand(20, generator=gen, dtype=torch.float64) + 1e-3
        f = (rest / rest.sum() * ((1 << 16) - big - 20)).floor().long() + 1
        f[0] += (1 << 16) - big - int(f.sum())
        freqs = f.tolist()
        freqs.insert(int(torch.randint(0, 21, (1,), generator=gen)), big)
        rows.append([0] + torch.cumsum(torch.tensor(freqs), 0).tolist())
    rows.append([0, 1, 2, 1 << 16])
    rows.append([0, 512, 1024, 1536, 3000, 1 << 16])
    rows.append([0, 1024, 2048, 2100, 2200, 3072, 5000, 1 << 16])
    W = max(len(r) for r in rows)
    cdfs = torch.zeros(len(rows), W, dtype=torch.int32)
    for t, r in enumerate(rows):
        cdfs[t, : len(r)] = torch.tensor(r, dtype=torch.int32)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    offsets = torch.randint(-30, 30, (len(rows),), generator=gen, dtype=torch.int32)
    return cdfs, lengths, offsets


@pytest.mark.parametrize("n", [50, 40000])
def test_decode_lookup_fresh_tables_against_compressai(gen, n):
    # n = 40000 exceeds the table entries: the decoder prepares every row, not only those used.
    for _ in range(2):
        cdfs, lengths, offsets = lookup_tables(gen, 4)
        tables = as_lists(cdfs, lengths, offsets)
        sym, idx = compat_symbols(gen, cdfs, lengths, offsets, n)
        # Slots spread over whole rows: symbols drawn from each row's own distribution.
        u = torch.randint(0, 1 << 16, (n,), generator=gen, dtype=torch.int32)
        rows = cdfs[idx.long()]
        inside = torch.searchsorted(rows.contiguous(), u.unsqueeze(1), right=True).squeeze(1) - 1
        inside = torch.minimum(inside, (lengths[idx.long()] - 2).long())
        natural = (inside + offsets[idx.long()]).int()
        sym = torch.where(torch.rand(n, generator=gen) < 0.8, natural, sym)
        data = ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables)
        assert data == compressai_ans.RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), *tables)
        ref = compressai_ans.RansDecoder().decode_with_indexes(data, idx.tolist(), *tables)
        assert ref == sym.tolist()
        assert torch.equal(ops.rans_decode_compat(data, idx, cdfs, lengths, offsets), sym)
        dec = ans.RansDecoder()
        dec.set_stream(data)
        parts = [dec.decode_stream(idx[i : i + 997].tolist(), *tables) for i in range(0, n, 997)]
        assert sum(parts, []) == ref


def test_decode_lookup_invalid_unused_row(gen):
    # Many symbols, and a row that is not a CDF but is never used: decoding must not refuse it.
    cdfs, lengths, offsets = lookup_tables(gen, 2)
    cdfs[1, 5] = cdfs[1, 4]  # row 1 no longer strictly increasing
    idx = torch.randint(2, cdfs.shape[0], (cdfs.shape[0] * cdfs.shape[1] + 1,), generator=gen, dtype=torch.int32)
    sym = offsets[idx.long()]
    data = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    assert torch.equal(ops.rans_decode_compat(data, idx, cdfs, lengths, offsets), sym)
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.rans_decode_compat(data, torch.ones_like(idx), cdfs, lengths, offsets)


def test_hostile_streams_on_lookup_tables(gen):
    # Random and corrupted streams over rows with many symbols per bucket: ValueError or a stream
    # that is exactly the encoding of what was returned, never a crash or a hang.
    cdfs, lengths, offsets = lookup_tables(gen, 3)
    n = 3000
    sym, idx = compat_symbols(gen, cdfs, lengths, offsets, n, escapes=False)
    data = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    for k in range(60):
        if k % 2:
            b = bytearray(data)
            start = int(torch.randint(0, len(b), (1,), generator=gen))
            b[start:] = os.urandom(len(b) - start)
        else:
            b = bytearray(os.urandom(int(torch.randint(0, 4 * len(data), (1,), generator=gen))))
        try:
            out = ops.rans_decode_compat(bytes(b), idx, cdfs, lengths, offsets)
        except ValueError:
            continue
        assert ops.rans_encode_compat(out, idx, cdfs, lengths, offsets) == bytes(b)


def test_prepared_tables_follow_the_tensors(gen):
    # Large calls decode with tables prepared once per table tensors: the same tensors reuse them,
    # and replacing or writing any of the three (in place: the version counter) prepares anew.
    from dualres_ext.ops import rans

    cdfs, lengths, offsets = lookup_tables(gen, 3)
    n = cdfs.numel() + 1
    sym, idx = compat_symbols(gen, cdfs, lengths, offsets, n)
    data = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    assert torch.equal(ops.rans_decode_compat(data, idx, cdfs, lengths, offsets), sym)
    handle = rans._compat_tables(cdfs, lengths, offsets)
    assert rans._compat_tables(cdfs, lengths, offsets) is handle
    offsets.add_(5)  # every value moves with its table's offset
    assert rans._compat_tables(cdfs, lengths, offsets) is not handle
    assert torch.equal(ops.rans_decode_compat(data, idx, cdfs, lengths, offsets), sym + 5)
    other, other_lengths, _ = lookup_tables(gen, 3)
    if other.shape == cdfs.shape:
        cdfs.copy_(other)
        lengths.copy_(other_lengths)
    else:
        cdfs, lengths = other, other_lengths
    sym, idx = compat_symbols(gen, cdfs, lengths, offsets, n)
    data = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    assert torch.equal(ops.rans_decode_compat(data, idx, cdfs, lengths, offsets), sym)
    # Small calls (and lists) prepare the rows they use; the same symbols either way.
    few = min(n, 200)
    head = ans.RansEncoder().encode_with_indexes(sym[:few], idx[:few], cdfs, lengths, offsets)
    assert torch.equal(ops.rans_decode_compat(head, idx[:few], cdfs, lengths, offsets), sym[:few])
    lists = cdfs.tolist(), lengths.tolist(), offsets.tolist()
    assert torch.equal(ops.rans_decode_compat(head, idx[:few], *lists), sym[:few])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_dequantized(gen, dtype):
    # means/dtype: the decoder writes CompressAI's dequantised values in the same pass.
    cdfs, lengths, offsets = lookup_tables(gen, 3)
    sym, idx = compat_symbols(gen, cdfs, lengths, offsets, 5000)
    data = ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets)
    means = torch.randn(5000, dtype=dtype, generator=gen) * 3
    got = ops.rans_decode_compat(data, idx, cdfs, lengths, offsets, means=means)
    assert got.dtype == dtype and torch.equal(got, sym.to(dtype) + means)
    got = ops.rans_decode_compat(data, idx.reshape(50, 100), cdfs, lengths, offsets, dtype=dtype)
    assert got.shape == (50, 100) and torch.equal(got, sym.to(dtype).reshape(50, 100))
    # The means' dtype wins over dtype, as in CompressAI's dequantize.
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert ops.rans_decode_compat(data, idx, cdfs, lengths, offsets, means=means, dtype=other).dtype == dtype
    with pytest.raises(TypeError, match="means"):
        ops.rans_decode_compat(data, idx, cdfs, lengths, offsets, means=means.half())
    with pytest.raises(TypeError, match="dtype"):
        ops.rans_decode_compat(data, idx, cdfs, lengths, offsets, dtype=torch.int64)
    with pytest.raises(ValueError, match="means"):
        ops.rans_decode_compat(data, idx, cdfs, lengths, offsets, means=means[:-1])
    # Stream errors are the same with a dequantising decode.
    with pytest.raises(ValueError, match="rans_decode_compat"):
        ops.rans_decode_compat(data[: len(data) // 2], idx, cdfs, lengths, offsets, means=means)
    with pytest.raises(ValueError, match="indexes"):
        ops.rans_decode_compat(data, torch.full_like(idx, 99), cdfs, lengths, offsets, means=means)
    # Hostile bytes through the prepared decoder: a ValueError or values, never a crash or a hang.
    for k in range(40):
        b = bytearray(data)
        start = int(torch.randint(0, len(b), (1,), generator=gen))
        b[start:] = os.urandom(len(b) - start) if k % 2 else b[start:][: int(torch.randint(0, 9, (1,), generator=gen))]
        try:
            ops.rans_decode_compat(bytes(b), idx, cdfs, lengths, offsets, means=means)
        except ValueError:
            pass
