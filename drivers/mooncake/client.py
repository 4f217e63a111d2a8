"""The blocking side of the mooncake driver: Mooncake store clients, shared per
process and connection settings, and the calls the driver's worker threads make.

Each object is a value followed by ``PAD`` bytes, because Mooncake refuses
zero-length objects; readers drop the pad. Values move with the client's
pointer calls (``batch_upsert_from``, ``batch_get_into``): straight from or
into caller memory registered with the transfer engine, else through leases of
the client's own registered local buffer (``mooncake.store.BufferPool``), one
lease per call, so no thread ever holds one lease while waiting for another.
Calls answer with per-key status codes (status.py); the async side maps them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mooncake.store import BufferPool, MooncakeDistributedStore, ReplicateConfig

from kvstore.errors import DriverUnavailableError, TransientError
from kvstore.inflight import CallLease

from .memory import address_of, copy, fresh_buffer, view_at
from .status import ABSENT, INVALID_PARAMS, OK, RETRY, UNREACHABLE, failure

PAD = 1
"""Bytes stored after every value (Mooncake has no empty objects); ignored on read."""

ATTEMPTS = 3
"""Tries of a key whose status is in ``RETRY`` (or whose size changed under a read)."""

RETRY_PAUSE_S = 0.02
"""Pause before the second try; the third waits twice as long."""

GROUP_KEYS = 256
"""At most this many keys in one batch call of the client."""

Result = memoryview | None | int
"""What a read gives per key: the value, ``None`` for a miss, or a negative status code."""


MASTER_UNREACHABLE = 2
"""What ``health_check`` answers while the client's pings of the master fail."""

PROBE_TIMEOUT_S = 1.0
"""How long a probe of a master thought down waits for its port to accept."""

CLOSE_RECHECK_S = 30.0
"""How often an idle client whose master is down checks whether it can close."""

T = TypeVar("T")


@dataclass(frozen=True)
class ClientSettings:
    """What ``MooncakeDistributedStore.setup`` takes: one client per distinct value."""

    master: str
    metadata: str
    protocol: str
    device_name: str
    local_hostname: str
    global_segment_size: int
    local_buffer_size: int


class Connection:
    """A set-up Mooncake store client and its staging pool, shared by every driver of
    this process with the same settings (``Connections``)."""

    def __init__(self, store: Any, settings: ClientSettings) -> None:
        self.store = store
        self.pool = BufferPool(store, block_on_exhaustion=True)
        self.settings = settings
        self.suspect = False
        """Set when a call found the master unreachable, cleared once it answers again."""

    def master_answers(self, timeout: float) -> bool:
        """Whether the master's RPC port accepts a TCP connection within ``timeout``."""
        try:
            _knock(self.settings.master, timeout)
        except OSError:
            return False
        return True

    @classmethod
    def open(cls, settings: ClientSettings, driver: str, timeout: float) -> Connection:
        """Set up a client: start its transfer engine, mount its segment, register its
        local buffer. The master is probed first, within ``timeout``: a setup with no
        master answering retries for a minute and more, holding the GIL."""
        try:
            _knock(settings.master, timeout)
        except OSError as exc:
            raise DriverUnavailableError(
                f"the Mooncake master at {settings.master} cannot be reached: {exc}",
                driver=driver,
            ) from None
        store = MooncakeDistributedStore()
        code = store.setup(
            settings.local_hostname,
            settings.metadata,
            settings.global_segment_size,
            settings.local_buffer_size,
            settings.protocol,
            settings.device_name,
            settings.master,
        )
        if code != OK:
            store.close()
            raise DriverUnavailableError(
                f"cannot set up a Mooncake client of the master at {settings.master} "
                f"(metadata {settings.metadata!r}, protocol {settings.protocol}, this host "
                f"{settings.local_hostname}): setup returned {code}; the client's log says why",
                driver=driver,
            )
        return cls(store, settings)

    def close(self) -> None:
        """Free the staging pool, unmount the segment (its objects are gone) and stop the
        transfer engine. The client holds the GIL for seconds while its threads wind down."""
        try:
            self.pool.close()
        finally:
            self.store.close()


@dataclass
class _Entry:
    users: int = 0
    connection: Connection | None = None
    connecting: threading.Lock = field(default_factory=threading.Lock)
    closer: threading.Timer | None = None


