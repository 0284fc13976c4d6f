"""Learned image compression models. ``build(name, **overrides)`` makes a configured model."""
from __future__ import annotations

import inspect

from .dualres import CONFIGS, DEFAULT_LAMBDAS, DualRes, get_scale_table

# What an override may set: any DualRes argument but the name (a named configuration need not
# list the optional ones, e.g. the synthesis widths or ``lanes``).
_SETTABLE = frozenset(inspect.signature(DualRes.__init__).parameters) - {"self", "name"}


def build(name: str = "compact", **overrides) -> DualRes:
    """A DualRes model from a named configuration (``"compact"``, ``"paper"``).

    ``overrides`` replace configuration entries (``N``, ``N1``, ``k1``, ``M_H``, ``M_L``, ``N_hyper``, ``Z``,
    ``slices_H``, ``slices_L``, ``hidden``, ``lambdas``; the synthesis widths ``N_s``, ``N1_s``, ``k1_s``,
    which default to the analysis' ``N``, ``N1``, ``k1``; ``modulation``, the per-quality channel
    modulation of both transforms) or set ``lanes``: ``"auto"`` (default) or
    an int = the multi-lane rANS stream with that many lanes per slice (chosen by the encoder,
    read from the stream by the decoder); ``None`` = CompressAI's single-lane stream.
    Weights are randomly initialised; trained weights come through ``dualres_ext.codec``.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; known: {sorted(CONFIGS)}")
    config = dict(CONFIGS[name])
    unknown = set(overrides) - _SETTABLE
    if unknown:
        raise TypeError(f"unknown configuration entries for {name!r}: {sorted(unknown)}")
    config.update(overrides)
    return DualRes(name=name, **config)


__all__ = ["build", "DualRes", "CONFIGS", "DEFAULT_LAMBDAS", "get_scale_table"]
