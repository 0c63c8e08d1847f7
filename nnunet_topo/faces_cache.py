"""What is computed once per faces tensor: template faces are the same tensor at every training step, so their range
check and edge structure are computed on the first step and reused, instead of reading numbers back from the
device at every step (a host synchronisation on accelerators; issue 26, item 3).

An entry is keyed by the tensor's identity, a name and a caller's key (e.g. the vertex count and device), and
invalidated when the tensor is modified in place (its ``_version``) or freed (a weak reference; the entry goes with
the tensor). Plain torch.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Hashable, Tuple, TypeVar

from torch import Tensor

__all__ = ["once_per_faces"]

T = TypeVar("T")

#: (id(faces), name) -> (weak reference to faces, key incl. the tensor's version, value)
_CACHE: Dict[Tuple[int, str], tuple] = {}


def once_per_faces(faces: Tensor, name: str, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` for this ``faces`` tensor, ``name`` and ``key``, computed once and then reused while the tensor
    lives unchanged. ``compute`` may raise (e.g. a range check): nothing is cached then."""
    slot = (id(faces), name)
    full_key = (faces._version, key)
    entry = _CACHE.get(slot)
    if entry is not None and entry[0]() is faces and entry[1] == full_key:
        return entry[2]
    value = compute()
    if entry is None or entry[0]() is not faces:
        weakref.finalize(faces, _CACHE.pop, slot, None)
    _CACHE[slot] = (weakref.ref(faces), full_key, value)
    return value
