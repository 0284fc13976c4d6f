"""cache.TensorCache: a value follows its sources, and never keeps its owner alive."""

from __future__ import annotations

import gc

import torch

from dualres_ext.cache import TensorCache


def test_value_follows_in_place_writes_and_replacements():
    cache, calls = TensorCache(), []
    owner = torch.nn.Linear(3, 2)

    def build():
        calls.append(1)
        return float(owner.weight.sum())

    first = cache.get(owner, owner.parameters(), build)
    assert cache.get(owner, owner.parameters(), build) == first and len(calls) == 1
    with torch.no_grad():
        owner.weight.add_(1.0)  # in place: the version counter moves
    assert abs(cache.get(owner, owner.parameters(), build) - (first + 6.0)) < 1e-5 and len(calls) == 2
    owner.weight = torch.nn.Parameter(torch.zeros(2, 3))  # replaced
    assert cache.get(owner, owner.parameters(), build) == 0.0 and len(calls) == 3


def test_tensor_owners_and_no_leaks():
    cache = TensorCache()
    a, b = torch.arange(4.0), torch.arange(4.0)  # equal values, different owners
    assert cache.get(a, (), lambda: "a") == "a"
    assert cache.get(b, (), lambda: "b") == "b"
    a.mul_(2)
    assert cache.get(a, (), lambda: "a2") == "a2"
    del a, b
    gc.collect()
    assert not cache._entries, "a dead owner's entry must go"
