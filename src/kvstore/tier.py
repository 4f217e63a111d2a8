"""One tier of a hierarchical store: a driver, its index, limits and counters."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvstore.codecs import Codec, codec_stack, stack_spec
from kvstore.config import TierConfig
from kvstore.driver import Driver
from kvstore.errors import DriverTimeoutError, KVStoreError
from kvstore.eviction import POLICIES, EvictionPolicy

T = TypeVar("T")
log = logging.getLogger("kvstore.store")


@dataclass
class TierStats:
    """Counters of one tier since the store opened."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    evictions: int = 0
    integrity_failures: int = 0
    dropped_writes: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class TierSnapshot:
    """What ``stats()`` reports of one tier."""

    name: str
    url: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    pinned: int
    stats: TierStats


class Tier:
    """A driver as the store uses it.

    ``index`` is the store's view of what the tier holds (keys and sizes, in
    eviction order). For tiers that other writers share, it is a cache of the
    truth and lookups also ask the driver.
    """

    def __init__(self, position: int, config: TierConfig, driver: Driver[Any]) -> None:
        caps = driver.capabilities
        capacity = config.capacity if config.capacity is not None else caps.capacity_bytes
        if capacity is None:
            raise KVStoreError(
                f"tier {config.url!r} needs a capacity: its driver has no hard limit of its own",
                driver=driver.name,
            )
        if caps.capacity_bytes is not None and capacity > caps.capacity_bytes:
            raise KVStoreError(
                f"tier capacity {capacity} exceeds the driver's capacity {caps.capacity_bytes}",
                driver=driver.name,
            )
        self.position = position
        self.config = config
        self.driver = driver
        self.name = config.name or f"{position}:{driver.name}"
        self.capacity = capacity
        self.codecs: tuple[Codec, ...] = codec_stack(config.codecs)
        self.codec_spec = stack_spec(self.codecs)
        self.index: EvictionPolicy = POLICIES[config.eviction]()
        self.stats = TierStats()
        self.shared = caps.shared
        self.reserved = 0
        self.room_lock = asyncio.Lock()

    async def load_index(self) -> None:
        """Fill the index from the driver, for persistent tiers reopened."""
        caps = self.driver.capabilities
        if caps.listable and not caps.shared:
            async for entry in self.driver.list():
                self.index.add(entry.key, entry.size)

    async def call(self, operation: str, awaitable: Awaitable[T]) -> T:
        """Await a driver call within the tier's timeout; errors are counted and re-raised."""
        try:
            return await asyncio.wait_for(awaitable, self.config.timeout_s)
        except asyncio.TimeoutError:
            timeout = DriverTimeoutError(
                f"{operation} took longer than {self.config.timeout_s} s", driver=self.driver.name
            )
            self.note_error(operation, timeout)
            raise timeout from None
        except Exception as exc:
            self.note_error(operation, exc)
            raise

    def note_error(self, operation: str, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.stats.errors[kind] += 1
        log.warning(
            "tier %s: %s failed (%s: %s); treated as a miss", self.name, operation, kind, exc
        )

    def snapshot(self, pinned: set[bytes]) -> TierSnapshot:
        return TierSnapshot(
            name=self.name,
            url=self.driver.config.redacted_url(),
            entries=len(self.index),
            used_bytes=self.index.used_bytes,
            capacity_bytes=self.capacity,
            pinned=sum(1 for key in pinned if key in self.index),
            stats=self.stats,
        )
