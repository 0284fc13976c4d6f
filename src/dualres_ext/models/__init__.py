"""Learned image compression models. ``build(name, **overrides)`` makes a configured model."""
from __future__ import annotations

import inspect

from .dualres import CONFIGS, DEFAULT_LAMBDAS, DualRes, get_scale_table

# What an override may set: any DualRes argument but the name (a named configuration need not
# list the optional ones, e.g. the synthesis widths or ``lanes``).
_SETTABLE = frozenset(inspect.signature(DualRes.__init__).parameters) - {"self", "name"}


# The configurations the package ships trained weights for (dualres_ext/weights/).
PRETRAINED = ("compact",)


def build(name: str = "compact", pretrained: bool = False, **overrides) -> DualRes:
    """A DualRes model from a named configuration (``"compact"``, ``"paper"``).

    ``pretrained=True`` (CompressAI's zoo convention): the package's trained weights, in eval
    mode with the coder tables built, the same networks ``encode``/``decode`` use by default
    (a new copy each call, free to fine-tune); only for the configurations in
    :data:`PRETRAINED`, and without overrides (the weights fix the configuration).

    ``overrides`` replace configuration entries (``N``, ``N1``, ``k1``, ``M_H``, ``M_L``, ``N_hyper``, ``Z``,
    ``slices_H``, ``slices_L``, ``hidden``, ``lambdas``; the synthesis widths ``N_s``, ``N1_s``, ``k1_s``,
    which default to the analysis' ``N``, ``N1``, ``k1``; ``modulation``, the per-quality channel
    modulation of both transforms) or set ``lanes``: ``"auto"`` (default) or
    an int = the multi-lane rANS stream with that many lanes per slice (chosen by the encoder,
    read from the stream by the decoder); ``None`` = CompressAI's single-lane stream.
    Without ``pretrained`` the weights are randomly initialised.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; known: {sorted(CONFIGS)}")
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {type(pretrained).__name__}")
    if pretrained:
        if name not in PRETRAINED:
            raise ValueError(f"no trained weights ship for {name!r} (only for {', '.join(PRETRAINED)}); "
                             "build it with pretrained=False and train it (python/train.py)")
        if overrides:
            raise TypeError(f"pretrained=True: the weights fix the configuration, so no overrides "
                            f"({', '.join(sorted(overrides))})")
        from ..codec import DEFAULT_WEIGHTS, load_weights

        return load_weights(DEFAULT_WEIGHTS)
    config = dict(CONFIGS[name])
    unknown = set(overrides) - _SETTABLE
    if unknown:
        raise TypeError(f"unknown configuration entries for {name!r}: {sorted(unknown)}")
    config.update(overrides)
    return DualRes(name=name, **config)


__all__ = ["build", "DualRes", "CONFIGS", "PRETRAINED", "DEFAULT_LAMBDAS", "get_scale_table"]
