"""The background-write queue's jobs and its byte budget."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kvstore.store.encoded import EncodedChunk


@dataclass
class WriteJob:
    chunk: EncodedChunk
    cost: int


class QueueBudget:
    """Bytes of background writes in flight, bounded; ``block`` waits, ``drop`` refuses."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, cost: int, *, wait: bool) -> bool:
        async with self._changed:
            while self.used and self.used + cost > self.limit:
                if not wait:
                    return False
                await self._changed.wait()
            self.used += cost
            return True

    async def release(self, cost: int) -> None:
        async with self._changed:
            self.used -= cost
            self._changed.notify_all()

    async def drained(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0)
