"""`IdentityMemo`: a value computed once per live object, for objects that are replaced, never mutated.

Why identity and not equality: the objects memoised here (a resolved budget) are frozen and
replaced as a whole when they change, so "the same object" is exactly "the same answer", and an
identity lookup costs no hashing of their contents. The entry keeps its object, so the id cannot be
reused by another object while the entry lives; the memo is bounded (cleared when full).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class IdentityMemo(Generic[K, V]):
    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: dict[int, tuple[K, V]] = {}

    def get(self, obj: K, compute: Callable[[K], V]) -> V:
        """`compute(obj)`, computed once while `obj` stays in the memo."""
        hit = self._entries.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        value = compute(obj)
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(obj)] = (obj, value)
        return value
