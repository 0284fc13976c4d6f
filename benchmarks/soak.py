"""Soak and peak-memory checks for the codec (not a test: run by hand, prints a report).

PYTHONPATH=src python benchmarks/soak.py soak [--rounds 1000] [--size 64]
    many small encode/decode round trips with one random-init compact model: prints RSS
    every 10% of the run; memory must plateau (no growth after warm-up).
PYTHONPATH=src python benchmarks/soak.py big [--width 4000 --height 3000]
    one encode + decode of a large image; prints the process's peak RSS after each step.
    Run under /usr/bin/time -v for an independent peak figure.
"""

import argparse
import resource
import time

import torch

from dualres_ext import codec
from dualres_ext.models import build


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def model():
    torch.manual_seed(0)
    m = build("compact").eval()
    m.update(force=True)
    return m


def image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (torch.stack([xx, yy, 1 - xx * yy]) * 0.6 + 0.4 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


def soak(rounds, size):
    m = model()
    imgs = [image(size + 16 * (i % 3), size, i) for i in range(8)]
    print("| round | RSS MiB | peak RSS MiB |\n|---|---|---|")
    t0 = time.perf_counter()
    samples = []
    for r in range(rounds):
        img = imgs[r % len(imgs)]
        s = codec.encode(img, quality=r % m.num_qualities, weights=m)
        out = codec.decode(s, weights=m, output="tensor")
        assert out.shape == img.shape
        if r % max(1, rounds // 10) == 0 or r == rounds - 1:
            samples.append(rss_mib())
            print(f"| {r} | {samples[-1]:.0f} | {peak_mib():.0f} |", flush=True)
    dt = time.perf_counter() - t0
    half = samples[len(samples) // 2]
    print(
        f"\n{rounds} round trips of ~{size}x{size} in {dt:.1f} s; RSS at half-way {half:.0f} MiB, "
        f"at the end {samples[-1]:.0f} MiB (growth {samples[-1] - half:+.0f} MiB); peak {peak_mib():.0f} MiB"
    )


def big(width, height):
    m = model()
    print(f"after model build: RSS {rss_mib():.0f} MiB, peak {peak_mib():.0f} MiB", flush=True)
    img = (image(height, width, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    print(f"image {width}x{height}: RSS {rss_mib():.0f} MiB, peak {peak_mib():.0f} MiB", flush=True)
    t0 = time.perf_counter()
    s = codec.encode(img, quality=3, weights=m)
    t1 = time.perf_counter()
    print(f"encode {t1 - t0:.1f} s, {len(s)} bytes: RSS {rss_mib():.0f} MiB, peak {peak_mib():.0f} MiB", flush=True)
    out = codec.decode(s, weights=m, output="numpy")
    t2 = time.perf_counter()
    assert out.shape == img.shape
    print(f"decode {t2 - t1:.1f} s: RSS {rss_mib():.0f} MiB, peak {peak_mib():.0f} MiB", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["soak", "big"])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    a = p.parse_args()
    soak(a.rounds, a.size) if a.what == "soak" else big(a.width, a.height)
