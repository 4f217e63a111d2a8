"""Placement: room in a tier, eviction, and write-back hand-down."""

from __future__ import annotations

import asyncio
import logging

from kvstore.errors import (
    CapacityError,
    DriverTimeoutError,
    IntegrityError,
    KVStoreError,
)
from kvstore.store.encoded import EncodedChunk
from kvstore.store.encoding import Encoding
from kvstore.tier import Tier

log = logging.getLogger("kvstore.store")


class Placement(Encoding):
    """Writing chunks into a tier, making room by eviction."""

    async def _write(
        self, tier: Tier, chunks: list[EncodedChunk], *, retry_full: bool = True
    ) -> int:
        """Put chunks into ``tier``, evicting to make room; the number written.

        Room is each chunk's footprint in the tier; a chunk over the driver's
        ``max_value_bytes`` is dropped unsent. What a failed put stored
        anyway is counted, so the index holds every chunk the tier holds. A
        driver full below ``tier.limit`` (a disk or quota filled up) lowers the
        limit (``Tier.note_full``), and the chunks it refused are tried once
        more after evicting.
        """
        if not chunks:
            return 0
        largest = tier.driver.capabilities.max_value_bytes
        fitting: list[EncodedChunk] = []
        for chunk in chunks:
            too_large = largest is not None and len(chunk.view) > largest
            if not too_large and await self.reserve(tier, tier.footprint(len(chunk.view))):
                fitting.append(chunk)
            else:
                tier.stats.dropped_writes += 1
        if not fitting:
            return 0
        cost = sum(tier.footprint(len(c.view)) for c in fitting)
        sizes = [(c.key, len(c.view)) for c in fitting]
        for chunk in fitting:
            chunk.retain()

        def settled(succeeded: bool, late: bool) -> None:
            """The driver is done with the chunks: count what it stored, even after a
            timeout (the bytes are in the tier), and let the chunks' buffers go."""
            tier.reserved -= cost
            if succeeded:
                self._record_written(tier, sizes)
            elif late:
                # A put that failed after its caller left may have stored some chunks:
                # ask the tier, so that the index holds what the tier holds.
                check = asyncio.ensure_future(self._record_landed(tier, sizes))
                tier.abandoned.add(check)
                check.add_done_callback(tier.abandoned.discard)
            for chunk in fitting:
                chunk.release()

        try:
            await tier.call(
                "put_many",
                tier.driver.put_many([(c.key, c.view) for c in fitting]),
                settled=settled,
            )
        except DriverTimeoutError:
            return 0
        except KVStoreError as exc:
            landed = await self._record_landed(tier, sizes)
            if isinstance(exc, CapacityError) and retry_full:
                tier.note_full()
                refused = [chunk for chunk in fitting if chunk.key not in landed]
                return len(landed) + await self._write(tier, refused, retry_full=False)
            return len(landed)
        return len(fitting)

    def _record_written(self, tier: Tier, sizes: list[tuple[bytes, int]]) -> None:
        """Index chunks (key, encoded size) that ``tier`` now holds, by footprint."""
        for key, size in sizes:
            tier.record(key, tier.footprint(size))
        tier.stats.chunks_written += len(sizes)
        tier.stats.bytes_written += sum(size for _, size in sizes)

    async def _record_landed(self, tier: Tier, sizes: list[tuple[bytes, int]]) -> set[bytes]:
        """Index the chunks of a failed put that ``tier`` holds all the same; their keys."""
        try:
            held = await tier.call(
                "contains_many", tier.driver.contains_many([key for key, _ in sizes])
            )
        except KVStoreError:
            return set()
        landed = [item for item, there in zip(sizes, held) if there]
        self._record_written(tier, landed)
        return {key for key, _ in landed}

    async def reserve(self, tier: Tier, size: int) -> bool:
        """Make room for ``size`` more bytes (a footprint, ``tier.footprint``) in
        ``tier`` and reserve them; ``False`` when they cannot fit.

        Room is made by evicting in the tier's policy order, never a pinned
        chunk or one being read (a victim borrowed before the driver deleted it
        keeps its room until the loan ends, and the loop evicts again); a
        write-back tier hands its victims down to the tier below first. The
        caller owns the reservation: it gives it back with ``tier.reserved -=
        size`` once the bytes are written (and recorded with ``tier.record``) or
        abandoned. Every write into a tier goes through here, the store's own
        and the node service's room for its clients."""
        async with tier.room_lock:
            while (need := tier.occupied_bytes + size - tier.limit) > 0:
                victims = tier.victims(need, self._is_pinned)
                if victims is None:
                    return False
                await self._evict_from(tier, [key for key, _ in victims])
            tier.reserved += size
            return True

    async def _evict_from(self, tier: Tier, keys: list[bytes]) -> None:
        """Remove ``keys`` from ``tier``; write-back tiers first hand them down."""
        below = self.tiers[tier.position + 1] if tier.position + 1 < len(self.tiers) else None
        if below is not None and tier.config.write_policy == "write-back":
            await self._hand_down(tier, below, await self._absent(below, keys))
        tier.stats.evictions += len(keys)
        try:
            await tier.delete(keys)
        except KVStoreError:
            log.warning("tier %s: evicted chunks could not be deleted", tier.name)

    async def _hand_down(self, tier: Tier, below: Tier, keys: list[bytes]) -> None:
        """Copy write-back chunks ``tier`` is evicting into ``below``; those that do
        not land there (unreadable, corrupt, refused) are counted in
        ``tier.stats.dropped_writebacks``."""
        if not keys:
            return
        try:
            values = await tier.call("get_many", tier.driver.get_many(keys))
        except KVStoreError:
            values = [None] * len(keys)
        chunks = [
            EncodedChunk(
                key, memoryview(value), tier.codecs, None, self._pool, trusted=not tier.verify
            )
            for key, value in zip(keys, values)
            if value is not None
        ]
        recoded: list[EncodedChunk] = []
        for chunk in chunks:
            try:
                recoded.append(await self._recode(chunk, below.codecs))
            except IntegrityError as exc:
                tier.stats.integrity_failures += 1
                tier.note_error("write-back", exc)
        landed = await self._write(below, recoded)
        tier.stats.dropped_writebacks += len(keys) - landed
        for chunk in (*chunks, *recoded):
            chunk.release()

    async def _absent(self, tier: Tier, keys: list[bytes]) -> list[bytes]:
        """The ``keys`` ``tier`` does not hold: not in its index and, for a shared
        tier (whose index after open knows only this store's writes), not there
        when asked, so nothing another process or run wrote is written again."""
        if tier.down is not None:
            return [key for key in keys if key not in tier.index]
        return [key for key, there in zip(keys, await self._in_tier(tier, keys)) if not there]
