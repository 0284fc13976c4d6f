"""The small DualRes configuration the model, codec and widening tests build (fast on CPU).

Imported by path because pytest runs with --import-mode=importlib (tests are not a package).
The synthesis widths are given explicitly: "compact"'s own differ from its analysis'.
"""

TINY = dict(
    N=32,
    N1=16,
    M_H=24,
    M_L=40,
    N_hyper=24,
    Z=16,
    slices_H=(8, 16),
    slices_L=(8, 16, 16),
    hidden=24,
    N_s=32,
    N1_s=16,
    k1_s=3,
)
