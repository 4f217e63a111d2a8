"""Pins: chunks no tier evicts, for good or until a deadline."""

from __future__ import annotations

import asyncio
import math

from kvstore.errors import (
    InvalidArgumentError,
    KVStoreError,
)
from kvstore.keys import (
    TokenIds,
)
from kvstore.store.core import StoreState


class Pinning(StoreState):
    """pin, unpin and evict."""

    async def pin(self, tokens: TokenIds, ttl_s: float | None = None) -> int:
        """Pin the cached prefix of ``tokens`` so no tier evicts it; chunks pinned.

        ttl_s: drop the pin after this many seconds (so a client that dies
        cannot hold chunks forever). A chunk pinned several times stays pinned
        until the latest deadline asked for, or for good if any pin had none.
        """
        if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
            raise InvalidArgumentError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        keys = self.keys(tokens)
        keys = keys[: len(await self._locate(keys))]
        self._pins.add(keys, ttl_s)
        if ttl_s is not None and keys:
            self._sweep_later()
        return len(keys)

    async def unpin(self, tokens: TokenIds) -> int:
        """Unpin every chunk of ``tokens``; chunks that were pinned."""
        return self._pins.remove(self.keys(tokens))

    def _is_pinned(self, key: bytes) -> bool:
        return key in self._pins

    def _sweep_later(self) -> None:
        """Start the task that drops expired pins, unless it runs already."""
        root = self._root
        if root._sweeper is None or root._sweeper.done():
            root._sweeper = asyncio.create_task(self._sweep_pins(), name="kvstore-pin-sweeper")

    async def _sweep_pins(self) -> None:
        """Drop pins as they expire (at most a second late), until none has a deadline."""
        pins = self._pins
        while (earliest := pins.next_deadline()) is not None:
            await asyncio.sleep(min(1.0, max(0.0, earliest - pins.clock())))
            pins.expire()

    async def evict(self, tokens: TokenIds) -> int:
        """Drop the unpinned chunks of ``tokens`` from every tier; chunks dropped."""
        keys = [key for key in self.keys(tokens) if not self._is_pinned(key)]
        dropped: set[bytes] = set()
        for tier in self.tiers:
            held = [key for key in keys if key in tier.index or tier.shared]
            if not held:
                continue
            try:
                existed = await tier.delete(held)
            except KVStoreError:
                continue
            dropped.update(key for key, was in zip(held, existed) if was)
        return len(dropped)
