"""Eviction policies: which chunks a full tier gives up first.

A policy tracks the keys a tier holds and their sizes and, asked for room,
names victims in eviction order, skipping pinned keys. Pinned chunks are never
evicted, so a tier full of pinned chunks refuses new ones instead.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Callable, Iterator


class EvictionPolicy(abc.ABC):
    """The index of one tier plus the order in which it evicts."""

    def __init__(self) -> None:
        self.used_bytes = 0

    @abc.abstractmethod
    def add(self, key: bytes, size: int) -> None:
        """Record a stored key (or a new size for a key already held)."""

    @abc.abstractmethod
    def touch(self, key: bytes) -> None:
        """Record a read of ``key``."""

    @abc.abstractmethod
    def remove(self, key: bytes) -> int:
        """Forget ``key``; its size, or 0 if it was not held."""

    @abc.abstractmethod
    def size_of(self, key: bytes) -> int | None: ...

    @abc.abstractmethod
    def eviction_order(self) -> Iterator[tuple[bytes, int]]:
        """Every held key with its size, first victim first."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def __contains__(self, key: bytes) -> bool:
        return self.size_of(key) is not None

    def victims(self, need: int, pinned: Callable[[bytes], bool]) -> list[tuple[bytes, int]] | None:
        """Unpinned keys to evict to free ``need`` bytes, or ``None`` if impossible."""
        chosen: list[tuple[bytes, int]] = []
        freed = 0
        for key, size in self.eviction_order():
            if freed >= need:
                break
            if not pinned(key):
                chosen.append((key, size))
                freed += size
        return chosen if freed >= need else None


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: OrderedDict[bytes, int] = OrderedDict()

    def add(self, key: bytes, size: int) -> None:
        self.used_bytes += size - self._entries.get(key, 0)
        self._entries[key] = size
        self._entries.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def remove(self, key: bytes) -> int:
        size = self._entries.pop(key, 0)
        self.used_bytes -= size
        return size

    def size_of(self, key: bytes) -> int | None:
        return self._entries.get(key)

    def eviction_order(self) -> Iterator[tuple[bytes, int]]:
        return iter(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)


class FIFOPolicy(LRUPolicy):
    """Oldest stored first; reads do not refresh a key."""

    def touch(self, key: bytes) -> None:
        return None


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "fifo": FIFOPolicy}
