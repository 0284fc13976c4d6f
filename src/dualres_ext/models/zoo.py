"""Where models come from: named configurations, the shipped weights, weights files and ids.

As in CompressAI's zoo, this module knows the models and the models do not know it.

* :func:`build` makes a configured model (``pretrained=True``: the shipped weights).
* :func:`save_weights` / :func:`load_weights`: the weights file format (``"dualres-weights"``).
* :func:`weights_id`: the fingerprint a bitstream records of the weights that wrote it.
* :func:`resolve_model`: what ``encode`` / ``decode`` code with, from ``weights=`` (None, a path
  or a model), loaded once per file and device.
"""

from __future__ import annotations

import functools
import inspect
import os
import zlib
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..cache import TensorCache
from .dualres import CONFIGS, DualRes
from .exact import ExactCoder

WEIGHTS_FORMAT = "dualres-weights"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "dualres_compact.pt"

# The configurations the package ships trained weights for (dualres_ext/weights/).
PRETRAINED = ("compact",)

# What an override may set: any DualRes argument but the name (a named configuration need not
# list the optional ones, e.g. the synthesis widths or ``lanes``).
_SETTABLE = frozenset(inspect.signature(DualRes.__init__).parameters) - {"self", "name"}


class WeightsNotFoundError(FileNotFoundError):
    """No trained weights are available (the package was built without them)."""


