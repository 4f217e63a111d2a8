"""One tier of a hierarchical store: a driver, its index, limits and counters."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from kvstore.codecs import Codec, KeyRing, TensorCodec, codec_stack, lossy_spec, stack_spec
from kvstore.config import TierConfig
from kvstore.driver import Driver
from kvstore.errors import ConfigError, DriverTimeoutError, InternalError, KVStoreError
from kvstore.eviction import POLICIES, EvictionPolicy
from kvstore.metrics import OperationTimings
from kvstore.offline import OfflineDriver
from kvstore.results import TierSnapshot, TierStats
from kvstore.sizes import MAX_SIZE

if TYPE_CHECKING:
    from kvstore.keys import Namespace

T = TypeVar("T")
log = logging.getLogger("kvstore.store")

FULL_HOLD_S = 30.0
"""How long a tier whose driver said it was full below ``capacity`` (a disk or a
quota that filled up) is held to what it held then, before the store tries to
fill it to ``capacity`` again."""


class Tier:
    """A driver as the store uses it.

    ``index`` is the store's view of what the tier holds (keys and sizes, in
    eviction order). For tiers that other writers share, it is a cache of the
    truth and lookups also ask the driver.

    Room is counted in the driver's own unit, each value's ``footprint``
    (pages, headers and padding included), as ``index.used_bytes`` plus
    ``reserved`` (puts under way) plus ``held_bytes``: values dropped from the
    index while the store was reading them, which a driver may keep until the
    read ends (a loan from ``borrow_many`` keeps them intact, so it keeps their
    room too), or is still deleting (``delete``). So evictions make real room,
    and puts fit. ``limit`` is ``capacity``, or less for a while after the
    driver said it was full below it (``note_full``).
    """

    def __init__(
        self,
        position: int,
        config: TierConfig,
        driver: Driver[Any],
        *,
        keys: KeyRing | None = None,
    ) -> None:
        """``keys`` are what an ``aesgcm`` stack encrypts with (ConfigError if its key id
        is missing there)."""
        self.position = position
        self.config = config
        self.driver = driver
        self.name = config.name or f"{position}:{driver.name}"
        self.capacity = tier_capacity(config, driver)
        self.codecs: tuple[Codec, ...] = codec_stack(config.codecs, keys or KeyRing())
        self.codec_spec = stack_spec(self.codecs)
        self.index: EvictionPolicy = POLICIES[config.eviction]()
        self.stats = TierStats()
        self.timings = OperationTimings()
        self.down = driver.reason if isinstance(driver, OfflineDriver) else None
        self._adopt(driver)
        self.abandoned: set[asyncio.Future[Any]] = set()
        self._overdue: set[asyncio.Future[Any]] = set()
        self.reserved = 0
        self.held_bytes = 0
        self.write_loan_bytes = 0
        self.room_lock = asyncio.Lock()
        self._reading: Counter[bytes] = Counter()
        self._held: dict[bytes, int] = {}
        self._full_at: int | None = None
        self._full_until = 0.0
        self._bugs_logged: set[tuple[str, str]] = set()

    def attach(self, driver: Driver[Any]) -> None:
        """Serve from ``driver``, just opened for a tier that was down."""
        self.capacity = tier_capacity(self.config, driver)
        self.driver = driver
        self.down = None
        self._adopt(driver)

    def _adopt(self, driver: Driver[Any]) -> None:
        """Take what the store needs to know from ``driver``'s capabilities.

        ``verify``: whether reads check each chunk's payload digest. Mandatory
        for a driver whose bytes cross a process or device boundary; for an
        ``in_process`` one (memory only this process writes, whose chunks were
        digested as they were written) it is the tier's ``verify``, off unless
        set."""
        caps = driver.capabilities
        self.shared = caps.shared
        self.lends_room = caps.lends_room
        in_process = caps.in_process and not caps.shared
        self.verify = not in_process or bool(self.config.verify)
        if self.config.verify is False and self.verify and self.down is None:
            log.warning(
                "tier %s: verify: false is ignored: its bytes cross a process or device "
                "boundary, so reads always verify",
                self.name,
            )

    async def load_index(self) -> None:
        """Fill the index from the driver, for persistent tiers reopened."""
        caps = self.driver.capabilities
        if caps.listable and not caps.shared:
            async for entry in self.driver.list():
                self.index.add(entry.key, self.footprint(entry.size))

    def footprint(self, nbytes: int) -> int:
        """What a value of ``nbytes`` bytes occupies in this tier (``Driver.footprint``)."""
        return self.driver.footprint(nbytes)

    @property
    def limit(self) -> int:
        """The room the store fills this tier to: ``capacity``, or what it held when
        its driver last said it was full, for ``FULL_HOLD_S`` after that."""
        if self._full_at is not None and time.monotonic() < self._full_until:
            return self._full_at
        self._full_at = None
        return self.capacity

    def note_full(self) -> None:
        """The driver refused a put as full though the tier is under ``limit`` (its disk,
        quota or server memory ran out first): hold the tier to what it holds now, so
        later puts evict to make room instead of failing."""
        self._full_at = self.occupied_bytes
        self._full_until = time.monotonic() + FULL_HOLD_S
        log.warning(
            "tier %s: the driver is full at %d of %d bytes; evicting to stay there for %g s",
            self.name,
            self._full_at,
            self.capacity,
            FULL_HOLD_S,
        )

    @property
    def occupied_bytes(self) -> int:
        """Bytes counted against ``capacity``: indexed, reserved and held."""
        return self.index.used_bytes + self.reserved + self.held_bytes

    @contextlib.asynccontextmanager
    async def borrow(self, keys: list[bytes]) -> AsyncIterator[list[memoryview | None]]:
        """``driver.borrow_many(keys)``, each lent key counted as being read until the
        loan has ended (and the driver has let its room go); the others as soon as
        the loan has begun."""
        self._begin_reading(keys)
        lent = keys
        try:
            async with self.driver.borrow_many(keys) as views:
                lent = [key for key, view in zip(keys, views) if view is not None]
                self._end_reading([key for key, view in zip(keys, views) if view is None])
                yield views
        finally:
            self._end_reading(lent)

    def end_write_loan(self, size: int) -> None:
        """A chunk lent to the writes below this tier was let go: ``write_loan_bytes``
        counts the footprints of those still lent."""
        self.write_loan_bytes -= size

    def _begin_reading(self, keys: Sequence[bytes]) -> None:
        self._reading.update(keys)

    def _end_reading(self, keys: Sequence[bytes]) -> None:
        self._reading.subtract(keys)
        for key in dict.fromkeys(keys):
            if self._reading[key] <= 0:
                del self._reading[key]
                self.held_bytes -= self._held.pop(key, 0)

    def forget(self, key: bytes) -> int:
        """Drop ``key`` from the index; its size, or 0 if it was not held. The size
        of a key being read stays counted in ``held_bytes`` until the read ends."""
        size = self.index.remove(key)
        if size and key in self._reading:
            self._held[key] = self._held.get(key, 0) + size
            self.held_bytes += size
        return size

    def record(self, key: bytes, size: int) -> None:
        """Index a value just put; a value of the key it replaced that is being read
        stays counted (``forget``) until the read ends."""
        self.forget(key)
        self.index.add(key, size)

    async def delete(self, keys: list[bytes]) -> list[bool]:
        """``forget`` ``keys`` and delete them from the driver (they stay forgotten
        when the call fails; its error is re-raised). Until the driver is done (past
        a timeout too) they count as being read, so their room stays counted for a read that begins
        meanwhile and still gets a value."""
        self._begin_reading(keys)
        try:
            for key in keys:
                self.forget(key)
            return await self.call("delete_many", self.driver.delete_many(keys), reading=keys)
        finally:
            self._end_reading(keys)

    def victims(self, need: int, pinned: Callable[[bytes], bool]) -> list[tuple[bytes, int]] | None:
        """Keys to evict to free ``need`` bytes, neither pinned nor being read, or
        ``None`` if they cannot free that much."""
        return self.index.victims(need, lambda key: key in self._reading or pinned(key))

    async def call(
        self,
        operation: str,
        awaitable: Awaitable[T],
        *,
        reading: Sequence[bytes] = (),
        settled: Callable[[bool, bool], object] | None = None,
    ) -> T:
        """Await a driver call for at most the tier's ``timeout_s``.

        A call that overruns is abandoned: ``DriverTimeoutError`` is raised at
        the timeout while the call runs to its end in the background (the
        driver's own timeouts bound it); a cancelled caller abandons it the
        same way. What the call was given stays the driver's until it ends:
        ``reading`` keys count as being read until then, and
        ``settled(succeeded, late)`` is called once the driver has let go
        (``late``: after an abandoned call ended, when the caller has long
        gone); only then may buffers the call writes or reads be reused.

        While a call abandoned at its timeout still runs, the tier is stalled:
        a new call is not sent but fails at once with ``DriverTimeoutError``,
        so an operation that needs the tier twice (a lookup, then a read) costs
        its caller one ``timeout_s``, not one per call.

        Errors of the taxonomy are counted and re-raised; anything else is a
        bug, logged and re-raised as ``InternalError`` (``note_bug``).
        """
        if self._overdue:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            if settled is not None:
                settled(False, False)
            stalled = DriverTimeoutError(
                f"{operation} not sent: an earlier call has run past {self.config.timeout_s} s "
                "and is still running",
                driver=self.driver.name,
            )
            self.note_error(operation, stalled)
            raise stalled
        start = time.perf_counter()
        self._begin_reading(reading)
        work = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait([work], timeout=self.config.timeout_s)
        finally:
            if not work.done():
                self._abandon(work, reading, settled)
            self.timings.observe(operation, time.perf_counter() - start)
        if not work.done():
            self._overdue.add(work)
            work.add_done_callback(self._overdue.discard)
            timeout = DriverTimeoutError(
                f"{operation} took longer than {self.config.timeout_s} s", driver=self.driver.name
            )
            self.note_error(operation, timeout)
            raise timeout
        self._settle(work, reading, settled, late=False)
        try:
            return work.result()
        except KVStoreError as exc:
            self.note_error(operation, exc)
            raise
        except Exception as exc:
            raise self.note_bug(operation, exc) from exc

    async def cancel_abandoned(self) -> None:
        """Cancel the abandoned calls still running and wait until they end (at close)."""
        calls = list(self.abandoned)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    def _abandon(
        self,
        work: asyncio.Future[Any],
        reading: Sequence[bytes],
        settled: Callable[[bool, bool], object] | None,
    ) -> None:
        """Keep ``work`` in ``abandoned`` until it ends, then settle it."""
        self.abandoned.add(work)

        def end(done: asyncio.Future[Any]) -> None:
            self.abandoned.discard(done)
            self._settle(done, reading, settled, late=True)

        work.add_done_callback(end)

    def _settle(
        self,
        work: asyncio.Future[Any],
        reading: Sequence[bytes],
        settled: Callable[[bool, bool], object] | None,
        *,
        late: bool,
    ) -> None:
        self._end_reading(reading)
        succeeded = not work.cancelled() and work.exception() is None
        if settled is not None:
            settled(succeeded, late)

    def note_error(self, operation: str, exc: BaseException) -> None:
        """Count a failed call of the error taxonomy (logged, unless the tier is down)."""
        kind = type(exc).__name__
        self.stats.errors[kind] += 1
        if self.down is None:
            log.warning(
                "tier %s: %s failed (%s: %s); treated as a miss", self.name, operation, kind, exc
            )

    def note_bug(self, operation: str, exc: BaseException) -> InternalError:
        """Count an exception outside the error taxonomy (a bug) in ``internal_errors``;
        the first of each kind per operation is logged with its traceback. Returns
        the ``InternalError`` to raise, which callers serve as a miss."""
        kind = type(exc).__name__
        self.stats.internal_errors += 1
        if (operation, kind) not in self._bugs_logged:
            self._bugs_logged.add((operation, kind))
            log.error(
                "tier %s: %s raised %s, outside kvstore's error taxonomy: a bug, served as "
                "a miss (counted in kvstore_internal_errors_total; later ones are not logged)",
                self.name,
                operation,
                kind,
                exc_info=exc,
            )
        return InternalError(f"{operation} raised {kind}: {exc}", driver=self.driver.name)

    def snapshot(self, pinned: frozenset[bytes]) -> TierSnapshot:
        """The tier's state now; safe from any thread (``KVStore.stats``, a metrics
        scrape). ``pinned``: the keys pinned now (``Pins.live``)."""
        return TierSnapshot(
            name=self.name,
            url=self.driver.config.redacted_url(),
            entries=len(self.index),
            used_bytes=self.index.used_bytes,
            capacity_bytes=self.capacity,
            pinned=sum(1 for key in pinned if key in self.index),
            up=self.down is None,
            stats=self.stats,
        )


def tier_capacity(config: TierConfig, driver: Driver[Any]) -> int:
    """The capacity a tier of ``config`` over ``driver`` counts against: the configured
    one, else the driver's own, else no limit for a driver that evicts by itself;
    a KVStoreError if none of these or past the driver's."""
    caps = driver.capabilities
    capacity = config.max_bytes if config.max_bytes is not None else caps.capacity_bytes
    if capacity is None and caps.evicts_itself:
        return MAX_SIZE
    if capacity is None:
        raise KVStoreError(
            f"tier {config.url!r} needs max_bytes: its driver has no hard limit of its own",
            driver=driver.name,
        )
    if caps.capacity_bytes is not None and capacity > caps.capacity_bytes:
        raise KVStoreError(
            f"tier max_bytes {capacity} exceeds the driver's capacity {caps.capacity_bytes}",
            driver=driver.name,
        )
    return capacity


def check_codecs(tiers: Sequence[Tier], namespace: Namespace) -> None:
    """ConfigError unless ``namespace.codec`` names the tiers' one lossy codec (``raw``
    when there is none) and every quantizer can encode ``namespace.layout``.

    Lossy codecs change KV, so keys must say which one did: stores with
    different lossy settings then never share keys on a shared tier.
    """
    lossy = sorted({lossy_spec(tier.codecs) for tier in tiers} - {"raw"})
    if len(lossy) > 1:
        raise ConfigError(f"tiers use different lossy codecs {lossy}: a store has at most one")
    expected = lossy[0] if lossy else "raw"
    if namespace.codec != expected:
        raise ConfigError(
            f"Namespace.codec is {namespace.codec!r} but this store's lossy codec is "
            f"{expected!r}: open it with Namespace(..., codec={expected!r})"
        )
    for tier in tiers:
        for codec in tier.codecs:
            if isinstance(codec, TensorCodec):
                codec.check_layout(namespace.layout)
