"""The nvme driver's in-memory index of its directory, with capacity accounting.

The directory is the durable truth; this index (key -> value length) is
rebuilt from it on open and changed under one lock together with the file
system operation that publishes or removes a file, so the two never disagree
about a committed key. Capacity counts what files occupy on disk (header and
padding included, ``layout.file_size``); ``value_bytes`` counts the value
bytes ``usage`` reports. Writes reserve their room before touching the disk,
so concurrent batches can never overshoot the hard limit together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from kvstore.driver import KeyEntry

from .layout import file_size


class EntryIndex:
    """Key -> value length of every committed file, plus room reserved by writes in flight."""

    def __init__(self, capacity: int, entries: Iterable[tuple[bytes, int]] = ()) -> None:
        self.capacity = capacity
        self._sizes = dict(entries)
        self._used = sum(file_size(size) for size in self._sizes.values())
        self._value_bytes = sum(self._sizes.values())
        self._reserved = 0
        self._lock = threading.Lock()

    def size(self, key: bytes) -> int | None:
        """The committed value length of ``key``, or ``None``."""
        return self._sizes.get(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._sizes

    @property
    def used(self) -> int:
        """Bytes the committed files occupy on disk."""
        return self._used

    @property
    def value_bytes(self) -> int:
        """Bytes of the committed values."""
        return self._value_bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def entries(self) -> list[KeyEntry]:
        """A snapshot of every committed key and its value length."""
        with self._lock:
            return [KeyEntry(key, size) for key, size in self._sizes.items()]

    def reserve(self, items: Iterable[tuple[bytes, int]]) -> bool:
        """Reserve room for a batch of distinct keys (counting the files they replace as freed);
        ``False``, reserving nothing, when the batch does not fit."""
        with self._lock:
            added = 0
            freed = 0
            for key, size in items:
                added += file_size(size)
                old = self._sizes.get(key)
                freed += 0 if old is None else file_size(old)
            if self._used + self._reserved + added - freed > self.capacity:
                return False
            self._reserved += added
            return True

    def release(self, size: int) -> None:
        """Give back the reservation of a value of ``size`` bytes whose write was abandoned."""
        with self._lock:
            self._reserved -= file_size(size)

    def commit(self, key: bytes, size: int, publish: Callable[[], None]) -> None:
        """Run ``publish`` (the rename that makes the value visible) and record it, atomically
        with respect to every other index change; the reservation becomes used room."""
        with self._lock:
            publish()
            old = self._sizes.get(key)
            if old is not None:
                self._used -= file_size(old)
                self._value_bytes -= old
            self._sizes[key] = size
            self._used += file_size(size)
            self._value_bytes += size
            self._reserved -= file_size(size)

    def remove(self, key: bytes, unpublish: Callable[[], bool]) -> bool:
        """Run ``unpublish`` (the unlink) and forget ``key`` if it says it removed the file."""
        with self._lock:
            removed = unpublish()
            if removed:
                old = self._sizes.pop(key, None)
                if old is not None:
                    self._used -= file_size(old)
                    self._value_bytes -= old
            return removed
