"""Pins: chunks no tier evicts, for good or until a deadline.

The pin set is shared by a store and every namespace view of it. Time comes
from an injectable clock (``time.monotonic`` by default), so a test moves
deadlines by advancing a clock instead of sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from kvstore.errors import InvalidArgumentError

Clock = Callable[[], float]
"""Seconds on a monotonic scale."""


class Pins:
    """Keys pinned for good, and keys pinned until a deadline on ``clock``."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._keys: set[bytes] = set()
        self._deadlines: dict[bytes, float] = {}

    def add(self, keys: Iterable[bytes], ttl_s: float | None = None) -> None:
        """Pin ``keys`` for ``ttl_s`` seconds, or for good. A key pinned several
        times stays pinned until the latest deadline asked for, or for good if any
        pin had none."""
        if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
            raise InvalidArgumentError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        deadlines = self._deadlines
        for key in keys:
            if ttl_s is None:
                deadlines.pop(key, None)
            elif key not in self._keys or key in deadlines:
                deadlines[key] = max(deadlines.get(key, 0.0), self.clock() + ttl_s)
            self._keys.add(key)

    def remove(self, keys: Iterable[bytes]) -> int:
        """Unpin ``keys``; how many of them were pinned."""
        removed = 0
        for key in keys:
            if key in self:
                self._keys.discard(key)
                self._deadlines.pop(key, None)
                removed += 1
        return removed

    def remove_prefix(self, prefix: bytes) -> None:
        """Unpin every key starting with ``prefix``."""
        self.remove([key for key in self._keys if key.startswith(prefix)])

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is pinned now; a pin past its deadline is dropped here."""
        if key not in self._keys:
            return False
        assert isinstance(key, bytes)
        deadline = self._deadlines.get(key)
        if deadline is not None and deadline <= self.clock():
            self._keys.discard(key)
            del self._deadlines[key]
            return False
        return True

    def live(self) -> frozenset[bytes]:
        """The keys pinned now, without dropping expired pins: safe from any thread
        (``KVStore.stats``, a metrics scrape), since it only reads."""
        now = self.clock()
        deadlines = dict(self._deadlines)
        return frozenset(key for key in tuple(self._keys) if deadlines.get(key, math.inf) > now)

    def expire(self) -> None:
        """Drop every pin past its deadline."""
        now = self.clock()
        for key in [key for key, deadline in self._deadlines.items() if deadline <= now]:
            self._keys.discard(key)
            del self._deadlines[key]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a pin, or ``None`` when no pin has one."""
        return min(self._deadlines.values(), default=None)
