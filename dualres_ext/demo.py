"""``python -m dualres_ext demo``: the rANS coder on the DESIGN.md latent workload (no CompressAI needed).

Builds CompressAI-style quantised Gaussian tables, codes a (1, 320, 48, 32) latent with the native
multi-lane stream and the CompressAI-compatible stream, checks the round trips and prints
throughput, size and lane count.
"""
from __future__ import annotations


def _gaussian_tables(scale_table, tail_mass=1e-9, precision=16):
    """CompressAI-style quantised Gaussian CDF tables (one row per scale; escape entry last)."""
    import torch

    multiplier = -float(torch.special.ndtri(torch.tensor(tail_mass / 2, dtype=torch.float64)))
    centers = torch.ceil(scale_table.double() * multiplier).long()
    lengths = 2 * centers + 2  # pmf entries + the escape entry, as cdf_length - 1
    width = int(lengths.max()) + 1
    M = 1 << precision
    cdfs = torch.zeros(len(scale_table), width, dtype=torch.int32)
    for t, (s, c, n) in enumerate(zip(scale_table.double(), centers, lengths)):
        v = torch.arange(-int(c), int(c) + 1, dtype=torch.float64).abs()
        pmf = torch.special.ndtr((0.5 - v) / s) - torch.special.ndtr((-0.5 - v) / s)
        p = torch.cat([pmf, (1 - pmf.sum()).clamp(min=0).reshape(1)])
        f = torch.floor(p * (M - int(n))).long() + 1  # every entry codable
        f[torch.argmax(f)] += M - int(f.sum())
        cdfs[t, 1 : int(n) + 1] = torch.cumsum(f, 0).int()
    return cdfs, (lengths + 1).int(), (-centers).int()


def run(repeat: int = 5, seed: int = 0) -> int:
    """Encode and decode the DESIGN.md latent workload with the native multi-lane rANS coder."""
    import math
    import time

    import torch

    import dualres_ext
    from dualres_ext import ops

    print(f"dualres_ext {dualres_ext.__version__}: {dualres_ext.build_info()}")
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 320, 48, 32)  # y of a 768x512 image
    scale_table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
    cdfs, lengths, offsets = _gaussian_tables(scale_table)
    lo, hi = math.log(0.11), math.log(20.0)
    scales = torch.exp(torch.rand(shape, generator=gen) * (hi - lo) + lo)
    symbols = torch.round(torch.randn(shape, generator=gen) * scales).int()
    indexes = torch.bucketize(scales, scale_table).clamp(max=len(scale_table) - 1).int()
    n = symbols.numel()

    def best(fn, repeat=repeat):
        out, t = None, float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            t = min(t, time.perf_counter() - t0)
        return t, out

    # Ideal size under the tables, to show what the lanes cost.
    t_idx = indexes.reshape(-1).long()
    v = (symbols.reshape(-1) - offsets[t_idx]).long()
    inside = (v >= 0) & (v < lengths[t_idx].long() - 2)
    vv = torch.where(inside, v, lengths[t_idx].long() - 2)
    ideal = float((16 - torch.log2((cdfs[t_idx, vv + 1] - cdfs[t_idx, vv]).double())).sum()) / n

    print(f"workload: {n} Gaussian symbols {tuple(shape)}, scales log-uniform in [0.11, 20], "
          f"64 tables, {torch.get_num_threads()} threads, best of {repeat}")
    print(f"{'coder':<28}{'encode Msym/s':>15}{'decode Msym/s':>15}{'bits/sym':>10}{'vs ideal':>10}  lanes")
    for name, lanes in (("native, encoder's lanes", None), ("native, 1 lane", 1)):
        te, data = best(lambda: ops.rans_encode(symbols, indexes, cdfs, lengths, offsets, lanes=lanes))
        td, out = best(lambda: ops.rans_decode(data, indexes, cdfs, lengths, offsets))
        assert torch.equal(out, symbols), "round trip failed"
        bits = len(data) * 8 / n
        n_lanes = _native_lanes(data)
        print(f"{name:<28}{n / te / 1e6:>15.1f}{n / td / 1e6:>15.1f}{bits:>10.4f}{100 * (bits / ideal - 1):>+9.2f}%  {n_lanes}")
    te, data = best(lambda: ops.rans_encode_compat(symbols, indexes, cdfs, lengths, offsets))
    td, out = best(lambda: ops.rans_decode_compat(data, indexes, cdfs, lengths, offsets))
    assert torch.equal(out, symbols), "round trip failed"
    bits = len(data) * 8 / n
    print(f"{'CompressAI-compatible':<28}{n / te / 1e6:>15.1f}{n / td / 1e6:>15.1f}{bits:>10.4f}"
          f"{100 * (bits / ideal - 1):>+9.2f}%  -")
    print(f"ideal (-sum log2 p under the tables): {ideal:.4f} bits/symbol; all round trips exact")
    return 0


def _native_lanes(data: bytes) -> int:
    """Lane count from a native stream header (csrc/rans/FORMAT.md)."""
    pos, values = 9, []
    for _ in range(2):
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append(value)
    return values[1]
