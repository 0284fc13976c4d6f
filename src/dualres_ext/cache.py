"""The one cache of derived state: values computed from tensors, rebuilt when those change.

Derived state is built where it changes (``update()``, ``load_state_dict``) wherever that is
enough. Some values depend on tensors that an optimiser or the user may replace or write in place
at any time (a model's weights between two encodes); :class:`TensorCache` keeps one such value per
owner object and rebuilds it when any source tensor was replaced, moved, resized or written
(PyTorch counts in-place writes in ``Tensor._version``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Generic, Iterable, TypeVar

import torch

T = TypeVar("T")


def tensor_key(tensors: Iterable[torch.Tensor]) -> tuple:
    """What identifies the contents of ``tensors`` without reading them: storage, version, layout."""
    return tuple((t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape)) for t in tensors)


class TensorCache(Generic[T]):
    """One derived value per owner (held weakly: the cache never keeps an owner alive), valid
    while ``tensor_key`` of its sources is unchanged. Owners are told apart by identity; a tensor
    may own a value and counts as one of its sources (do not list it again: the entry would keep
    it alive). Thread-safe; a value may be built twice by racing threads, and
    either result is kept (both are equal)."""

    def __init__(self) -> None:
        self._entries: Dict[int, tuple] = {}
        self._lock = threading.Lock()

    def get(self, owner: object, sources: Iterable[torch.Tensor], build: Callable[[], T]) -> T:
        sources = tuple(sources)
        # A tensor owner is a source too, held weakly like any owner.
        key = tensor_key(sources + ((owner,) if isinstance(owner, torch.Tensor) else ()))
        with self._lock:
            entry = self._entries.get(id(owner))
        if entry is not None and entry[0]() is owner and entry[1] == key:
            return entry[3]
        value = build()
        with self._lock:
            if entry is None or entry[0]() is not owner:
                weakref.finalize(owner, self._forget, id(owner))
            # The entry keeps its sources alive: a freed source's address could otherwise be
            # reused by a new tensor of the same shape, whose key would then look unchanged.
            self._entries[id(owner)] = (weakref.ref(owner), key, sources, value)
        return value

    def clear(self, owner: object) -> None:
        with self._lock:
            entry = self._entries.get(id(owner))
            if entry is not None and entry[0]() is owner:
                del self._entries[id(owner)]

    def _forget(self, owner_id: int) -> None:
        with self._lock:
            entry = self._entries.get(owner_id)
            if entry is not None and entry[0]() is None:
                del self._entries[owner_id]
