"""Widen a trained DualRes without changing what it computes (Net2Net-style growth).

(:func:`add_modulation` grows a model the same way: it gains the per-quality channel
modulation at the identity.)

A compact model trained for many steps can be given a wider analysis (``N``, ``N1``), a wider
synthesis (``N_s``, ``N1_s``) or larger kernels between strides 4 and 2 (``k1``, ``k1_s``) and go
on training from where it was, instead of starting the wider model from scratch. The widened
model computes the same latents and decodes to the same picture:

* every trained weight keeps its place (channel ``c`` stays channel ``c``; the ``ŷ_H`` input of
  the synthesis' 1x1 fusion moves behind the new ``ŷ_L`` channels; a 3x3 kernel sits in the
  centre of the 5x5 one, which gives a (transposed) convolution with padding ``k // 2`` the same
  output);
* a new channel starts with the layer's fresh initialisation on its inputs, but every weight
  *from* a new channel (or a new kernel tap) *to* an old channel is zero, and (I)GDN's ``gamma``
  does not couple old channels to new ones. The old channels therefore compute exactly what
  they did. The new ones reach the latents (analysis) or the picture (synthesis) only through
  zero weights of the branch's last layer, which the first gradient steps make non-zero (their
  gradient is the new activations times the output's gradient, so the growth starts at once).

The entropy model is untouched, and the latents are the same, so the widened model writes the
same symbols (up to float32 summation order, which may move a value lying on a rounding
boundary). :func:`widen_tensor` does the same embedding for any tensor shaped like a widened
parameter, which is how a training checkpoint's Adam moments follow their parameters.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

from .dualres import DualRes

# A dimension is a list of channel segments (each old segment starts where the new layout puts
# it) or ("k", size) for a kernel dimension (the old kernel centred in the new one).
_Dim = Union[List[int], Tuple[str, int]]
ANALYSIS_KEYS = ("N", "N1", "k1")
SYNTHESIS_KEYS = ("N_s", "N1_s", "k1_s")
WIDTH_KEYS = ANALYSIS_KEYS + SYNTHESIS_KEYS


def _layout(cfg: dict) -> Dict[str, Tuple[List[_Dim], Optional[int]]]:
    """name -> (dimensions, output dimension or None) of every parameter a width shapes."""
    n, n1, k1 = cfg["N"], cfg["N1"], cfg["k1"]
    ns, n1s, k1s, mh, ml = cfg["N_s"], cfg["N1_s"], cfg["k1_s"], cfg["M_H"], cfg["M_L"]

    def gdn(prefix: str, c: int):
        # gamma[i, j]: how much input channel j normalises output channel i.
        return {f"{prefix}.beta": ([[c]], 0), f"{prefix}.gamma": ([[c], [c]], 0)}

    def modulation(key: str, c: int):
        # (quality, channel) tables; a new channel's entries start as the identity (zeros).
        if not cfg.get("modulation"):
            return {}
        q = len(cfg["lambdas"])
        return {f"modulation.{key}.{t}": ([[q], [c]], 1) for t in ("log_scale", "shift")}

    return {
        **modulation("g_a_stem_1", n1),
        **modulation("g_a_stem_3", n),
        **modulation("g_a_l_1", n),
        **modulation("g_s_up_l_1", ns),
        **modulation("g_s_2", ns),
        **modulation("g_s_4", n1s),
        # Conv2d weights are (out, in, kh, kw); ConvTranspose2d weights (in, out, kh, kw).
        # Analysis. The image's 3 channels and the latents' are all "old": nothing new may
        # reach the latents yet.
        "g_a_stem.0.weight": ([[n1], [3], [5], [5]], 0),
        "g_a_stem.0.bias": ([[n1]], 0),
        **gdn("g_a_stem.1", n1),
        "g_a_stem.2.weight": ([[n], [n1], ("k", k1), ("k", k1)], 0),
        "g_a_stem.2.bias": ([[n]], 0),
        **gdn("g_a_stem.3", n),
        "g_a_h.weight": ([[mh], [n], [5], [5]], None),
        "g_a_h.bias": ([[mh]], None),
        "g_a_l.0.weight": ([[n], [n], [5], [5]], 0),
        "g_a_l.0.bias": ([[n]], 0),
        **gdn("g_a_l.1", n),
        "g_a_l.2.weight": ([[ml], [n], [5], [5]], None),
        "g_a_l.2.bias": ([[ml]], None),
        # Synthesis.
        "g_s_up_l.0.weight": ([[ml], [ns], [5], [5]], 1),
        "g_s_up_l.0.bias": ([[ns]], 0),
        **gdn("g_s_up_l.1", ns),
        "g_s.0.weight": ([[ns], [ns, mh], [1], [1]], 0),
        "g_s.0.bias": ([[ns]], 0),
        "g_s.1.weight": ([[ns], [ns], [5], [5]], 1),
        "g_s.1.bias": ([[ns]], 0),
        **gdn("g_s.2", ns),
        "g_s.3.weight": ([[ns], [n1s], ("k", k1s), ("k", k1s)], 1),
        "g_s.3.bias": ([[n1s]], 0),
        **gdn("g_s.4", n1s),
        # The picture's 3 channels are all "old": nothing new may reach them yet.
        "g_s.5.weight": ([[n1s], [3], [5], [5]], None),
        "g_s.5.bias": ([[3]], None),
    }


def _positions(old: _Dim, new: _Dim) -> torch.Tensor:
    """Where the old dimension's entries go in the new one."""
    if isinstance(old, tuple):
        k_old, k_new = old[1], new[1]
        if k_new < k_old or (k_new - k_old) % 2:
            raise ValueError(f"kernel {k_old} cannot be centred in kernel {k_new}")
        return torch.arange(k_old) + (k_new - k_old) // 2
    parts, start = [], 0
    for o, n in zip(old, new):
        if n < o:
            raise ValueError(f"a width can only grow ({o} -> {n})")
        parts.append(torch.arange(o) + start)
        start += n
    return torch.cat(parts)


