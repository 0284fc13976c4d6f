"""``python -m dualres_ext bench-rans``: the rANS coder on a typical latent (no CompressAI needed).

The workload is the latent ``y`` of a 768x512 image in a 320-channel model: (1, 320, 48, 32) =
491,520 integer symbols, each drawn from a zero-mean Gaussian of its own scale (log-uniform in
[0.11, 20]) and rounded, coded with 64 CompressAI-style
quantised Gaussian tables (``ops.gaussian_cdf_tables`` over scales 0.11 .. 256), each symbol with
the table of its scale. It codes the latent with the native multi-lane stream (the encoder's
lane count and one lane) and with the CompressAI-compatible stream, checks every round trip and
prints throughput, bits per symbol against the ideal under the tables, and the lane count.
"""

from __future__ import annotations

import math

import torch

from .. import __version__, build_info, ops
from .timing import best_time


def run(repeat: int = 5, seed: int = 0) -> int:
    """Encode and decode the workload above, best of ``repeat`` timings; returns 0 (an exit code)."""
    print(f"dualres_ext {__version__}: {build_info()}")
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 320, 48, 32)  # y of a 768x512 image
    scale_table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
    cdfs, lengths, offsets = ops.gaussian_cdf_tables(scale_table)
    lo, hi = math.log(0.11), math.log(20.0)
    scales = torch.exp(torch.rand(shape, generator=gen) * (hi - lo) + lo)
    symbols = torch.round(torch.randn(shape, generator=gen) * scales).int()
    indexes = torch.bucketize(scales, scale_table).clamp(max=len(scale_table) - 1).int()
    n = symbols.numel()

    def best(fn):
        return best_time(fn, repeat)

    # Ideal size under the tables, to show what the lanes cost.
    t_idx = indexes.reshape(-1).long()
    v = (symbols.reshape(-1) - offsets[t_idx]).long()
    inside = (v >= 0) & (v < lengths[t_idx].long() - 2)
    vv = torch.where(inside, v, lengths[t_idx].long() - 2)
    ideal = float((16 - torch.log2((cdfs[t_idx, vv + 1] - cdfs[t_idx, vv]).double())).sum()) / n

    print(
        f"workload: {n} Gaussian symbols {tuple(shape)}, scales log-uniform in [0.11, 20], "
        f"64 tables, {torch.get_num_threads()} threads, best of {repeat}"
    )
    print(f"{'coder':<28}{'encode Msym/s':>15}{'decode Msym/s':>15}{'bits/sym':>10}{'vs ideal':>10}  lanes")
    for name, lanes in (("native, encoder's lanes", None), ("native, 1 lane", 1)):
        te, data = best(lambda: ops.rans_encode(symbols, indexes, cdfs, lengths, offsets, lanes=lanes))
        td, out = best(lambda: ops.rans_decode(data, indexes, cdfs, lengths, offsets))
        assert torch.equal(out, symbols), "round trip failed"
        bits = len(data) * 8 / n
        n_lanes = ops.rans_stream_info(data)["lanes"]
        print(
            f"{name:<28}{n / te / 1e6:>15.1f}{n / td / 1e6:>15.1f}{bits:>10.4f}{100 * (bits / ideal - 1):>+9.2f}%  {n_lanes}"
        )
    te, data = best(lambda: ops.rans_encode_compat(symbols, indexes, cdfs, lengths, offsets))
    td, out = best(lambda: ops.rans_decode_compat(data, indexes, cdfs, lengths, offsets))
    assert torch.equal(out, symbols), "round trip failed"
    bits = len(data) * 8 / n
    print(
        f"{'CompressAI-compatible':<28}{n / te / 1e6:>15.1f}{n / td / 1e6:>15.1f}{bits:>10.4f}"
        f"{100 * (bits / ideal - 1):>+9.2f}%  -"
    )
    print(f"ideal (-sum log2 p under the tables): {ideal:.4f} bits/symbol; all round trips exact")
    return 0
