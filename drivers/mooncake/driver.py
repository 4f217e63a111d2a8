"""The ``mooncake`` driver: values in a Mooncake distributed store (master + transfer engine).

``mooncake://10.0.0.5:50051?global_segment_size=4GiB&protocol=rdma`` connects a
Mooncake store client to the master at 10.0.0.5:50051; the client mounts
``global_segment_size`` of this host's memory into the cluster's pool and
moves values over TCP or RDMA (docs/drivers/mooncake.md).

The store is a cache: the master evicts objects whose read leases expired once
memory passes its high watermark, and a segment's objects vanish with the
client that mounted it. Blocking client calls run on a pool of ``io_threads``
threads; a batch is cut into groups that go out as parallel batch calls. A
value that does not lie in memory registered with ``register_memory`` is copied
through a staging lease of the client's registered local buffer.

A reader never sees a mix of two values written through this driver: a
same-size upsert rewrites the object in place, so reads and writes of a key
take the same lock stripe (see ``_STRIPES``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, ClassVar, TypeVar

from typing_extensions import Buffer, Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage, as_byte_view, fill_into
from kvstore.errors import (
    CapacityError,
    DriverTimeoutError,
    DriverUnavailableError,
    InvalidArgumentError,
    KVStoreError,
    NotSupportedError,
    TransientError,
)
from kvstore.inflight import CallLease, gather_all
from kvstore.sizes import format_size
from kvstore.threaded import DriverThreads

from . import status
from .client import (
    CONNECTIONS,
    GROUP_KEYS,
    PAD,
    ClientSettings,
    MooncakeClient,
    Result,
    group_indices,
    local_address,
)
from .config import MooncakeConfig
from .memory import Region, Regions, address_of

log = logging.getLogger(__name__)

T = TypeVar("T")

_STRIPES = 4096
"""Lock stripes; a call locks the stripes of its keys (sorted, so calls never deadlock)."""

_LEASE_POLL_S = (0.05, 0.5)
"""First and longest pause between deletes of keys a read lease still holds."""

_STATIC = Capabilities(persistent=False, listable=False, lends_views=True, shared=True)


class MooncakeDriver(Driver[MooncakeConfig]):
    """Values as objects of a Mooncake store; a shared, evicting cache."""

    config_type: ClassVar[type[DriverConfig]] = MooncakeConfig
    static_capabilities: ClassVar[Capabilities] = _STATIC

    def __init__(self, config: MooncakeConfig, client: MooncakeClient) -> None:
        super().__init__(config)
        self._client = client
        self._threads = DriverThreads(config.scheme, config.io_threads, _client_failure)
        self._stripes = [asyncio.Lock() for _ in range(_STRIPES)]
        self._regions = Regions()
        self._loans: set[_Loan] = set()
        self._limit = config.value_limit
        self._group_bytes = config.group_bytes
        self._capabilities = Capabilities(
            persistent=False,
            listable=False,
            lends_views=True,
            shared=True,
            max_value_bytes=self._limit,
            details=(
                ("master", config.master),
                ("protocol", config.protocol),
                ("replicas", str(config.replicas)),
                ("segment", format_size(config.global_segment_size)),
                (
                    "zero_copy",
                    "values in memory given to register_memory; others are copied once "
                    "through registered staging leases",
                ),
                ("loans", "values fetched into registered leases, held until the loan ends"),
                ("evicts", "the master evicts objects whose read leases expired"),
            ),
        )

    @classmethod
    async def open(cls, config: MooncakeConfig) -> Self:
        """Set up (or share) a client of the master, bounded by ``connect_timeout``."""
        pending: concurrent.futures.Future[MooncakeClient] = concurrent.futures.Future()
        threading.Thread(
            target=_connect, args=(config, pending), name="kvstore-mooncake-connect", daemon=True
        ).start()
        try:
            client = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(pending)), config.connect_timeout
            )
        except asyncio.TimeoutError:
            pending.add_done_callback(partial(_release_late_client, config.linger))
            raise DriverUnavailableError(
                f"no Mooncake client of the master at {config.master} was set up within "
                f"connect_timeout={config.connect_timeout} s; is the master running?",
                driver=config.scheme,
            ) from None
        return cls(config, client)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def footprint(self, nbytes: int) -> int:
        """The value and its pad byte: what the master allocates for the object."""
        return nbytes + PAD

    async def register_memory(self, buffer: Buffer) -> None:
        """Register a buffer with the transfer engine, so puts of values inside it and
        gets into targets inside it skip the staging copy. The buffer must stay alive
        and in place until ``unregister_memory`` or ``close``; regions must not overlap.
        A put reads one byte past the value (the pad): values ending at the region's
        very end are staged."""
        self._check_open()
        view = as_byte_view(buffer, self.name)
        start = address_of(view)
        if not start or self._regions.overlaps(start, start + len(view)):
            raise InvalidArgumentError(
                "register_memory takes a non-empty buffer not overlapping a registered one",
                driver=self.name,
            )
        (code,) = await self._run([partial(self._client.register, start, len(view))])
        if code != status.OK:
            raise self._failure(code, f"registering {len(view)} bytes")
        self._regions.add(Region(start, start + len(view), view))

    async def unregister_memory(self, buffer: Buffer) -> None:
        """Undo ``register_memory`` for the same buffer; no call may be using it."""
        self._check_open()
        region = self._regions.remove(address_of(as_byte_view(buffer, self.name)))
        if region is None:
            raise InvalidArgumentError("this buffer is not registered", driver=self.name)
        (code,) = await self._run([partial(self._client.unregister, region.start)])
        if code != status.OK:
            raise self._failure(code, "unregistering memory")

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        latest = dict(items)
        largest = max(len(value) for value in latest.values())
        if largest > self._limit:
            raise CapacityError(
                f"a value of {largest} bytes exceeds max_value_bytes={self._limit} "
                "(set by local_buffer_size, global_segment_size and max_value)",
                driver=self.name,
            )
        keys = list(latest)
        values = list(latest.values())
        names = [self._object_name(key) for key in keys]
        direct = self._registered([(value, len(value) + PAD) for value in values])
        jobs: list[Callable[[], list[int]]] = []
        guard = CallLease()
        sizes = [len(value) + PAD for value in values]
        for group in group_indices(
            [i for i in range(len(keys)) if direct[i]], sizes, self._group_bytes
        ):
            addresses = [address_of(values[i]) for i in group]
            jobs.append(
                partial(
                    self._client.put_direct,
                    [names[i] for i in group],
                    addresses,
                    [sizes[i] for i in group],
                )
            )
        staged = [i for i in range(len(keys)) if not direct[i]]
        for group in group_indices(staged, sizes, self._group_bytes):
            jobs.append(
                partial(
                    self._client.put_staged,
                    [names[i] for i in group],
                    [values[i] for i in group],
                    guard,
                )
            )
        outcomes = await self._run(jobs, keys=keys, guard=guard)
        failed = next((code for codes in outcomes for code in codes if code != status.OK), None)
        if failed is not None:
            raise self._failure(failed, f"storing {len(keys)} values")

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        targets: list[memoryview | None] = [None] * len(keys) if into is None else into
        names = [self._object_name(key) for key in keys]
        first: dict[bytes, int] = {}
        direct: list[int] = []
        staged: list[int] = []
        sized: list[int] = []
        present: dict[int, memoryview] = {}
        for index, target in enumerate(targets):
            if first.setdefault(keys[index], index) != index:
                continue
            if target is None:
                sized.append(index)
                continue
            present[index] = target
            if len(self._regions) and self._regions.holds(address_of(target), len(target)):
                direct.append(index)
            else:
                staged.append(index)
        hints = [PAD + (0 if t is None else min(len(t), self._limit)) for t in targets]
        groups: list[list[int]] = []
        jobs: list[Callable[[], list[Result]]] = []
        guard = CallLease()
        for group in group_indices(direct, hints, self._group_bytes):
            jobs.append(
                partial(
                    self._client.get_direct,
                    [names[i] for i in group],
                    [present[i] for i in group],
                    guard,
                )
            )
            groups.append(group)
        for group in group_indices(staged, hints, self._group_bytes):
            jobs.append(
                partial(
                    self._client.get_staged,
                    [names[i] for i in group],
                    [present[i] for i in group],
                    guard,
                    self._limit,
                )
            )
            groups.append(group)
        for start in range(0, len(sized), GROUP_KEYS):
            group = sized[start : start + GROUP_KEYS]
            jobs.append(
                partial(
                    self._client.get_sized,
                    [names[i] for i in group],
                    [None] * len(group),
                    guard,
                )
            )
            groups.append(group)
        outcomes = await self._run(jobs, keys=keys, guard=guard)
        values: list[memoryview | None] = [None] * len(keys)
        for group, results in zip(groups, outcomes):
            for index, result in zip(group, results):
                if isinstance(result, int):
                    raise self._failure(result, f"reading {len(keys)} values")
                values[index] = result
        for index, key in enumerate(keys):
            value = values[first[key]]
            if index != first[key] and value is not None:
                values[index] = fill_into(value, targets[index])
        return values

    def _borrow_many(
        self, keys: list[bytes]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        return _Loan(self, keys)

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        names = [self._object_name(key) for key in keys]
        groups = [
            list(range(start, min(start + 4 * GROUP_KEYS, len(names))))
            for start in range(0, len(names), 4 * GROUP_KEYS)
        ]
        outcomes = await self._run(
            [partial(self._client.exist, [names[i] for i in group]) for group in groups]
        )
        found: list[bool] = []
        for codes in outcomes:
            for code in codes:
                if code < 0:
                    raise self._failure(code, f"looking up {len(keys)} keys")
                found.append(code == 1)
        return found

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        """Delete each distinct key once; keys a read lease holds are tried again until
        ``lease_wait`` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.lease_wait
        distinct = list(dict.fromkeys(keys))
        deleted: dict[bytes, bool] = {}
        pending = distinct
        pause = _LEASE_POLL_S[0]
        while True:
            names = [self._object_name(key) for key in pending]
            outcomes = await self._run(
                [
                    partial(
                        self._client.remove,
                        names[start : start + 4 * GROUP_KEYS],
                        self.config.force_delete,
                    )
                    for start in range(0, len(names), 4 * GROUP_KEYS)
                ]
            )
            leased: list[bytes] = []
            for key, code in zip(pending, (code for codes in outcomes for code in codes)):
                if code == status.OK:
                    deleted[key] = True
                elif code in status.ABSENT:
                    deleted[key] = False
                elif code == status.OBJECT_HAS_LEASE:
                    leased.append(key)
                else:
                    raise self._failure(code, f"deleting {len(distinct)} keys")
            if not leased:
                break
            if loop.time() + pause > deadline:
                raise TransientError(
                    f"{len(leased)} of {len(distinct)} keys are still held by read leases after "
                    f"lease_wait={self.config.lease_wait} s; the master refuses to delete an "
                    "object until its lease (default_kv_lease_ttl) expires",
                    driver=self.name,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LEASE_POLL_S[1])
            pending = leased
        seen: set[bytes] = set()
        answers: list[bool] = []
        for key in keys:
            answers.append(deleted[key] and key not in seen)
            seen.add(key)
        return answers

    async def _list(self) -> AsyncIterator[KeyEntry]:
        """Nothing: the Mooncake client has no call that enumerates keys (listable=False)."""
        listed: list[KeyEntry] = []
        for entry in listed:
            yield entry

    async def _usage(self) -> Usage:
        """The whole store's keys and allocated bytes, from the master's metrics: shared
        by every client and prefix, pads and allocator rounding included."""
        port = self.config.metrics_port
        if port is None:
            raise NotSupportedError(
                "usage needs the master's metrics_port in the URL", driver=self.name
            )
        host = self.config.master_host
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        (metrics,) = await self._run([partial(_read_metrics, url, self.config.op_timeout)])
        if metrics is None:
            raise DriverUnavailableError(
                f"the master's metrics at {url} cannot be read (metrics_port={port})",
                driver=self.name,
            )
        return Usage(
            entries=metrics.get("master_key_count", 0),
            bytes=metrics.get("master_allocated_bytes", 0),
            capacity_bytes=None,
        )

    async def _close(self) -> None:
        """Wait for calls in flight (bounded), end open loans, unregister memory and hand
        the shared client back (it closes ``linger`` seconds after its last driver)."""
        finished = await self._threads.close(timeout=self.config.op_timeout)
        for loan in list(self._loans):
            log.warning("mooncake: closed with a loan still open; its views are now invalid")
            loan.release()
        if not finished:
            log.warning("mooncake: client calls still running at close; the client stays set up")
            return
        await asyncio.to_thread(self._shut_down, list(self._regions))

    def _shut_down(self, regions: list[Region]) -> None:
        for region in regions:
            self._client.unregister(region.start)
        CONNECTIONS.release(self._client.connection.settings, linger=self.config.linger)

    def _object_name(self, key: bytes) -> str:
        return self.config.prefix + key.hex()

    def _registered(self, spans: Sequence[tuple[memoryview, int]]) -> list[bool]:
        """For each (buffer, bytes used from its start): inside a registered region?"""
        if not len(self._regions):
            return [False] * len(spans)
        return [self._regions.holds(address_of(view), size) for view, size in spans]

    def _failure(self, code: int, what: str) -> KVStoreError:
        if code in status.UNREACHABLE:
            self._client.connection.suspect = True
        return status.failure(code, what, master=self.config.master, driver=self.name)

    async def _run(
        self,
        jobs: Sequence[Callable[[], T]],
        *,
        keys: Iterable[bytes] = (),
        guard: CallLease | None = None,
    ) -> list[T]:
        """Run blocking jobs on the worker threads, holding the lock stripes of ``keys``
        until every job has ended (even one whose caller gave up), all within
        ``op_timeout``. Jobs touch the caller's buffers only through ``guard``, which a
        timeout or cancellation revokes, so the call ends then without waiting for them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.op_timeout
        held = await self._lock(sorted({hash(key) % _STRIPES for key in keys}), deadline)
        return await self._threads.complete(
            self._batch(jobs, held),
            operation=f"a call within op_timeout={self.config.op_timeout} s",
            lease=guard or CallLease(),
            timeout=max(0.0, deadline - loop.time()),
        )

    async def _batch(self, jobs: Sequence[Callable[[], T]], held: list[int]) -> list[T]:
        try:
            return await gather_all([self._threads.run(self._client.call, job) for job in jobs])
        finally:
            self._unlock(held)

    async def _lock(self, stripes: list[int], deadline: float) -> list[int]:
        loop = asyncio.get_running_loop()
        held: list[int] = []
        try:
            for stripe in stripes:
                lock = self._stripes[stripe]
                if lock.locked():
                    await asyncio.wait_for(lock.acquire(), max(0.0, deadline - loop.time()))
                else:
                    await lock.acquire()
                held.append(stripe)
        except asyncio.TimeoutError:
            self._unlock(held)
            raise DriverTimeoutError(
                f"keys stayed locked by other calls past op_timeout={self.config.op_timeout} s",
                driver=self.name,
            ) from None
        except BaseException:
            self._unlock(held)
            raise
        return held

    def _unlock(self, held: list[int]) -> None:
        for stripe in held:
            self._stripes[stripe].release()


class _Loan:
    """Values fetched into one registered lease and lent read-only for one ``async with``;
    the lease is released, and the views void, when the block exits."""

    def __init__(self, driver: MooncakeDriver, keys: list[bytes]) -> None:
        self._driver = driver
        self._keys = keys
        self._lease: Any = None

    async def __aenter__(self) -> list[memoryview | None]:
        driver = self._driver
        distinct = list(dict.fromkeys(self._keys))
        names = [driver._object_name(key) for key in distinct]
        ((views, lease),) = await driver._run(
            [partial(driver._client.borrow, names)], keys=distinct
        )
        if lease is not None:
            self._lease = lease
            driver._loans.add(self)
        lent = dict(zip(distinct, views))
        return [lent[key] for key in self._keys]

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            self._driver._loans.discard(self)
            lease.release()


def _connect(config: MooncakeConfig, result: concurrent.futures.Future[MooncakeClient]) -> None:
    """Get this config's client (on a thread of its own: a setup blocks, for long when
    no master answers)."""
    try:
        settings = ClientSettings(
            master=config.master,
            metadata=config.metadata,
            protocol=config.protocol,
            device_name=config.device_name,
            local_hostname=config.local_hostname or local_address(config.master),
            global_segment_size=config.global_segment_size,
            local_buffer_size=config.local_buffer_size,
        )
        connection = CONNECTIONS.acquire(settings, config.scheme, config.connect_timeout)
    except BaseException as exc:
        result.set_exception(
            exc
            if isinstance(exc, KVStoreError)
            else DriverUnavailableError(
                f"cannot set up a Mooncake client of {config.master}: {exc}", driver=config.scheme
            )
        )
    else:
        result.set_result(
            MooncakeClient(
                connection,
                replicas=config.replicas,
                lease_timeout=config.op_timeout,
                driver=config.scheme,
            )
        )


def _release_late_client(linger: float, future: concurrent.futures.Future[MooncakeClient]) -> None:
    """Hand back a client whose setup finished after ``open`` gave up on it."""
    if not future.cancelled() and future.exception() is None:
        CONNECTIONS.release(future.result().connection.settings, linger=linger)


def _client_failure(exc: Exception, operation: str) -> KVStoreError:
    """The driver's ErrorMap: whatever the Mooncake client raises may pass on a retry."""
    return TransientError(
        f"the Mooncake client failed: {type(exc).__name__}: {exc}", driver=MooncakeConfig.scheme
    )


def _read_metrics(url: str, timeout: float) -> dict[str, int] | None:
    """The integer samples of the master's Prometheus metrics, ``None`` if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    metrics: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name and not name.startswith("#") and value.strip().isdigit():
            metrics[name] = int(value)
    return metrics
