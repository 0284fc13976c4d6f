"""Seed corpus for fuzz/fuzz_rans_decode.cpp: valid streams made by the library's own encoders.

Usage: PYTHONPATH=src python fuzz/make_corpus.py OUT_DIR

Each file is an input in the harness layout (see the comment at the top of fuzz_rans_decode.cpp):
a 10-byte head, the tables, then a stream the ops encoded for exactly the indexes the harness
derives from the seed. Small on purpose (a few hundred symbols): libFuzzer mutates short inputs
far faster, and the interesting code (header, lane table, escapes, lane ends) is all there.
"""

import os
import struct
import sys

import torch

from dualres_ext import ops
from dualres_ext.ops import rans_interleaved

MODES = {"native": 0, "compat": 1, "compat_chunked": 2, "roundtrip": 3, "large": 4, "iv": 5, "iv_roundtrip": 6}


def harness_indexes(seed: int, n: int, tables: int) -> torch.Tensor:
    """The harness's index rule: an LCG, (state >> 16) % T."""
    out, s = [], seed
    for _ in range(n):
        s = (s * 1664525 + 1013904223) & 0xFFFFFFFF
        out.append((s >> 16) % tables)
    return torch.tensor(out, dtype=torch.int32)


def pack(mode, flags, seed, cdfs, lengths, offsets, stream, n):
    T, W = cdfs.shape
    assert 1 <= T <= 16 and 1 <= W <= 64 and n < 1 << 16
    head = struct.pack("<BBBBHI", MODES[mode], T - 1, W - 1, flags, n, seed)
    body = b"".join(t.to(torch.int32).contiguous().numpy().tobytes() for t in (cdfs, lengths, offsets))
    return head + body + stream


def symbols_for(gen, indexes, offsets, lengths, escape_rate):
    """Mostly in-table values, some escapes (both signs, short and long bypass runs)."""
    span = (lengths[indexes.long()] - 2).clamp(min=1)
    sym = (torch.rand(indexes.shape, generator=gen) * span).long() + offsets[indexes.long()]
    esc = torch.rand(indexes.shape, generator=gen) < escape_rate
    big = torch.randint(-(2**31), 2**31 - 1, indexes.shape, generator=gen)
    small = torch.randint(-40, 40, indexes.shape, generator=gen) + offsets[indexes.long()]
    sym = torch.where(esc, torch.where(torch.rand(indexes.shape, generator=gen) < 0.3, big, small), sym)
    return sym.clamp(-(2**31), 2**31 - 1).to(torch.int32)


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    table_sets = {
        "p16": ops.gaussian_cdf_tables(torch.tensor([0.11, 0.5, 1.0, 2.0, 4.0]), precision=16),
        "p12": ops.gaussian_cdf_tables(torch.tensor([0.3, 1.0, 3.0]), precision=12),
        "p6": ops.gaussian_cdf_tables(torch.tensor([0.2, 0.6]), precision=6),
    }
    count = 0
    for name, (cdfs, lengths, offsets) in table_sets.items():
        T = cdfs.shape[0]
        for n in (0, 1, 7, 300):
            for escape_rate in (0.0, 0.05):
                seed = int(torch.randint(0, 2**32 - 1, (1,), generator=gen))
                idx = harness_indexes(seed, n, T)
                sym = symbols_for(gen, idx, offsets, lengths, escape_rate)
                lane_choices = (None, 3) if n >= 3 else (None,)
                for lanes in lane_choices:
                    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=lanes)
                    assert torch.equal(ops.rans_decode(data, idx, cdfs, lengths, offsets), sym)
                    blob = pack("native", 0, seed, cdfs, lengths, offsets, data, n)
                    open(os.path.join(out_dir, f"native_{name}_n{n}_e{escape_rate}_l{lanes}"), "wb").write(blob)
                    count += 1
                if name == "p16" and n > 0:
                    small = sym.clamp(-(2**29), 2**29)
                    data = ops.rans_encode_compat(small, idx, cdfs, lengths, offsets)
                    for mode, flags in (("compat", 0), ("compat_chunked", 5)):
                        blob = pack(mode, flags, seed, cdfs, lengths, offsets, data, n)
                        open(os.path.join(out_dir, f"{mode}_{name}_n{n}_e{escape_rate}"), "wb").write(blob)
                        count += 1
                # Interleaved streams: widths, groups, split points (flags of mode 6 pick the same).
                for width, groups, chained in ((1, 1, False), (4, 2, True), (16, 3, False), (32, 1, False)):
                    data = rans_interleaved.encode(
                        sym, idx, cdfs, lengths, offsets, width=width, groups=groups, chained=chained
                    )
                    tag = f"{name}_n{n}_e{escape_rate}_w{width}_g{groups}{'c' if chained else ''}"
                    open(os.path.join(out_dir, f"iv_{tag}"), "wb").write(
                        pack("iv", 0, seed, cdfs, lengths, offsets, data, n)
                    )
                    flags = (width.bit_length() - 1) | (groups - 1) << 3 | (0x40 if chained else 0)
                    open(os.path.join(out_dir, f"iv_roundtrip_{tag}"), "wb").write(
                        pack("iv_roundtrip", flags, seed, cdfs, lengths, offsets, sym.numpy().tobytes(), n)
                    )
                    count += 2
                # Round trip seeds: the symbols themselves are the payload.
                blob = pack("roundtrip", 0, seed, cdfs, lengths, offsets, sym.numpy().tobytes(), n)
                open(os.path.join(out_dir, f"roundtrip_{name}_n{n}_e{escape_rate}"), "wb").write(blob)
                count += 1
        # Large low-entropy round trips (8 * n symbols; the low nibble of flags sets how often a
        # stream byte replaces table entry 0): around the lane-reduction thresholds.
        for n, flags in ((3000, 1), (24576, 1), (24576, 3), (65535, 2)):
            noise = torch.randint(0, 256, (64,), generator=gen, dtype=torch.uint8).numpy().tobytes()
            seed = int(torch.randint(0, 2**32 - 1, (1,), generator=gen))
            blob = pack("large", flags, seed, cdfs, lengths, offsets, noise, n)
            open(os.path.join(out_dir, f"large_{name}_n{n}_f{flags}"), "wb").write(blob)
            count += 1
    print(f"wrote {count} seed inputs to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/build/seeds")