def build(name: str = "compact", pretrained: bool = False, **overrides) -> DualRes:
    """A DualRes model from a named configuration (``"compact"``, ``"paper"``).

    ``pretrained=True`` (CompressAI's zoo convention): the package's trained weights, in eval
    mode with the coder tables built, the same networks ``encode``/``decode`` use by default
    (a new copy each call, free to fine-tune); only for the configurations in
    :data:`PRETRAINED`, and without overrides (the weights fix the configuration).

    ``overrides`` replace configuration entries (``N``, ``N1``, ``k1``, ``M_H``, ``M_L``, ``N_hyper``, ``Z``,
    ``slices_H``, ``slices_L``, ``hidden``, ``lambdas``; the synthesis widths ``N_s``, ``N1_s``, ``k1_s``,
    which default to the analysis' ``N``, ``N1``, ``k1``; ``modulation``, the per-quality channel
    modulation of both transforms) or set ``lanes``: ``"auto"`` (default) = the
    native interleaved rANS stream (its width chosen by the encoder, read from the stream by the
    decoder), ``"multilane"`` or an int = the multi-lane stream; ``None`` = CompressAI's
    single-lane stream.
    Without ``pretrained`` the weights are randomly initialised.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; known: {sorted(CONFIGS)}")
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {type(pretrained).__name__}")
    if pretrained:
        if name not in PRETRAINED:
            raise ValueError(
                f"no trained weights ship for {name!r} (only for {', '.join(PRETRAINED)}); "
                "build it with pretrained=False and train it (python/train.py)"
            )
        if overrides:
            raise TypeError(
                f"pretrained=True: the weights fix the configuration, so no overrides ({', '.join(sorted(overrides))})"
            )
        return load_weights(DEFAULT_WEIGHTS)
    config = dict(CONFIGS[name])
    unknown = set(overrides) - _SETTABLE
    if unknown:
        raise TypeError(f"unknown configuration entries for {name!r}: {sorted(unknown)}")
    config.update(overrides)
    return DualRes(name=name, **config)


# ---------------------------------------------------------------------------- weights files
def save_weights(model: DualRes, path, metadata: Optional[dict] = None, half: bool = True) -> None:
    """Write ``model`` as a weights file that ``encode``/``decode`` can load (``weights=path``).

    Parameters are stored in float16 when ``half`` (half the size); buffers stay as they are:
    they are tiny and some are below float16's range (the 1e-9 likelihood bound, GDN's 1e-12
    pedestal would become 0). The entropy coder tables are rebuilt from the stored (rounded)
    parameters and saved with them, so every decoder uses the very tables of the encoder,
    whatever its floating point quirks. ``metadata`` (training command, data, steps, ...) is
    stored as it is.
    """
    params = {k: v.detach().cpu() for k, v in model.state_dict().items() if not _is_table(k)}
    if half:
        trained = {name for name, _ in model.named_parameters()}
        params = {k: v.half() if v.is_floating_point() and k in trained else v for k, v in params.items()}
    # The model as a decoder will see it: stored parameters, tables built from them. The exact
    # networks' buffers (integers and float32 multipliers) are stored as they are.
    ref = DualRes(name=model.name, **model.config)
    _attach_exact(ref, params)
    _load_params(
        ref,
        {k: v.float() if v.is_floating_point() and not k.startswith(EXACT_PREFIX) else v for k, v in params.items()},
        str(path),
    )
    ref.update(force=True)
    # The factorized prior's tables come from its learnt density (float maths that may round
    # differently elsewhere): store them. The Gaussian tables follow from the scale table alone
    # by a fixed computation (and are ~1 MB): rebuilt at load.
    tables = {
        k: v.detach().cpu().clone()
        for k, v in ref.state_dict().items()
        if _is_table(k) and not (k.startswith("gaussian_conditional.") and k != "gaussian_conditional.scale_table")
    }
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "format_version": 1,
            "name": model.name,
            "config": dict(model.config),
            "state_dict": {**params, **tables},
            "metadata": dict(metadata or {}),
        },
        str(path),
    )


EXACT_PREFIX = "exact."  # state-dict keys of the integer entropy-parameter networks


def _attach_exact(model: DualRes, state: dict) -> None:
    """Give ``model`` the exact networks that ``state`` holds (their shapes follow the state)."""
    if any(k.startswith(EXACT_PREFIX) for k in state):
        model.exact = ExactCoder.from_state(state, EXACT_PREFIX)


def _is_table(key: str) -> bool:
    """Coder tables and scale table: derived from the parameters by ``update()``."""
    return key.rsplit(".", 1)[-1] in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def _load_params(model: DualRes, state: dict, source: str) -> None:
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_table(k)]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the configuration (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_weights(path, device=None) -> DualRes:
    """A ready-to-code ``DualRes`` model (eval mode, coder tables loaded) from a weights file
    written by :func:`save_weights`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our weights file"
        # torch's own message is a page about weights_only; the chained exception keeps it.
        raise ValueError(
            f"{path}: not a readable DualRes weights file ({type(exc).__name__} "
            "while unpickling: not a torch file, truncated, or not written by save_weights)"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a DualRes weights file (write one with save_weights)")
    model = DualRes(name=ckpt.get("name", "custom"), **ckpt["config"])
    _attach_exact(model, ckpt["state_dict"])
    _load_params(model, ckpt["state_dict"], str(path))
    model.metadata = ckpt.get("metadata", {})
    model = model.to(device if device is not None else "cpu").eval()
    model.update(force=False)  # builds only what the file lacks
    return model


# ---------------------------------------------------------------------------- ids
# A model's id follows its weights (an optimiser step or load_state_dict changes them).
_ids: TensorCache[int] = TensorCache()
_float_ids: TensorCache[int] = TensorCache()


def weights_id(model: DualRes, float_only: bool = False) -> int:
    """CRC-32 fingerprint of a model's parameters, coder tables and exact (integer) networks
    (written in the header, checked on decode: a stream decoded with other weights would
    silently be garbage). ``float_only``: leave the exact networks out -- the id of bitstream
    versions 2 and 3, which do not use them, so that converting a model keeps its older
    streams decodable (equal to the full id for a model without exact networks)."""
    state = model.state_dict()
    if float_only:
        state = {k: v for k, v in state.items() if not k.startswith(EXACT_PREFIX)}

    def compute() -> int:
        crc = 0
        for key, value in sorted(state.items()):
            crc = zlib.crc32(key.encode(), crc)
            crc = zlib.crc32(
                value.detach()
                .to("cpu", torch.float32 if value.is_floating_point() else value.dtype)
                .contiguous()
                .numpy()
                .tobytes(),
                crc,
            )
        return crc & 0xFFFFFFFF

    return (_float_ids if float_only else _ids).get(model, state.values(), compute)


# ---------------------------------------------------------------------------- the codec's models
@functools.lru_cache(maxsize=8)
def _load_shared(path: str, device: str) -> DualRes:
    """One model per weights file and device, shared by every ``encode``/``decode`` call."""
    return load_weights(path, torch.device(device))


def has_coder_tables(model: DualRes) -> bool:
    """Whether ``update()`` has built both entropy models' tables."""
    return model.gaussian_conditional._offset.numel() > 0 and model.entropy_bottleneck._offset.numel() > 0


def resolve_model(weights, device=None) -> Tuple[DualRes, int]:
    """(model, weights id) that ``encode``/``decode`` code with for ``weights`` (None: the shipped
    weights; a path: a weights file; a ``DualRes``: that model, which must be in eval mode with its
    coder tables built) on ``device`` (default: the CPU, or a given model's own device)."""
    if isinstance(weights, DualRes):
        model = weights
        where = next(model.parameters()).device
        if device is not None and torch.device(device) != where:
            raise ValueError(
                f"device={device!r} but the model given as weights is on {where}; "
                "move the model (model.to(device)) or leave device out"
            )
        if model.training:
            raise ValueError("weights: the model is in training mode; call model.eval() first")
        if not has_coder_tables(model):
            raise ValueError(
                "weights: the model's entropy models have no CDF tables; call model.update(force=True) first"
            )
        return model, weights_id(model)
    if weights is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise WeightsNotFoundError(
                f"no trained DualRes weights in this installation ({DEFAULT_WEIGHTS} is missing); "
                "pass weights=PATH (a file from save_weights) or weights=MODEL"
            )
        weights = DEFAULT_WEIGHTS
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, a path or a DualRes model, got {type(weights).__name__}")
    model = _load_shared(str(Path(weights).resolve()), str(torch.device(device if device is not None else "cpu")))
    return model, weights_id(model)


__all__ = [
    "build",
    "PRETRAINED",
    "DEFAULT_WEIGHTS",
    "WEIGHTS_FORMAT",
    "WeightsNotFoundError",
    "save_weights",
    "load_weights",
    "weights_id",
    "resolve_model",
    "has_coder_tables",
]
