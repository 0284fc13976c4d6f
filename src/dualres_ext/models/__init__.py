"""Learned image compression models: :func:`build` makes a configured DualRes model
(``pretrained=True``: the shipped weights); :mod:`.zoo` reads and writes weights files."""

from __future__ import annotations

from .dualres import CONFIGS, DEFAULT_LAMBDAS, DualRes, get_scale_table
from .zoo import PRETRAINED, build

__all__ = ["build", "DualRes", "CONFIGS", "PRETRAINED", "DEFAULT_LAMBDAS", "get_scale_table"]
