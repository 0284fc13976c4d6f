"""Turn a training checkpoint (python/train.py's last.pt / best.pt) into the package's weights file.

  python python/export_weights.py runs/compact/best.pt src/dualres_ext/weights/dualres_compact.pt

The weights file (float16, CDF tables left out: they are rebuilt at load time) records the
training command, steps, data and validation figures, and the lineage (every run's command and
every widening the checkpoint's history holds), so the shipped weights say how they were made.
"""

from __future__ import annotations

import argparse
import os
import sys

from dualres_ext.models import build
from dualres_ext.models.zoo import save_weights
from dualres_ext.training import checkpoint_config, load_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("output")
    ap.add_argument(
        "--data",
        default="python/gather_data.py pool (see docs/TRAINING.md)",
        help="a description of the training data, stored in the metadata",
    )
    args = ap.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    model = build(ckpt["model_name"], **checkpoint_config(ckpt))
    model.load_state_dict(ckpt["state_dict"])
    history = ckpt.get("history", [])
    # Weights that are train.py's weight average (--ema) carry the average's validation figures.
    averaged = ckpt.get("weights") == "average"
    val_key = "val_ema" if averaged else "val"
    vals = [h[val_key] for h in history if val_key in h]
    metadata = {
        "training_command": ckpt.get("command"),
        "steps": ckpt["step"],
        "crop": ckpt["args"].get("crop"),
        "batch": ckpt["args"].get("batch"),
        "lr": ckpt["args"].get("lr"),
        "training_images": ckpt.get("train_images"),
        "data": args.data,
        "validation": vals[-1] if vals else None,
        "weights": f"average of the trained weights (decay {ckpt.get('ema_decay')})" if averaged else "trained",
        "source_checkpoint": os.path.basename(args.checkpoint),
        # Every run and widening that led here, in order (the runs' commands, from the step each
        # started at): a model trained over several runs is more than its last command.
        "lineage": [{k: h[k] for k in ("step", "command", "widened") if k in h} for h in history if "command" in h],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_weights(model, args.output, metadata=metadata, half=True)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB) from step {ckpt['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
