"""A driver's worker threads: blocking client calls off the event loop, their errors
in the closed taxonomy, and caller buffers safe whatever ends a call.

Every driver whose client blocks (a socket library, a disk, a C extension)
owns one ``DriverThreads``:

- ``run`` calls a blocking function on the driver's pool and turns what the
  client raises into a kvstore error through the driver's ``ErrorMap``, the
  one piece each driver writes itself (redis-py's ConnectionError becomes
  DriverUnavailableError, a full disk CapacityError, ...).
- ``complete`` wraps one whole driver call (``put_many``, ``get_many``, ...):
  its caller gets control back only once no thread can touch the caller's
  buffers (``kvstore.inflight``), it ends with DriverTimeoutError past an
  optional deadline of the driver's own, and errors escaping it are mapped
  the same way.
- ``close`` waits for the calls still running, then stops the pool.

A call with a deadline of its own (``timeout``) ends there without waiting
for its threads only if they touch the caller's memory through the
``CallLease`` it was given; without one it waits for them first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

from kvstore.errors import DriverClosedError, DriverTimeoutError, KVStoreError
from kvstore.inflight import CallAbandoned, CallLease, CallTimedOut, InflightCalls

log = logging.getLogger(__name__)

T = TypeVar("T")

ErrorMap = Callable[[Exception, str], KVStoreError | None]
"""A driver's translation of its client's exception, raised while doing the named
operation, into a kvstore error; ``None`` for one that is not the client's (a bug,
which propagates unchanged and the store reports as an internal error)."""


class DriverThreads:
    """The thread pool of one driver and the calls running on it."""

    def __init__(
        self, driver: str, threads: int, errors: ErrorMap, *, pool: Executor | None = None
    ) -> None:
        """``threads`` worker threads, or ``pool`` when the driver brings its own executor
        (one that orders its work, say) of that many threads."""
        self.driver = driver
        self.pool: Executor = pool or ThreadPoolExecutor(
            threads, thread_name_prefix=f"kvstore-{driver}"
        )
        self._errors = errors
        self._calls = InflightCalls()

    async def run(self, function: Callable[..., T], *args: Any, operation: str = "a call") -> T:
        """``function(*args)`` on a worker thread; what it raises comes back mapped."""
        loop = asyncio.get_running_loop()
        try:
            work = loop.run_in_executor(self.pool, function, *args)
        except RuntimeError:
            raise DriverClosedError("the driver is closed", driver=self.driver) from None
        try:
            return await work
        except Exception as exc:
            self._raise_mapped(exc, operation)

    async def call(self, function: Callable[..., T], *args: Any, operation: str = "a call") -> T:
        """One blocking function as a whole driver call: ``run`` under ``complete``."""
        return await self.complete(
            self.run(function, *args, operation=operation), operation=operation
        )

    async def complete(
        self,
        work: Awaitable[T],
        *,
        operation: str = "a call",
        lease: CallLease | None = None,
        timeout: float | None = None,
    ) -> T:
        """Await one driver call's ``work`` to its end (see ``InflightCalls.complete``),
        within ``timeout`` s if given (then DriverTimeoutError, ``lease`` revoked, or
        ``work`` waited for when there is none); escaping errors come back mapped."""
        try:
            return await self._calls.complete(work, lease=lease, timeout=timeout)
        except CallTimedOut:
            raise DriverTimeoutError(
                f"{operation} took longer than {timeout:.3g} s", driver=self.driver
            ) from None
        except Exception as exc:
            self._raise_mapped(exc, operation)

    async def close(self, timeout: float | None = None) -> bool:
        """Wait for the calls still running (at most ``timeout`` s), then stop the pool;
        whether every call had ended. Threads a call left behind are not waited for."""
        finished = await self._calls.drain(timeout)
        if finished:
            await asyncio.to_thread(self.pool.shutdown, wait=True)
        else:
            log.warning("%s: calls still running at close are left to finish", self.driver)
            self.abandon()
        return finished

    def abandon(self) -> None:
        """Stop the pool at once, leaving running threads to finish (a failed ``open``)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _raise_mapped(self, exc: Exception, operation: str) -> NoReturn:
        """Raise the kvstore error for ``exc`` (from inside its ``except`` block)."""
        if isinstance(exc, CallAbandoned):
            raise DriverTimeoutError(
                f"{operation} ended before its threads", driver=self.driver
            ) from None
        mapped = None if isinstance(exc, KVStoreError) else self._errors(exc, operation)
        if mapped is None:
            raise exc
        log.debug("%s: %s failed: %s: %s", self.driver, operation, type(exc).__name__, exc)
        raise mapped from exc
