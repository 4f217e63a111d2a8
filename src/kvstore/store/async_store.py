"""The store's async API, on one event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvstore.buffers import BufferPool
from kvstore.codecs import KeyRing
from kvstore.config import StoreConfig, TierConfig
from kvstore.driver import Driver
from kvstore.errors import (
    ConfigError,
    KVStoreError,
)
from kvstore.host_copy import serial_torch_thread
from kvstore.keys import (
    Namespace,
    TokenIds,
)
from kvstore.metrics import StoreMetrics, timed
from kvstore.offline import OfflineDriver
from kvstore.pins import Clock, Pins
from kvstore.registry import open_driver
from kvstore.results import (
    ChunkTiers,
    LookupResult,
    ScopeCounters,
)
from kvstore.store.health import HealthReports
from kvstore.store.queue import QueueBudget, WriteJob
from kvstore.tier import Tier

log = logging.getLogger("kvstore.store")


RECONNECT_FIRST_S = 0.5

RECONNECT_MAX_S = 30.0
"""A tier down at open is retried after RECONNECT_FIRST_S, then at doubling intervals
up to RECONNECT_MAX_S."""


class AsyncKVStore(HealthReports):
    """A hierarchical KV store; every method runs on the event loop that opened it."""

    def __init__(
        self,
        config: StoreConfig,
        namespace: Namespace,
        tiers: list[Tier],
        *,
        keys: KeyRing | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if namespace.chunk_tokens != config.chunk_tokens or namespace.tenant != config.tenant:
            raise ConfigError("the namespace's chunk_tokens and tenant must match the store config")
        self.config = config
        self.tiers = tiers
        self._keys = keys if keys is not None else config.keyring()
        self._root = self
        self._scopes: dict[bytes, ScopeCounters] = {}
        self._bind(namespace)
        self._pins = Pins(clock)
        self._sweeper: asyncio.Task[None] | None = None
        self._pool = BufferPool(
            max_bytes=config.queue_bytes + (config.read_ahead + 1) * config.io_batch_bytes
        )
        self._executor = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="kvstore-codec", initializer=serial_torch_thread
        )
        self._budget = QueueBudget(config.queue_bytes)
        self._queues: list[asyncio.Queue[WriteJob]] = [asyncio.Queue() for _ in tiers]
        self._writers = [
            asyncio.create_task(self._writer(tier, queue), name=f"kvstore-writer-{tier.name}")
            for tier, queue in zip(tiers, self._queues)
        ]
        self._reconnects = [
            asyncio.create_task(self._reconnect(tier), name=f"kvstore-reconnect-{tier.name}")
            for tier in tiers
            if tier.down is not None
        ]
        self._closed = False
        self.metrics = StoreMetrics(
            config.name,
            tiers,
            chunk_tokens=self.chunk_tokens,
            queue_limit=config.queue_bytes,
            stats=self.stats,
            queue_depths=lambda: [queue.qsize() for queue in self._queues],
        )

    @classmethod
    async def open(
        cls,
        config: StoreConfig,
        namespace: Namespace,
        *,
        drivers: Sequence[Driver[Any]] | None = None,
        clock: Clock = time.monotonic,
    ) -> AsyncKVStore:
        """Open every tier's driver and load the indexes of persistent tiers.

        A tier below the first whose driver cannot be reached (a retryable
        error) and is not ``required`` starts down: it serves misses and takes
        no writes while the store retries it in the background.

        ``drivers``, one per tier, are used instead of opening the tier URLs
        (for drivers built in code, such as fault-injection wrappers); the
        store closes them when it closes. ``clock`` times pin deadlines (a test
        advances one instead of sleeping).
        """
        if drivers is not None and len(drivers) != len(config.tiers):
            raise ConfigError(f"{len(drivers)} drivers given for {len(config.tiers)} tiers")
        tiers: list[Tier] = []
        keys = config.keyring()
        try:
            for position, tier_config in enumerate(config.tiers):
                driver = (
                    drivers[position]
                    if drivers is not None
                    else await _open_tier_driver(position, tier_config)
                )
                try:
                    tier = Tier(position, tier_config, driver, keys=keys)
                except KVStoreError:
                    await driver.close()
                    raise
                tiers.append(tier)
                await tier.load_index()
            return cls(config, namespace, tiers, keys=keys, clock=clock)
        except BaseException:
            for tier in tiers:
                await tier.driver.close()
            raise

    async def _reconnect(self, tier: Tier) -> None:
        """Open the driver of a tier that is down, retrying with exponential backoff,
        and serve from it once it opens."""
        delay = RECONNECT_FIRST_S
        while tier.down is not None:
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX_S)
            try:
                driver = await open_driver(tier.config.url)
            except KVStoreError as exc:
                tier.down = str(exc)
                if not exc.retryable:
                    log.error("tier %s stays down: %s", tier.name, exc)
                    return
                continue
            try:
                tier.attach(driver)
                await tier.load_index()
            except KVStoreError as exc:
                tier.down = str(exc)
                await driver.close()
                log.error("tier %s stays down: %s", tier.name, exc)
                return
            log.warning("tier %s is up again", tier.name)

    @timed("locate")
    async def locate(self, keys: Sequence[bytes]) -> ChunkTiers:
        """The tier of each chunk of the cached prefix of ``keys`` (from ``named_keys``)."""
        located = await self._locate(self._own_keys(keys))
        asked, found = len(keys) * self.chunk_tokens, len(located) * self.chunk_tokens
        self.metrics.count_prefix("locate", asked, found)
        self._counters.note_lookup(asked, found)
        return ChunkTiers((self.tiers[t].name for t in located), self.chunk_tokens)

    @timed("lookup")
    async def lookup(self, tokens: TokenIds) -> LookupResult:
        """How many leading tokens are cached, and in which tier each chunk is."""
        keys = self.keys(tokens)
        located = await self._locate(keys)
        self.metrics.count_prefix(
            "lookup", len(keys) * self.chunk_tokens, len(located) * self.chunk_tokens
        )
        self._counters.note_lookup(len(keys) * self.chunk_tokens, len(located) * self.chunk_tokens)
        return LookupResult(
            tokens=len(located) * self.chunk_tokens,
            chunk_tiers=tuple(self.tiers[t].name for t in located),
        )

    @timed("contains")
    async def contains(self, tokens: TokenIds) -> list[bool]:
        """For each whole chunk of ``tokens``: is it held by any tier?"""
        return [where is not None for where in await self._where(self.keys(tokens))]

    async def close(self) -> None:
        """Finish background writes, then close every driver (a view: nothing)."""
        if self._closed or self._root is not self:
            return
        await self.flush()
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for reconnect in self._reconnects:
            reconnect.cancel()
        await asyncio.gather(*self._reconnects, return_exceptions=True)
        self.metrics.close()
        for writer in self._writers:
            writer.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)
        for tier in self.tiers:
            await tier.cancel_abandoned()
            await tier.driver.close()
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> AsyncKVStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _open_tier_driver(position: int, config: TierConfig) -> Driver[Any]:
    """The driver of a tier; for a tier below the first that is not ``required``, an
    ``OfflineDriver`` in place of one that cannot be reached now."""
    try:
        return await open_driver(config.url)
    except KVStoreError as exc:
        if position == 0 or config.required or not exc.retryable:
            raise
        log.warning(
            "tier %d (%s) is down at open: %s; it serves misses and is retried in the background",
            position,
            exc.driver,
            exc,
        )
        return OfflineDriver.standing_in(config.url, config.max_bytes, str(exc))
