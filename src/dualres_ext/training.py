"""What the training scripts (``python/train.py``, ``widen_model.py``, ``export_weights.py``) share:
the training-checkpoint format, the optimisers' parameter groups, the weight average (EMA) and
the validation loss (the rate-distortion loss of :mod:`dualres_ext.models.loss`).

A training checkpoint is a ``torch.save``'d dict (pickled: load it only from files you trust):

* ``model_name``, ``config``: what ``dualres_ext.models.build(model_name, **config)`` rebuilds
  (``config`` may be missing in old checkpoints: :func:`checkpoint_config` recovers it);
* ``state_dict``: the model's weights (float32, CDF tables included); ``weights``: ``"trained"``
  or ``"average"`` (then ``state_dict`` holds the weight average, see :class:`WeightAverage`);
* ``ema_state_dict``, ``ema_decay``: the weight average and its decay (None without one);
* ``optimizer``, ``aux_optimizer``: the Adam states of the main parameters (in the groups of
  :func:`optimizer_groups`) and of the auxiliary ones (the factorized prior's quantiles);
* ``step``, ``best_val`` (lowest validation loss so far), ``history`` (a list of dicts: log
  lines, validations, each run's ``command`` and each widening, in order), ``command``, ``args``
  (the training script's options), ``train_images``.
"""

from __future__ import annotations

import copy
import math
import os
from typing import List, Optional, Tuple

import torch

from .models.loss import rate_distortion
from .models.widen import synthesis_widths

MODULATION_PREFIX = "modulation."


def save_checkpoint(path: str, state: dict) -> None:
    """Write a checkpoint atomically: a process killed while saving leaves the previous file whole."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint` (any pickled dict: trusted files only)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def is_checkpoint(obj) -> bool:
    """Whether a loaded object is a training checkpoint (rather than, e.g., a weights file)."""
    return isinstance(obj, dict) and "optimizer" in obj and "model_name" in obj


def checkpoint_config(ckpt: dict) -> dict:
    """The configuration a checkpoint was trained with. Checkpoints without a ``config`` entry
    record only their synthesis widths, in their shapes (``models.widen.synthesis_widths``); a
    configuration without ``modulation`` predates the option and has none."""
    config = dict(ckpt["config"]) if "config" in ckpt else synthesis_widths(ckpt["state_dict"])
    config.setdefault("modulation", False)
    return config


def is_auxiliary(name: str) -> bool:
    """The factorized prior's quantiles: trained by the auxiliary loss only."""
    return name.endswith(".quantiles")


def parameter_groups(model: torch.nn.Module) -> Tuple[List[torch.nn.Parameter], List[torch.nn.Parameter]]:
    """``(main, auxiliary)`` trainable parameters, each in ``named_parameters`` order. The main
    list's order is the one the main optimiser's saved state is indexed by."""
    main = [p for n, p in model.named_parameters() if not is_auxiliary(n) and p.requires_grad]
    aux = [p for n, p in model.named_parameters() if is_auxiliary(n) and p.requires_grad]
    return main, aux


def optimizer_groups(model: torch.nn.Module) -> list:
    """The main optimiser's parameter groups: everything (``"main"``), and (if the model has it)
    the quality modulation apart (``"modulation"``, whose lr the training script scales). The
    modulation's parameters are the model's last, so the global order -- which the saved
    optimiser state is indexed by -- is :func:`parameter_groups`' either way."""
    named = [(n, p) for n, p in model.named_parameters() if not is_auxiliary(n) and p.requires_grad]
    groups = [{"params": [p for n, p in named if not n.startswith(MODULATION_PREFIX)], "name": "main"}]
    modulation = [p for n, p in named if n.startswith(MODULATION_PREFIX)]
    if modulation:
        groups.append({"params": modulation, "name": "modulation"})
    return groups


class WeightAverage:
    """An exponential moving average of a model's parameters: after each optimiser step
    avg <- decay * avg + (1 - decay) * weights, so it spans about 1 / (1 - decay) steps. It is a
    copy of the model (buffers included, taken from the trained model before each use), so it is
    validated and saved like one."""

    def __init__(self, model: torch.nn.Module, decay: float, state: Optional[dict] = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie strictly between 0 and 1, got {decay}")
        self.decay = decay
        self.source = model
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        if state is not None:
            self.model.load_state_dict(state)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the source model's current parameters (once per step)."""
        for avg, w in zip(self.model.parameters(), self.source.parameters()):
            avg.lerp_(w, 1.0 - self.decay)

    @torch.no_grad()
    def averaged(self) -> torch.nn.Module:
        """The averaged model, its buffers (nothing that training changes) the source's."""
        for avg, b in zip(self.model.buffers(), self.source.buffers()):
            avg.copy_(b)
        return self.model


@torch.no_grad()
def validate(model: torch.nn.Module, val_images: List[torch.Tensor], device) -> dict:
    """The rate-distortion loss (:func:`dualres_ext.models.loss.rate_distortion`) of ``model`` on
    fixed validation crops (uint8 (3, H, W) tensors), at every quality with its own lambda:
    ``{"loss": mean over qualities, "per_quality": [{"loss", "bpp", "psnr"}, ...]}``, each
    averaged over the crops. The model is evaluated in eval mode and left in training mode."""
    model.eval()
    per_q = []
    for q, lmbda in enumerate(model.lambdas):
        tot = {"loss": 0.0, "bpp": 0.0, "psnr": 0.0}
        for img in val_images:
            x = img[None].float().div(255).to(device)
            rd = rate_distortion(model(x, q), x, lmbda)
            tot["loss"] += rd["loss"].item()
            tot["bpp"] += rd["bpp"].item()
            tot["psnr"] += psnr_of_mse(rd["mse"].item())
        per_q.append({k: v / len(val_images) for k, v in tot.items()})
    model.train()
    return {"loss": sum(p["loss"] for p in per_q) / len(per_q), "per_quality": per_q}


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error of pixels in [0, 1] (capped at 100 dB for mse 0)."""
    return 10 * math.log10(1 / max(mse, 1e-10))