def widen_tensor(
    name: str,
    old: torch.Tensor,
    new: torch.Tensor,
    old_cfg: dict,
    new_cfg: dict,
    cut: Optional[Union[float, torch.Tensor]] = None,
) -> torch.Tensor:
    """``new`` (shaped for ``new_cfg``) with ``old`` (shaped for ``old_cfg``) embedded in it.

    ``cut``, if given, is written where a new input (a new channel or kernel tap) meets an old
    output: 0 for a weight, ``gamma``'s stored zero, nothing (None) for a moment estimate.
    Tensors that no width shapes come back as ``old``.
    """
    layout_old, layout_new = _layout(old_cfg), _layout(new_cfg)
    if name not in layout_old:
        return old
    dims_old, out_dim = layout_old[name]
    dims_new = layout_new[name][0]
    where = [_positions(o, n) for o, n in zip(dims_old, dims_new)]
    if tuple(len(w) for w in where) != tuple(old.shape):
        raise ValueError(f"{name}: shape {tuple(old.shape)} does not match the old configuration")
    result = new.detach().clone()
    block = torch.meshgrid(*where, indexing="ij")  # the old tensor's entries in the new one
    if cut is not None:
        # Every entry feeding an old output from outside the old block: the old outputs must
        # not see anything new. (Along the output dimension only old positions; along the
        # others, anything not in the old block.)
        old_block = torch.zeros(result.shape, dtype=torch.bool)
        old_block[block] = True
        feeds_old = torch.ones(result.shape, dtype=torch.bool)
        if out_dim is not None:
            out_old = torch.zeros(result.shape[out_dim], dtype=torch.bool)
            out_old[where[out_dim]] = True
            shape = [1] * result.dim()
            shape[out_dim] = -1
            feeds_old = out_old.view(shape).expand(result.shape)
        result[feeds_old & ~old_block] = cut
    result[block] = old.detach().to(result.dtype)
    return result