class Connections:
    """The process's Mooncake clients, one per ``ClientSettings``, counted by users.

    Setting a client up takes up to a second, and closing one holds the GIL
    for seconds, so drivers of one configuration share a client, and an unused
    one lingers a while for the next driver before it is closed on a timer
    thread. Clients still idle at exit are left to the master, which drops a
    vanished client's segment after its ``client_ttl``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[ClientSettings, _Entry] = {}

    def acquire(self, settings: ClientSettings, driver: str, timeout: float) -> Connection:
        """The client of ``settings``, set up by the first user (the others wait);
        ``timeout`` bounds the probe of the master before a setup."""
        with self._lock:
            entry = self._entries.setdefault(settings, _Entry())
            entry.users += 1
            if entry.closer is not None:
                entry.closer.cancel()
                entry.closer = None
        try:
            with entry.connecting:
                if entry.connection is None:
                    entry.connection = Connection.open(settings, driver, timeout)
                return entry.connection
        except BaseException:
            self.release(settings, linger=0.0)
            raise

    def release(self, settings: ClientSettings, *, linger: float) -> None:
        """One user fewer; the last one leaves the client to close ``linger`` seconds later."""
        with self._lock:
            entry = self._entries[settings]
            entry.users -= 1
            if not entry.users:
                self._schedule(settings, entry, linger)

    def close_idle(self) -> None:
        """Close now every client no driver uses (each close holds the GIL for seconds);
        for a process shutting down while its masters still answer."""
        with self._lock:
            idle = [
                (settings, entry) for settings, entry in self._entries.items() if not entry.users
            ]
            for settings, entry in idle:
                if entry.closer is not None:
                    entry.closer.cancel()
                    entry.closer = None
                del self._entries[settings]
        for _, entry in idle:
            with entry.connecting:
                if entry.connection is not None:
                    entry.connection.close()

    def _schedule(self, settings: ClientSettings, entry: _Entry, delay: float) -> None:
        entry.closer = threading.Timer(delay, self._expire, (settings, entry))
        entry.closer.daemon = True
        entry.closer.name = "kvstore-mooncake-close"
        entry.closer.start()

    def _expire(self, settings: ClientSettings, entry: _Entry) -> None:
        """Close an idle client, once its master answers: closing unmounts the segment
        by RPC, which with the master down blocks the interpreter for many seconds."""
        connection = entry.connection
        answers = connection is None or connection.master_answers(PROBE_TIMEOUT_S)
        with self._lock:
            if entry.users or self._entries.get(settings) is not entry:
                return
            if not answers:
                self._schedule(settings, entry, CLOSE_RECHECK_S)
                return
            del self._entries[settings]
        with entry.connecting:
            if entry.connection is not None:
                entry.connection.close()


CONNECTIONS = Connections()


class MooncakeClient:
    """One driver's use of a shared ``Connection``: its replica count, lease timeout and
    name; thread-safe."""

    def __init__(
        self, connection: Connection, *, replicas: int, lease_timeout: float, driver: str
    ) -> None:
        self.connection = connection
        self._store = connection.store
        self._pool = connection.pool
        self._lease_timeout = lease_timeout
        self._driver = driver
        self._replicate = ReplicateConfig()
        self._replicate.replica_num = replicas

    def call(self, job: Callable[[], T]) -> T:
        """Run ``job``, unless the master is known to be down and still refuses
        connections: a call to a dead master takes the client seconds to give up, so
        once one found it unreachable (or the client's own pings fail), later calls
        first probe its port and fail at once while nothing answers."""
        connection = self.connection
        if connection.suspect or self._store.health_check() == MASTER_UNREACHABLE:
            if not connection.master_answers(PROBE_TIMEOUT_S):
                raise DriverUnavailableError(
                    f"the Mooncake master at {connection.settings.master} cannot be reached",
                    driver=self._driver,
                )
            connection.suspect = False
        return job()

    def put_staged(self, names: list[str], values: list[memoryview], guard: CallLease) -> list[int]:
        """Copy values into one staging lease (each with its pad) and upsert them."""
        sizes = [len(value) + PAD for value in values]
        lease = self._lease(sum(sizes))
        try:
            pointers = _offsets(lease.ptr, sizes)
            for pointer, value in zip(pointers, values):
                with guard.touching():
                    copy(pointer, address_of(value), len(value))
                ctypes.memset(pointer + len(value), 0, PAD)
            return self._upsert(names, pointers, sizes)
        finally:
            lease.release()

    def put_direct(self, names: list[str], addresses: list[int], sizes: list[int]) -> list[int]:
        """Upsert values straight from registered memory; ``sizes`` include the pad."""
        return self._upsert(names, addresses, sizes)

    def get_direct(
        self, names: list[str], targets: list[memoryview], guard: CallLease
    ) -> list[Result]:
        """Read values straight into registered targets; those that do not fit are
        read again through staging, into a fresh buffer."""
        pointers = [address_of(target) for target in targets]
        codes = self._read(names, pointers, [len(target) for target in targets])
        results: list[Result] = [None] * len(names)
        larger: list[int] = []
        for index, code in enumerate(codes):
            if code >= PAD:
                results[index] = targets[index][: code - PAD]
            elif code == INVALID_PARAMS:
                larger.append(index)
            else:
                results[index] = _miss_or_error(code)
        self._read_larger(names, targets, larger, results, guard)
        return results

    def get_staged(
        self, names: list[str], targets: list[memoryview], guard: CallLease, limit: int
    ) -> list[Result]:
        """Read values through one staging lease sized by the targets (a value that fits
        its target fits the lease) and copy each into its target."""
        sizes = [min(len(target), limit) + PAD for target in targets]
        results: list[Result] = [None] * len(names)
        larger: list[int] = []
        lease = self._lease(sum(sizes))
        try:
            pointers = _offsets(lease.ptr, sizes)
            codes = self._read(names, pointers, sizes)
            for index, (pointer, code) in enumerate(zip(pointers, codes)):
                if code >= PAD:
                    target = targets[index]
                    with guard.touching():
                        copy(address_of(target), pointer, code - PAD)
                    results[index] = target[: code - PAD]
                elif code == INVALID_PARAMS:
                    larger.append(index)
                else:
                    results[index] = _miss_or_error(code)
        finally:
            lease.release()
        self._read_larger(names, targets, larger, results, guard)
        return results

    def get_sized(
        self, names: list[str], targets: Sequence[memoryview | None], guard: CallLease
    ) -> list[Result]:
        """Read values of unknown size: ask each size, read through a lease of their
        sum, and copy each into its target where it fits, else into a fresh buffer."""
        results: list[Result] = [None] * len(names)
        pending = list(range(len(names)))
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(RETRY_PAUSE_S * attempt)
            sizes: dict[int, int] = {}
            for index in pending:
                size = self._store.get_size(names[index])
                if size >= PAD:
                    sizes[index] = size
                else:
                    results[index] = _miss_or_error(size)
            pending = self._read_sized(names, targets, sizes, results, guard)
            if not pending:
                return results
        for index in pending:
            results[index] = INVALID_PARAMS
        return results

    def borrow(self, names: list[str]) -> tuple[list[memoryview | None], Any]:
        """Read values into one lease without waiting for it; read-only views of them
        and the lease, which the caller releases when the loan ends (``None`` where
        nothing was read, and no lease when nothing was)."""
        sizes = [self._store.get_size(name) for name in names]
        unreachable = next((size for size in sizes if size in UNREACHABLE), None)
        if unreachable is not None:
            self.connection.suspect = True
            raise failure(
                unreachable,
                f"lending {len(names)} values",
                master=self.connection.settings.master,
                driver=self._driver,
            )
        reading = [index for index, size in enumerate(sizes) if size >= PAD]
        views: list[memoryview | None] = [None] * len(names)
        if not reading:
            return views, None
        try:
            lease = self._pool.acquire(sum(sizes[i] for i in reading), block=False)
        except RuntimeError:
            return views, None
        try:
            pointers = _offsets(lease.ptr, [sizes[i] for i in reading])
            codes = self._read([names[i] for i in reading], pointers, [sizes[i] for i in reading])
            for index, pointer, code in zip(reading, pointers, codes):
                if code >= PAD:
                    views[index] = view_at(pointer, code - PAD, readonly=True)
        except BaseException:
            lease.release()
            raise
        if not any(view is not None for view in views):
            lease.release()
            return views, None
        return views, lease

    def exist(self, names: list[str]) -> list[int]:
        """1 where a key holds a complete value, 0 where not, else a status code."""
        return list(self._store.batch_is_exist(names))

    def remove(self, names: list[str], force: bool) -> list[int]:
        return list(self._store.batch_remove(names, force))

    def register(self, address: int, size: int) -> int:
        return int(self._store.register_buffer(address, size))

    def unregister(self, address: int) -> int:
        return int(self._store.unregister_buffer(address))

    def _lease(self, size: int) -> Any:
        try:
            return self._pool.acquire(size, timeout=self._lease_timeout)
        except RuntimeError as exc:
            raise TransientError(
                f"no staging lease of {size} bytes within {self._lease_timeout} s ({exc}); "
                "raise local_buffer_size or lower the number of calls in flight",
                driver=self._driver,
            ) from None

    def _upsert(self, names: list[str], pointers: list[int], sizes: list[int]) -> list[int]:
        return self._retrying(
            len(names),
            lambda indices: self._store.batch_upsert_from(
                [names[i] for i in indices],
                [pointers[i] for i in indices],
                [sizes[i] for i in indices],
                self._replicate,
            ),
        )

    def _read(self, names: list[str], pointers: list[int], sizes: list[int]) -> list[int]:
        return self._retrying(
            len(names),
            lambda indices: self._store.batch_get_into(
                [names[i] for i in indices],
                [pointers[i] for i in indices],
                [sizes[i] for i in indices],
            ),
        )

    def _retrying(self, count: int, call: Callable[[list[int]], Sequence[int]]) -> list[int]:
        """Status codes of ``call`` over all ``count`` keys, trying again those whose
        status is in ``RETRY``, up to ``ATTEMPTS`` times in all."""
        codes = [OK] * count
        pending = list(range(count))
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(RETRY_PAUSE_S * attempt)
            for index, code in zip(pending, call(pending)):
                codes[index] = int(code)
            pending = [index for index in pending if codes[index] in RETRY]
            if not pending:
                break
        return codes

    def _read_larger(
        self,
        names: list[str],
        targets: Sequence[memoryview | None],
        indices: list[int],
        results: list[Result],
        guard: CallLease,
    ) -> None:
        """Read again, sized, the values too large for the buffer first given."""
        if indices:
            found = self.get_sized(
                [names[i] for i in indices], [targets[i] for i in indices], guard
            )
            for index, result in zip(indices, found):
                results[index] = result

    def _read_sized(
        self,
        names: list[str],
        targets: Sequence[memoryview | None],
        sizes: dict[int, int],
        results: list[Result],
        guard: CallLease,
    ) -> list[int]:
        """Read the keys of ``sizes`` (stored sizes, pad included) through one lease;
        the indices whose value grew meanwhile, to be read again."""
        if not sizes:
            return []
        indices = list(sizes)
        grown: list[int] = []
        lease = self._lease(sum(sizes.values()))
        try:
            pointers = _offsets(lease.ptr, list(sizes.values()))
            codes = self._read([names[i] for i in indices], pointers, list(sizes.values()))
            for index, pointer, code in zip(indices, pointers, codes):
                if code == INVALID_PARAMS:
                    grown.append(index)
                elif code < PAD:
                    results[index] = _miss_or_error(code)
                else:
                    results[index] = _deliver(pointer, code - PAD, targets[index], guard)
        finally:
            lease.release()
        return grown


def _deliver(source: int, size: int, target: memoryview | None, guard: CallLease) -> memoryview:
    """A value read to ``source``, copied into ``target`` when it fits, else into a new buffer."""
    if target is not None and size <= len(target):
        with guard.touching():
            copy(address_of(target), source, size)
        return target[:size]
    view, address = fresh_buffer(size)
    copy(address, source, size)
    return view


def _miss_or_error(code: int) -> int | None:
    """``None`` for a status meaning the key holds no value, else the code (0, which no
    object of ours can have, counts as an error)."""
    return None if code in ABSENT else (code if code < 0 else INVALID_PARAMS)


def _knock(master: str, timeout: float) -> None:
    """Open and close a TCP connection to ``master`` (``host:port``); OSError if refused."""
    host, _, port = master.rpartition(":")
    socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()


def _offsets(base: int, sizes: list[int]) -> list[int]:
    pointers: list[int] = []
    for size in sizes:
        pointers.append(base)
        base += size
    return pointers


def local_address(master: str) -> str:
    """The address of this host's interface toward ``master`` (``host:port``), which
    other clients reach this one at; no packet is sent."""
    host, _, port = master.rpartition(":")
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, int(port)))
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise DriverUnavailableError(
            f"cannot resolve the master host {host!r} to choose local_hostname: {exc}",
            driver="mooncake",
        ) from None


def group_indices(indices: list[int], sizes: Sequence[int], limit: int) -> list[list[int]]:
    """``indices`` cut into runs of at most ``limit`` bytes of ``sizes`` (a larger value
    alone) and ``GROUP_KEYS`` keys: the batch calls one operation makes."""
    groups: list[list[int]] = []
    used = 0
    for index in indices:
        if not groups or used + sizes[index] > limit or len(groups[-1]) >= GROUP_KEYS:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += sizes[index]
    return groups
