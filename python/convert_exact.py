"""Add exact (integer) entropy-parameter networks to a DualRes weights file (bitstream versions 4, 5).

Post-training conversion (src/dualres_ext/models/exact.py): the float weights stay as they are;
activation ranges are calibrated on training pictures (never on the evaluation sets), then every
network between the decoded symbols and (scale index, mean) gets integer weights, grids, bounds
and tables, stored in the output weights file (its weights id covers them).

  python python/convert_exact.py TRAIN_FOLDER --weights IN.pt --out OUT.pt [--images 16]

Check the rate on the evaluation sets (python -m dualres_ext eval ... --weights OUT.pt) before
shipping the result.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import torch
from PIL import Image

from dualres_ext.models import get_scale_table
from dualres_ext.models.exact import DEFAULTS, calibrate, convert
from dualres_ext.models.zoo import DEFAULT_WEIGHTS, load_weights, save_weights, weights_id


def calibration_images(folder: str, count: int, size: int):
    """``count`` pictures of ``folder`` (recursively, sorted, evenly spread), centre crops of
    ``size`` x ``size`` (multiples of 64), as (1, 3, H, W) tensors in [0, 1]."""
    files = sorted(
        p
        for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
        if p.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    if not files:
        raise SystemExit(f"no pictures under {folder}")
    picks = [files[int(i * len(files) / count)] for i in range(min(count, len(files)))]
    out = []
    for path in picks:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        side = min(size, (min(w, h) // 64) * 64)
        left, top = (w - side) // 2, (h - side) // 2
        arr = np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous())
    return out, picks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="training pictures for the calibration (not an evaluation set)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="input weights file (default: the shipped one)")
    ap.add_argument("--out", required=True, help="output weights file")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument(
        "--stats",
        default=None,
        help="calibration ranges: read if the file exists (e.g. the OUT/qat_stats.pt of a train.py --qat "
        "run, whose grids the training rounded to), else calibrated and written there",
    )
    for key, value in DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = ap.parse_args(argv)

    model = load_weights(args.weights)
    model.exact = None
    if args.stats and os.path.isfile(args.stats):
        # e.g. a --qat run's OUT/qat_stats.pt: the grids that training rounded to
        stats = torch.load(args.stats, weights_only=True)
        calibration = {"stats_file": os.path.basename(args.stats)}
    else:
        images, picks = calibration_images(args.folder, args.images, args.size)
        stats = calibrate(model, images, list(range(model.num_qualities)))
        if args.stats:
            torch.save(stats, args.stats)
        calibration = {"calibration": [os.path.basename(p) for p in picks], "size": args.size}
    options = {key: getattr(args, key) for key in DEFAULTS}
    model.exact = convert(model, stats, get_scale_table(), **options)
    metadata = dict(getattr(model, "metadata", {}) or {})
    metadata["exact"] = {**calibration, **options}
    save_weights(model, args.out, metadata=metadata)
    check = load_weights(args.out)
    print(
        f"{args.out}: weights id {weights_id(check):08x}, float-only id {weights_id(check, float_only=True):08x} "
        f"(input {weights_id(load_weights(args.weights), float_only=True):08x})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
