"""Wall-clock timing for benchmarks: the best of a few runs (a shared machine's noise only ever
adds time), with an optional warm-up and device synchronisation."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Tuple

import torch


def sync_device(device) -> None:
    """Wait for the queued work of ``device`` (a torch.device or its name) to finish: CUDA kernels
    run asynchronously, so a timer read without this measures only the launch. No-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(
    fn: Callable[[], Any],
    repeat: int,
    *,
    warmup: bool = True,
    sync: Optional[Callable[[], None]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Tuple[float, Any]:
    """``(seconds, result)``: the shortest of ``repeat`` calls of ``fn()`` and the last call's result.

    ``warmup``: one untimed call first (allocations, tables, caches, lazy initialisation; on by
    default: a first call measures start-up, not the steady state).
    ``sync``: called after the warm-up and after each timed call, inside the timing (e.g.
    ``torch.cuda.synchronize``, so that asynchronous GPU work is counted). ``clock``: the timer,
    ``time.perf_counter`` (wall time) or ``time.process_time`` (CPU time of this process).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if warmup:
        fn()
        if sync is not None:
            sync()
    best, out = float("inf"), None
    for _ in range(repeat):
        start = clock()
        out = fn()
        if sync is not None:
            sync()
        best = min(best, clock() - start)
    return best, out


def best_ms(fn: Callable[[], Any], repeat: int, **kwargs) -> float:
    """:func:`best_time` in milliseconds, without the result (the same keyword arguments)."""
    return best_time(fn, repeat, **kwargs)[0] * 1e3
