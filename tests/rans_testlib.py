"""Shared helpers of the rANS tests (random tables and symbols, a typical 320 x 48 x 32 latent).

Imported by path because pytest runs with --import-mode=importlib (tests are not a package).
"""

import math
import os
import struct

import torch


def random_tables(gen, T, precision=16, max_len=40, min_len=2):
    """Random CompressAI-layout tables: each row a CDF 0..1<<precision, padded with zeros."""
    lengths = torch.randint(min_len, max_len + 1, (T,), generator=gen)
    W = int(lengths.max()) + int(torch.randint(0, 4, (1,), generator=gen))
    cdfs = torch.zeros(T, W, dtype=torch.int32)
    M = 1 << precision
    for t in range(T):
        n = int(lengths[t]) - 1
        n = min(n, M)
        lengths[t] = n + 1
        w = torch.rand(n, generator=gen, dtype=torch.float64) ** 4 + 1e-6
        f = (w / w.sum() * (M - n)).floor().long() + 1
        f[torch.argmax(f)] += M - int(f.sum())
        cdfs[t, 1 : n + 1] = torch.cumsum(f, 0).int()
    offsets = torch.randint(-30, 30, (T,), generator=gen, dtype=torch.int32)
    return cdfs, lengths.int(), offsets


def random_symbols(gen, cdfs, lengths, offsets, shape, escapes=True):
    T = cdfs.shape[0]
    idx = torch.randint(0, T, shape, generator=gen, dtype=torch.int32)
    span = (lengths[idx.long()] - 1).long()
    sym = (torch.rand(shape, generator=gen) * span).long() + offsets[idx.long()].long()
    if escapes:
        r = torch.rand(shape, generator=gen)
        sym = torch.where(r < 0.05, sym + torch.randint(-300, 300, shape, generator=gen), sym)
        huge = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64)
        sym = torch.where(r > 0.98, huge, sym)
        sym = torch.where(r > 0.995, torch.full_like(sym, 2**31 - 1), sym)
        sym = torch.where((r > 0.99) & (r < 0.992), torch.full_like(sym, -(2**31)), sym)
    return sym.int(), idx


def gaussian_workload(gen, n_ch=64, h=48, w=32):
    """A 320 x 48 x 32 latent on CompressAI's Gaussian tables (built by compressai)."""
    from compressai.entropy_models import GaussianConditional
    from compressai.models.google import get_scale_table

    gc = GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    lo, hi = math.log(0.11), math.log(20.0)
    scales = torch.exp(torch.rand(1, n_ch, h, w, generator=gen) * (hi - lo) + lo)
    sym = torch.round(torch.randn(1, n_ch, h, w, generator=gen) * scales).int()
    idx = gc.build_indexes(scales).int()
    return sym, idx, gc._quantized_cdf.int(), gc._cdf_length.int(), gc._offset.int()


def ideal_bits(sym, idx, cdfs, lengths, offsets):
    """-sum log2 p under the tables, escapes charged at their bypass cost (as any coder must)."""
    t = idx.reshape(-1).long()
    v = sym.reshape(-1).long() - offsets[t].long()
    esc = lengths[t].long() - 2
    inside = (v >= 0) & (v < esc)
    vv = torch.where(inside, v, esc)
    freq = (cdfs[t, vv + 1] - cdfs[t, vv]).double()
    bits = (16 - torch.log2(freq)).sum().item()
    if (~inside).any():
        vo, eo = v[~inside], esc[~inside]
        raw = torch.where(vo < 0, -2 * vo - 1, 2 * (vo - eo))
        nb = torch.where(
            raw > 0, torch.floor(torch.log2(raw.double().clamp(min=1)) / 4) + 1, torch.zeros_like(raw.double())
        )
        bits += (4 * (nb + 1 + nb // 15)).sum().item()
    return bits


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), written independently of the C++ one it checks."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC32C[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def reseal_native(stream: bytes) -> bytes:
    """A native rANS stream with its CRC-32C (bytes 5..8, over bytes 9..end; FORMAT.md) recomputed,
    so that corrupted lane bytes get past the checksum and reach the lane decoders."""
    if len(stream) < 9:
        return stream
    return stream[:5] + struct.pack("<I", crc32c(stream[9:])) + stream[9:]


def hostile_variants(data, gen):
    """Damaged copies of a valid stream: header, truncation, bit flips, garbage, extra bytes."""
    b = bytes(data)
    n = len(b)
    yield "empty", b""
    yield "wrong magic", bytes([b[0] ^ 0xFF]) + b[1:]
    yield "wrong version", b[:2] + bytes([(b[2] + 1) & 0xFF]) + b[3:]
    yield "wrong precision", b[:3] + bytes([(b[3] % 16) + 1]) + b[4:]
    for _ in range(20):
        cut = int(torch.randint(0, n, (1,), generator=gen))
        yield f"truncated at {cut}", b[:cut]
    for _ in range(40):
        pos = int(torch.randint(0, n, (1,), generator=gen))
        c = bytearray(b)
        c[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        yield f"bit flip at {pos}", bytes(c)
    for _ in range(10):
        start = int(torch.randint(0, n, (1,), generator=gen))
        yield f"garbage from {start}", b[:start] + os.urandom(n - start)
    yield "trailing byte", b + b"\x00"
    yield "pure garbage", os.urandom(n)
