"""Give a trained DualRes a wider analysis or synthesis, or the per-quality channel modulation,
and keep training it (dualres_ext.models.widen).

  python python/widen_model.py runs/compact/last.pt runs/wide/last.pt --N_s 96 --N1_s 48
  python python/widen_model.py runs/wide/last.pt runs/wide2/last.pt --N 128 --N1 48
  python python/widen_model.py runs/wide2/last.pt runs/mod/last.pt --modulation
  python python/train.py ... --out runs/wide2          # resumes the widened checkpoint

IN is a training checkpoint (python/train.py's last.pt / best.pt) or a weights file
(codec.save_weights). A checkpoint comes out as a checkpoint that train.py resumes: its step
count, history and Adam moments are kept, the moments widened with their parameters (new
entries: first moment 0, second moment the mean of the old tensor's, so that Adam's first steps
on a new weight are about the lr, not the bias-corrected jolt of an empty estimate; the
modulation's tables get their own parameter group, with no moments yet). A weights
file comes out as a weights file (for train.py --init or for decoding). The widened model
decodes to the same pictures; the script checks that before writing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from dualres_ext.models import build
from dualres_ext.models.widen import WIDTH_KEYS, add_modulation, widen, widen_tensor
from dualres_ext.models.zoo import WEIGHTS_FORMAT, load_weights, save_weights
from dualres_ext.training import checkpoint_config, is_checkpoint, parameter_groups, save_checkpoint


def widen_adam_state(opt_state: dict, old_model, new_model) -> dict:
    """The main optimiser's state_dict with each moment widened like its parameter."""
    # The optimiser's indices follow training.parameter_groups' main list.
    main = {id(p) for p in parameter_groups(old_model)[0]}
    old_names = [n for n, p in old_model.named_parameters() if id(p) in main]
    state = {}
    for idx, entry in opt_state["state"].items():
        name = old_names[int(idx)]
        new_shape = new_model.get_parameter(name).shape
        entry = dict(entry)
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry and tuple(entry[key].shape) != tuple(new_shape):
                old = entry[key]
                template = (
                    torch.zeros(new_shape, dtype=old.dtype)
                    if key == "exp_avg"
                    else torch.full(new_shape, float(old.mean()), dtype=old.dtype)
                )
                entry[key] = widen_tensor(name, old, template, old_model.config, new_model.config)
        state[idx] = entry
    groups = [dict(g) for g in opt_state["param_groups"]]
    if new_model.modulation is not None and old_model.modulation is None:
        # training.optimizer_groups' layout: the modulation's parameters, the model's last, apart.
        n_old = len(old_names)
        n_new = len(parameter_groups(new_model)[0])
        assert len(groups) == 1 and groups[0]["params"] == list(range(n_old)), "unexpected optimiser layout"
        groups = [dict(groups[0], name="main"), dict(groups[0], name="modulation", params=list(range(n_old, n_new)))]
    return {"state": state, "param_groups": groups}


def widths(model) -> dict:
    """The widths and whether the model has the quality modulation (what this script can change)."""
    return {**{k: model.config[k] for k in WIDTH_KEYS}, "modulation": bool(model.config.get("modulation"))}


def grow(model, requested: dict, modulation: bool, generator, source: str):
    if modulation and model.modulation is not None:
        raise SystemExit(f"{source} already has the quality modulation")
    if any(v is not None for v in requested.values()):
        model = widen(model, generator=generator, **requested)
    return add_modulation(model) if modulation else model


def check_same_pictures(old_model, new_model) -> float:
    """Largest |x_hat difference| of the two models on a random picture at three qualities."""
    old_model, new_model = old_model.eval(), new_model.eval()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        for q in (0, (old_model.num_qualities - 1) / 2, old_model.num_qualities - 1):
            worst = max(worst, float((old_model(x, q)["x_hat"] - new_model(x, q)["x_hat"]).abs().max()))
    if worst > 1e-4:
        raise SystemExit(f"the widened model's pictures differ by {worst:.3g}: not writing it")
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="a train.py checkpoint or a weights file")
    ap.add_argument("output")
    ap.add_argument("--N", type=int, default=None, help="analysis width at strides 4 to 16")
    ap.add_argument("--N1", type=int, default=None, help="analysis width at stride 2")
    ap.add_argument("--k1", type=int, default=None, help="kernel of the analysis' stride-2 to stride-4 layer (3 or 5)")
    ap.add_argument("--N_s", type=int, default=None, help="synthesis width at strides 16 to 4")
    ap.add_argument("--N1_s", type=int, default=None, help="synthesis width at stride 2")
    ap.add_argument("--k1_s", type=int, default=None, help="kernel of the stride-4 to stride-2 layer (3 or 5)")
    ap.add_argument(
        "--modulation", action="store_true", help="add the per-quality channel modulation (at the identity)"
    )
    ap.add_argument("--seed", type=int, default=0, help="initialisation of the new channels")
    args = ap.parse_args(argv)
    if os.path.exists(args.output):
        raise SystemExit(f"{args.output} exists (not overwriting)")

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)  # as train.py records its runs
    requested = {k: getattr(args, k) for k in WIDTH_KEYS}
    if all(v is None for v in requested.values()) and not args.modulation:
        raise SystemExit(
            "nothing to do: give at least one of " + ", ".join("--" + k for k in WIDTH_KEYS) + " or --modulation"
        )
    try:
        raw = torch.load(args.input, map_location="cpu", weights_only=False)
    except Exception as e:  # not a torch file at all (an image, a truncated download, ...)
        raise SystemExit(
            f"{args.input}: neither a train.py checkpoint nor a DualRes weights file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        )
    generator = torch.Generator().manual_seed(args.seed)
    if isinstance(raw, dict) and raw.get("format") == WEIGHTS_FORMAT:
        old = load_weights(args.input)
        new = grow(old, requested, args.modulation, generator, args.input)
        new.update(force=True)
        worst = check_same_pictures(old, new)
        metadata = dict(old.metadata)
        # One record of the widening, the same entry a checkpoint's history gets (below), which
        # export_weights turns into the weights' lineage: `python -m dualres_ext weights` prints it.
        metadata["lineage"] = list(metadata.get("lineage") or []) + [
            {"step": metadata.get("steps"), "widened": widths(new), "command": command}
        ]
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        save_weights(new, args.output, metadata=metadata, half=True)
    elif is_checkpoint(raw):
        old = build(raw["model_name"], **checkpoint_config(raw))
        old.load_state_dict(raw["state_dict"])
        new = grow(old, requested, args.modulation, generator, args.input)
        old.update(force=True)
        new.update(force=True)
        worst = check_same_pictures(old, new)
        out = dict(raw)
        out["config"] = dict(new.config)
        out["state_dict"] = new.train().state_dict()
        out["optimizer"] = widen_adam_state(raw["optimizer"], old, new)
        out["history"] = list(raw.get("history", [])) + [
            {"step": raw["step"], "widened": widths(new), "command": command}
        ]
        # The validation loss of the old model is the widened one's too (same pictures).
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        save_checkpoint(args.output, out)
    else:
        raise SystemExit(f"{args.input}: neither a train.py checkpoint nor a DualRes weights file")
    before, after = widths(old), widths(new)
    print(
        f"wrote {args.output}: "
        + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in after if after[k] != before[k])
        + f", {sum(p.numel() for p in new.parameters()) / 1e6:.2f} M parameters; pictures equal to {worst:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