def synthesis_widths(state_dict: dict) -> dict:
    """``N_s``, ``N1_s``, ``k1_s`` as a DualRes state dict's shapes have them.

    A checkpoint that does not store its configuration may have a synthesis as wide as its
    analysis, which the "compact" configuration no longer has: its shapes say what it is.
    """
    return {
        "N_s": int(state_dict["g_s.0.bias"].numel()),
        "N1_s": int(state_dict["g_s.4.beta"].numel()),
        "k1_s": int(state_dict["g_s.3.weight"].shape[-1]),
    }


def widened_config(config: dict, **widths) -> dict:
    """``config`` (a ``DualRes.config``, which names every width) with the given widths.

    ``widths``: keys of :data:`WIDTH_KEYS`; None keeps a width. The synthesis widths stay what
    ``config`` names even where they once defaulted to the analysis' (widening ``N`` leaves
    ``N_s`` alone).
    """
    unknown = set(widths) - set(WIDTH_KEYS)
    if unknown:
        raise TypeError(f"not a width: {sorted(unknown)} (widths: {', '.join(WIDTH_KEYS)})")
    new = dict(config)
    for key, value in widths.items():
        if value is not None:
            new[key] = int(value)
    return new


def widen(model: DualRes, generator: Optional[torch.Generator] = None, **widths) -> DualRes:
    """A new DualRes with the given larger widths that computes what ``model`` computes.

    ``widths``: any of ``N``, ``N1``, ``k1`` (analysis) and ``N_s``, ``N1_s``, ``k1_s``
    (synthesis); the others keep ``model``'s. New channels take a freshly built model's
    initialisation (``generator`` makes it reproducible); every other tensor, buffers and coder
    tables included, is ``model``'s. The result is on the CPU, in float32, in ``model``'s
    training/eval mode.
    """
    old_cfg = dict(model.config)
    new_cfg = widened_config(old_cfg, **widths)
    if generator is not None:
        state = torch.random.get_rng_state()
        torch.random.set_rng_state(generator.get_state())
    try:
        fresh = DualRes(name=model.name, **new_cfg)
    finally:
        if generator is not None:
            torch.random.set_rng_state(state)
    fresh_state = fresh.state_dict()
    old_state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    widened = {}
    for name, old in old_state.items():
        if name not in fresh_state:
            raise ValueError(f"{name}: not in the widened model")
        if name.endswith(".gamma"):
            gdn = fresh.get_submodule(name.rsplit(".", 1)[0])
            cut = gdn.gamma_reparam.init(torch.zeros(())).item()  # the stored value of gamma = 0
        else:
            cut = 0.0
        widened[name] = widen_tensor(name, old, fresh_state[name], old_cfg, new_cfg, cut=cut)
    fresh.load_state_dict(widened)  # strict: every tensor of the model, coder tables included
    fresh.train(model.training)
    return fresh


def add_modulation(model: DualRes) -> DualRes:
    """A copy of ``model`` with the per-quality channel modulation (``DualRes(modulation=True)``),
    at the identity: it computes what ``model`` computes, and training makes it depart.

    The modulation's parameters come after all of ``model``'s, which keep their order (a
    training checkpoint's optimiser state stays valid for them). On the CPU, in float32, in
    ``model``'s training/eval mode.
    """
    if model.modulation is not None:
        raise ValueError("the model already has the quality modulation")
    config = dict(model.config, modulation=True)
    grown = DualRes(name=model.name, **config)
    state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    missing, unexpected = grown.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("modulation.") for k in missing), (missing, unexpected)
    grown.train(model.training)
    return grown


def widen_synthesis(
    model: DualRes,
    N_s: Optional[int] = None,
    N1_s: Optional[int] = None,
    k1_s: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> DualRes:
    """:func:`widen` restricted to the synthesis widths."""
    return widen(model, generator=generator, N_s=N_s, N1_s=N1_s, k1_s=k1_s)


__all__ = [
    "widen",
    "add_modulation",
    "widen_synthesis",
    "widen_tensor",
    "widened_config",
    "synthesis_widths",
    "ANALYSIS_KEYS",
    "SYNTHESIS_KEYS",
    "WIDTH_KEYS",
]
