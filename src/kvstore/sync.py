"""Blocking access to async drivers and stores for sync callers.

One daemon thread runs one event loop for the whole process; sync calls
submit coroutines to it and wait. Calling a sync method from that loop's own
thread would deadlock, so it raises instead.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

from typing_extensions import Buffer

from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
from kvstore.errors import DriverTimeoutError

T = TypeVar("T")
D = TypeVar("D", bound=Driver[Any])


class LoopThread:
    """An event loop running forever on a daemon thread."""

    def __init__(self, name: str = "kvstore-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a sync kvstore call was made from kvstore's own event loop thread; "
                "await the async API there instead"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            if future.done():
                raise
            future.cancel()
            raise DriverTimeoutError(f"call did not finish within {timeout} s") from None

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """The process-wide loop thread that sync facades use, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread()
            atexit.register(_shared.stop)
        return _shared


class SyncDriver(Generic[D]):
    """The driver protocol as blocking calls, for sync callers."""

    def __init__(self, driver: D, loop: LoopThread | None = None) -> None:
        self.driver = driver
        self._loop = loop or shared_loop()

    @classmethod
    def open_url(cls, url: str) -> SyncDriver[Driver[Any]]:
        """Open the driver a URL names (see ``kvstore.registry``)."""
        from kvstore.registry import open_driver

        loop = shared_loop()
        return SyncDriver(loop.run(open_driver(url)), loop)

    @property
    def capabilities(self) -> Capabilities:
        return self.driver.capabilities

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        self._loop.run(self.driver.put_many(items))

    def get_many(
        self, keys: Sequence[bytes], into: Sequence[Buffer | None] | None = None
    ) -> list[memoryview | None]:
        return self._loop.run(self.driver.get_many(keys, into))

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return self._loop.run(self.driver.contains_many(keys))

    def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        return self._loop.run(self.driver.delete_many(keys))

    def list(self) -> Iterator[KeyEntry]:
        async def collect() -> list[KeyEntry]:
            return [entry async for entry in self.driver.list()]

        return iter(self._loop.run(collect()))

    def usage(self) -> Usage:
        return self._loop.run(self.driver.usage())

    def close(self) -> None:
        self._loop.run(self.driver.close())

    def __enter__(self) -> SyncDriver[D]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
