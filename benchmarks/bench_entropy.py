"""Entropy models: dualres_ext vs CompressAI 1.2.8, side by side in one process.

Workload (the latent y of a 768x512 image in a 320-channel model): y of shape (1, 320, 48, 32) = 491,520 symbols, Gaussian around random means
with scales log-uniform in [0.11, 20]; hyperprior z of shape (1, 192, 12, 8) through an
EntropyBottleneck with trained-looking (perturbed) parameters.

    PYTHONPATH=src python benchmarks/bench_entropy.py [--repeat 15] [--threads N]

Prints a markdown table: best-of-`repeat` wall time per call (the machine is shared and noisy, so
the minimum is the honest estimate of each implementation's own cost), throughput and speed-up.
"""

import argparse
import math
import platform

import compressai.entropy_models as theirs
import torch
from compressai.models.google import get_scale_table

from dualres_ext import entropy_models as ours
from dualres_ext.tools.timing import best_ms


def ideal_bits(symbols, indexes, cdf, lengths, offsets, precision=16):
    """Information content of the symbols under the quantized CDFs (escaped symbols excluded)."""
    values = (symbols - offsets[indexes]).long()
    inside = (values >= 0) & (values < (lengths[indexes] - 2).long())
    idx, val = indexes[inside].long(), values[inside]
    freq = (cdf[idx, val + 1] - cdf[idx, val]).double()
    return float(-(freq / (1 << precision)).log2().sum()), int((~inside).sum())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shape = (1, 320, 48, 32)
    n = math.prod(shape)
    means = torch.randn(shape) * 2
    scales = torch.exp(torch.empty(shape).uniform_(math.log(0.11), math.log(20.0)))
    y = means + scales * torch.randn(shape)

    ref_gc = theirs.GaussianConditional(None)
    ref_gc.update_scale_table(get_scale_table())
    gc = ours.GaussianConditional(None)
    gc.load_state_dict(ref_gc.state_dict())
    gc_native = ours.GaussianConditional(None, lanes="auto")  # the interleaved stream
    gc_native.load_state_dict(ref_gc.state_dict())
    gc_multi = ours.GaussianConditional(None, lanes="multilane")
    gc_multi.load_state_dict(ref_gc.state_dict())

    rows = []

    def row(what, ref_ms, our_ms, symbols, note=""):
        rows.append((what, ref_ms, our_ms, symbols, note))

    # build_indexes
    indexes = ref_gc.build_indexes(scales)
    assert torch.equal(gc.build_indexes(scales), indexes)
    row(
        "GaussianConditional.build_indexes",
        best_ms(lambda: ref_gc.build_indexes(scales), args.repeat),
        best_ms(lambda: gc.build_indexes(scales), args.repeat),
        n,
    )

    # compress / decompress
    ref_strings = ref_gc.compress(y, indexes, means)
    strings = gc.compress(y, indexes, means)
    assert strings == ref_strings, "compat stream differs from CompressAI"
    native = gc_native.compress(y, indexes, means)
    multi = gc_multi.compress(y, indexes, means)
    ref_out = ref_gc.decompress(ref_strings, indexes, means=means)
    assert torch.equal(gc.decompress(strings, indexes, means=means), ref_out)
    assert torch.equal(gc_native.decompress(native, indexes, means=means), ref_out)
    assert torch.equal(gc_multi.decompress(multi, indexes, means=means), ref_out)

    ref_enc = best_ms(lambda: ref_gc.compress(y, indexes, means), args.repeat)
    ref_dec = best_ms(lambda: ref_gc.decompress(ref_strings, indexes, means=means), max(3, args.repeat // 3))
    row(
        "GaussianConditional.compress (compat)",
        ref_enc,
        best_ms(lambda: gc.compress(y, indexes, means), args.repeat),
        n,
    )
    row(
        "GaussianConditional.compress (native interleaved)",
        ref_enc,
        best_ms(lambda: gc_native.compress(y, indexes, means), args.repeat),
        n,
    )
    row(
        "GaussianConditional.compress (native multi-lane)",
        ref_enc,
        best_ms(lambda: gc_multi.compress(y, indexes, means), args.repeat),
        n,
    )
    row(
        "GaussianConditional.decompress (compat)",
        ref_dec,
        best_ms(lambda: gc.decompress(strings, indexes, means=means), args.repeat),
        n,
    )
    row(
        "GaussianConditional.decompress (native interleaved)",
        ref_dec,
        best_ms(lambda: gc_native.decompress(native, indexes, means=means), args.repeat),
        n,
    )
    row(
        "GaussianConditional.decompress (native multi-lane)",
        ref_dec,
        best_ms(lambda: gc_multi.decompress(multi, indexes, means=means), args.repeat),
        n,
    )

    # fused quantise + index (what a codec calls instead of build_indexes + quantize)
    row(
        "build_indexes + quantize(symbols) / fused quantize_and_index",
        best_ms(lambda: (ref_gc.build_indexes(scales), ref_gc.quantize(y, "symbols", means)), args.repeat),
        best_ms(lambda: gc.quantize_and_index(y, scales, means), args.repeat),
        n,
    )

    # EntropyBottleneck on z
    z_shape = (1, 192, 12, 8)
    ref_eb = theirs.EntropyBottleneck(192)
    with torch.no_grad():
        for p in ref_eb.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ref_eb.update(force=True)
    eb = ours.EntropyBottleneck(192)
    eb.load_state_dict(ref_eb.state_dict())
    eb_native = ours.EntropyBottleneck(192, lanes="auto")
    eb_native.load_state_dict(ref_eb.state_dict())
    z = torch.randn(z_shape) * 4
    zs = ref_eb.compress(z)
    assert eb.compress(z) == zs
    zn = eb_native.compress(z)
    assert torch.equal(eb.decompress(zs, z_shape[2:]), ref_eb.decompress(zs, z_shape[2:]))
    assert torch.equal(eb_native.decompress(zn, z_shape[2:]), ref_eb.decompress(zs, z_shape[2:]))
    zn_count = math.prod(z_shape)
    ref_zenc = best_ms(lambda: ref_eb.compress(z), args.repeat)
    ref_zdec = best_ms(lambda: ref_eb.decompress(zs, z_shape[2:]), args.repeat)
    row("EntropyBottleneck.compress (compat)", ref_zenc, best_ms(lambda: eb.compress(z), args.repeat), zn_count)
    row(
        "EntropyBottleneck.compress (native interleaved)",
        ref_zenc,
        best_ms(lambda: eb_native.compress(z), args.repeat),
        zn_count,
    )
    row(
        "EntropyBottleneck.decompress (compat)",
        ref_zdec,
        best_ms(lambda: eb.decompress(zs, z_shape[2:]), args.repeat),
        zn_count,
    )
    row(
        "EntropyBottleneck.decompress (native interleaved)",
        ref_zdec,
        best_ms(lambda: eb_native.decompress(zn, z_shape[2:]), args.repeat),
        zn_count,
    )

    # Training path: likelihood forward + backward (float32)
    yt = y.clone().requires_grad_()
    st = scales.clone().requires_grad_()
    mt = means.clone().requires_grad_()
    grad = torch.rand(shape)

    def train_step(model):
        _, lik = model(yt, st, mt, training=False)
        torch.autograd.grad(lik, (yt, st, mt), grad)

    row(
        "GaussianConditional forward+backward (float32)",
        best_ms(lambda: train_step(ref_gc), args.repeat),
        best_ms(lambda: train_step(gc), args.repeat),
        n,
    )

    # Sizes
    symbols = gc.quantize(y, "symbols", means)
    bits, escaped = ideal_bits(symbols.view(-1), indexes.view(-1), gc._quantized_cdf, gc._cdf_length, gc._offset)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()},"
        f" best of {args.repeat}"
    )
    print()
    print("| operation | CompressAI 1.2.8 (ms) | dualres_ext (ms) | dualres_ext Msym/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for what, ref_ms, our_ms, count, _ in rows:
        print(f"| {what} | {ref_ms:.3f} | {our_ms:.3f} | {count / our_ms / 1e3:.1f} | {ref_ms / our_ms:.1f}x |")
    print()
    print("| stream | bytes | bits/symbol | over ideal |")
    print("|---|---:|---:|---:|")
    print(f"| ideal (quantized CDFs, {escaped} escaped symbols excluded) | {bits / 8:.0f} | {bits / n:.4f} | - |")
    for name, s in (
        ("CompressAI / ours compat", strings[0]),
        ("ours native interleaved", native[0]),
        ("ours native multi-lane", multi[0]),
    ):
        print(f"| {name} | {len(s)} | {8 * len(s) / n:.4f} | {100 * (8 * len(s) / bits - 1):+.2f}% |")


if __name__ == "__main__":
    main()
