"""Make the fixed validation evaluation set (results/val24/) from the held-out split.

The validation split (python/gather_data.py) holds photos of 0.25-4 Mpx; evaluating every one of them
at every quality and against six classical codecs takes too long on a small machine, and a photo's size
changes its bpp. This picks ``--count`` of them evenly spread by name, downsizes each (Lanczos) so that
its short side is at most ``--short`` px and centre-crops its long side to at most ``--long`` px, so that
every picture is about Kodak's size (768x512).

  python python/make_eval_crops.py /work/data/pool/val /work/data/val24
  python -m dualres_ext eval /work/data/val24 --out results/val24 [--anchors results/val24/per_image.csv]

With the 59-photo split of docs/TRAINING.md this gives the 24 pictures of results/val24/.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from PIL import Image

from dualres_ext.tools.evaluation import IMAGE_EXTENSIONS  # what `eval` reads, so every crop made is evaluated


def pick_evenly(names: list[str], count: int) -> list[str]:
    """``count`` names spread over the sorted list, the first and (nearly) the last included:
    indices ceil(i * (n + 1) / count), i.e. every 2.5th of 59. Each index is capped so that the ones after
    it still fit (n - count + i), which keeps them distinct when count is close to n."""
    names = sorted(names)
    n = len(names)
    if count >= n:
        return names
    step = (n + 1) / count
    return [names[min(math.ceil(i * step), n - count + i)] for i in range(count)]


def eval_crop(img: Image.Image, short: int, long: int) -> Image.Image:
    """Downsize so that the short side is at most ``short``, then centre-crop the long side to ``long``."""
    img = img.convert("RGB")
    w, h = img.size
    s = short / min(w, h)
    if s < 1:
        img = img.resize((round(w * s), round(h * s)), Image.LANCZOS)
        w, h = img.size
    cw, ch = (min(w, long), h) if w >= h else (w, min(h, long))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="folder of validation photos (e.g. data/pool/val)")
    ap.add_argument("out", help="output folder for the PNG crops")
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--short", type=int, default=512, help="short side at most this (px)")
    ap.add_argument("--long", type=int, default=768, help="long side centre-cropped to at most this (px)")
    args = ap.parse_args(argv)
    if args.count < 1 or args.short < 64 or args.long < args.short:
        ap.error("need --count >= 1 and 64 <= --short <= --long")
    if not os.path.isdir(args.src):
        ap.error(f"no such folder: {args.src!r}")
    names = [n for n in os.listdir(args.src) if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        ap.error(f"no images in {args.src!r}")
    os.makedirs(args.out, exist_ok=True)
    picked = pick_evenly(names, args.count)
    for name in picked:
        crop = eval_crop(Image.open(os.path.join(args.src, name)), args.short, args.long)
        crop.save(os.path.join(args.out, os.path.splitext(name)[0] + ".png"))
    print(f"{len(picked)} of {len(names)} pictures -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
