"""Driver calls that never leave a thread on the caller's buffers.

A driver whose blocking work runs on threads must not return to a caller while
a thread may still write into the caller's buffers, read a value the caller
will reuse, or half-publish a value. ``InflightCalls.complete`` shields the
work and, when the caller is cancelled, either waits for it to end or, when
the work's threads touch the caller's memory only through a ``CallLease``,
revokes the lease and lets the work finish unobserved. ``drain`` lets
``close`` wait for every call still running. The store does not wait: it
abandons a call at its tier's ``timeout_s`` and keeps the call's buffers out
of reach until the call has ended (docs/driver-protocol.md).
``kvstore.threaded.DriverThreads`` builds a driver's thread pool on these.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class CallAbandoned(Exception):
    """A worker thread found that the call it works for has already ended."""


class CallTimedOut(Exception):
    """A call's ``timeout`` passed before its work ended."""


class CallLease:
    """One call's permission for its worker threads to touch the caller's memory.

    A thread touches a caller's buffer only inside ``touching`` (or ``copy``),
    which holds the lease's lock and raises CallAbandoned once the lease is
    revoked; ``revoke`` waits for a touch in progress, so once it returns no
    thread of the call reads or writes the caller's buffers again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live = True

    @contextmanager
    def touching(self) -> Iterator[None]:
        """Hold the lease for the block; CallAbandoned (and no block) once revoked."""
        with self._lock:
            if not self._live:
                raise CallAbandoned
            yield

    def copy(self, target: memoryview, offset: int, source: Any) -> None:
        """Copy ``source`` into ``target`` at ``offset`` under the lease."""
        with self.touching():
            target[offset : offset + len(source)] = source

    def check(self) -> None:
        """CallAbandoned if the call has ended (before publishing what it wrote)."""
        if not self._live:
            raise CallAbandoned

    def revoke(self) -> None:
        with self._lock:
            self._live = False

    @property
    def live(self) -> bool:
        return self._live


class InflightCalls:
    """The set of a driver's calls still running."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    async def complete(
        self,
        work: Awaitable[T],
        *,
        lease: CallLease | None = None,
        timeout: float | None = None,
    ) -> T:
        """Await ``work``. If the caller is cancelled, or ``timeout`` s pass first
        (CallTimedOut): with a ``lease`` (the only way ``work`` touches the caller's
        memory) revoke it and end at once, ``work`` finishing unobserved; without one,
        let ``work`` finish first. The lease is revoked when the call ends either way."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._settle)
        try:
            try:
                finished, _ = await asyncio.wait([task], timeout=timeout)
            except asyncio.CancelledError:
                if lease is None:
                    await asyncio.wait([task])
                raise
            if not finished:
                if lease is None:
                    await asyncio.wait([task])
                raise CallTimedOut(f"the call took longer than {timeout} s")
            return task.result()
        finally:
            if lease is not None:
                lease.revoke()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for every running call (at most ``timeout`` s); whether all finished."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return not self._tasks

    def _settle(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()


async def gather_all(work: Iterable[Awaitable[T]]) -> list[T]:
    """Await every item to its end, then raise the first failure, if any, so no part
    of a batch still runs on the caller's buffers when the caller hears of an error."""
    results: list[T] = []
    for outcome in await asyncio.gather(*work, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results
