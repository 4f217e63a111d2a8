"""The per-test harness of the conformance suite.

Each test gets a ``DriverHarness``: a private event loop on its own thread
(so the suite needs no pytest-asyncio and other threads can reach the driver
through that loop), the drivers the test opened, and the keys it minted. At
teardown it deletes those keys and closes those drivers, so a run leaves a
shared server as it found it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Awaitable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import pytest
from typing_extensions import Buffer

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, Usage
from kvstore.errors import KVStoreError
from kvstore.registry import DriverRegistry
from kvstore.sync import LoopThread, SyncDriver

T = TypeVar("T")

KEY_PREFIX = "kvconf"
"""Every key the suite writes starts with this, then a per-test random token."""

_CLEANUP_BATCH = 512


class DriverHarness:
    """One test's driver, event loop, keys and values; see the module docstring.

    ``driver`` is the driver most tests use; ``open`` gives another one of
    the same config and ``reopen`` replaces ``driver`` by a fresh one (for
    persistence). Every coroutine runs through ``run``, bounded by
    ``call_timeout_s`` so a hung driver fails the test instead of the run.
    """

    def __init__(
        self, config: DriverConfig, registry: DriverRegistry, *, seed: int, call_timeout_s: float
    ) -> None:
        self.config = config
        self.registry = registry
        self.call_timeout_s = call_timeout_s
        self.random = random.Random(seed)
        self._token = uuid.uuid4().hex[:12]
        self._counter = itertools.count()
        self._keys: list[bytes] = []
        self._drivers: list[Driver[Any]] = []
        self.loop = LoopThread(name="kvstore-conformance")
        try:
            self.driver = self.open()
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def start(
        cls,
        target: str | DriverConfig,
        registry: DriverRegistry,
        *,
        seed: int,
        call_timeout_s: float,
    ) -> DriverHarness:
        """Parse ``target`` (a URL or a config) and open its driver."""
        config = registry.parse_url(target) if isinstance(target, str) else target
        return cls(config, registry, seed=seed, call_timeout_s=call_timeout_s)

    def run(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine on the harness loop and return its result.

        Whatever a driver raises must be a ``kvstore.errors`` class naming its
        driver: any other exception, or a ``KVStoreError`` with ``driver=None``,
        fails the test with a message naming the promise it breaks.
        """

        async def wrapper() -> T:
            return await awaitable

        limit = timeout or self.call_timeout_s
        future = asyncio.run_coroutine_threadsafe(wrapper(), self.loop.loop)
        try:
            return future.result(limit)
        except FutureTimeout:
            if future.done():
                raise
            future.cancel()
            raise AssertionError(
                f"calls finish: a driver call did not finish within {limit} s"
            ) from None
        except KVStoreError as exc:
            if exc.driver is None:
                raise AssertionError(
                    f"errors name their driver: {type(exc).__name__}({exc.message!r}) "
                    "was raised with driver=None"
                ) from exc
            raise
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(
                "backend errors are translated: a driver call raised "
                f"{type(exc).__module__}.{type(exc).__qualname__}: {exc} "
                "instead of a kvstore.errors class"
            ) from exc

    def open(self) -> Driver[Any]:
        """Open another driver of the harness config; it is closed at teardown.
        A driver may refuse to open twice at once (e.g. one holding a lock on a
        directory), so the suite does this only for ``shared`` drivers."""
        driver = self.run(self.registry.open(self.config))
        self._drivers.append(driver)
        return driver

    def reopen(self) -> Driver[Any]:
        """Close ``driver`` and replace it by a freshly opened one."""
        self.run(self.driver.close())
        self.driver = self.open()
        return self.driver

    def sync(self, driver: Driver[Any] | None = None) -> SyncDriver[Driver[Any]]:
        """Blocking access to a driver (default ``driver``) through the harness loop,
        for use from other threads."""
        return SyncDriver(driver or self.driver, self.loop)

    @property
    def capabilities(self) -> Capabilities:
        return self.driver.capabilities

    def key(self, label: str = "") -> bytes:
        """A fresh key unique to this test and run; it is deleted at teardown."""
        key = f"{KEY_PREFIX}-{self._token}-{next(self._counter)}-{label}".encode()
        self._keys.append(key)
        return key

    def keys(self, count: int, label: str = "") -> list[bytes]:
        return [self.key(f"{label}{index}") for index in range(count)]

    def remember(self, key: bytes) -> bytes:
        """Record a key built by hand so that teardown deletes it."""
        self._keys.append(key)
        return key

    def value(self, size: int) -> bytes:
        """``size`` pseudo-random bytes, reproducible from the test's seed."""
        return self.random.randbytes(size)

    def put(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        self.run(self.driver.put_many(items))

    def get(
        self, keys: Sequence[bytes], into: Sequence[Buffer | None] | None = None
    ) -> list[memoryview | None]:
        return self.run(self.driver.get_many(keys, into))

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return self.run(self.driver.contains_many(keys))

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        return self.run(self.driver.delete_many(keys))

    def listing(self, driver: Driver[Any] | None = None) -> dict[bytes, int]:
        """Every listed key with its size, from ``driver`` (default ``driver``)."""
        source = driver or self.driver

        async def collect() -> dict[bytes, int]:
            return {entry.key: entry.size async for entry in source.list()}

        return self.run(collect())

    def usage(self) -> Usage:
        return self.run(self.driver.usage())

    def free_bytes(self) -> int | None:
        """Bytes left under the driver's capacity, or ``None`` when it has none."""
        capacity = self.capabilities.capacity_bytes
        return None if capacity is None else capacity - self.usage().bytes

    def require_room(self, nbytes: int) -> None:
        """Skip the test unless ``nbytes`` more bytes fit under the capacity."""
        free = self.free_bytes()
        if free is not None and free < nbytes:
            pytest.skip(f"capability capacity_bytes leaves {free} bytes free; {nbytes} needed")

    def require_value_size(self, size: int) -> None:
        """Skip the test unless one value of ``size`` bytes is allowed."""
        limit = self.capabilities.max_value_bytes
        if limit is not None and size > limit:
            pytest.skip(f"capability max_value_bytes={limit} is below {size}")

    def cleanup(self) -> None:
        """Delete the keys this test minted and close every driver it opened."""
        try:
            self._delete_keys()
        finally:
            try:
                for driver in self._drivers:
                    if not driver.closed:
                        self.run(driver.close())
            finally:
                self._stop_loop()

    def _delete_keys(self) -> None:
        if not self._keys:
            return
        driver = next((d for d in reversed(self._drivers) if not d.closed), None)
        if driver is None:
            capabilities = self.capabilities
            if not (capabilities.persistent or capabilities.shared):
                return
            driver = self.open()
        for start in range(0, len(self._keys), _CLEANUP_BATCH):
            self.run(driver.delete_many(self._keys[start : start + _CLEANUP_BATCH]))

    def _stop_loop(self) -> None:
        loop = self.loop.loop
        try:
            self.loop.run(loop.shutdown_asyncgens(), self.call_timeout_s)
            self.loop.run(loop.shutdown_default_executor(), self.call_timeout_s)
        finally:
            self.loop.stop()
            loop.close()


def first_difference(actual: bytes, expected: bytes) -> int:
    """The offset of the first byte where two equal-length values differ (-1 if none)."""
    step = 1 << 16
    for start in range(0, len(expected), step):
        if actual[start : start + step] != expected[start : start + step]:
            return next(
                start + offset
                for offset, (a, b) in enumerate(
                    zip(actual[start : start + step], expected[start : start + step])
                )
                if a != b
            )
    return -1


def assert_value(actual: object, expected: bytes, what: str) -> None:
    """Fail with a short message unless ``actual`` is a flat byte view equal to ``expected``.

    The message never contains the values themselves, which may be megabytes.
    """
    if actual is None:
        raise AssertionError(f"{what}: got a miss (None), expected {len(expected)} bytes")
    if not isinstance(actual, memoryview):
        raise AssertionError(f"{what}: got {type(actual).__name__}, expected a memoryview")
    if actual.ndim != 1 or actual.itemsize != 1:
        raise AssertionError(
            f"{what}: got a memoryview of format {actual.format!r} and shape {actual.shape}, "
            "expected flat bytes"
        )
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: got {len(actual)} bytes, expected {len(expected)}")
    data = actual.tobytes()
    if data != expected:
        raise AssertionError(
            f"{what}: {len(expected)} bytes with the wrong content "
            f"(first difference at byte {first_difference(data, expected)})"
        )


def assert_values(actual: Sequence[object], expected: Sequence[bytes | None], what: str) -> None:
    """``assert_value`` for each position of a batch, where ``None`` expects a miss."""
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: got {len(actual)} results for {len(expected)} keys")
    for index, (got, want) in enumerate(zip(actual, expected)):
        if want is None:
            if got is not None:
                raise AssertionError(f"{what}: result {index} should be a miss (None)")
        else:
            assert_value(got, want, f"{what}: result {index}")
