"""Driver calls that run to their end even when the caller is cancelled.

A driver whose blocking work runs on threads must not return to a cancelled
caller while a thread still writes into the caller's buffers or half-publishes
a value. ``InflightCalls.complete`` shields the work, waits for it on
cancellation, and lets ``close`` wait for every call still running. The store
does not wait: it abandons a call at its tier's ``timeout_s`` and keeps the
call's buffers out of reach until the call has ended (docs/driver-protocol.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class InflightCalls:
    """The set of a driver's calls still running."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    async def complete(self, work: Coroutine[Any, Any, T]) -> T:
        """Await ``work``; if the caller is cancelled, finish ``work`` first, then re-raise."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._settle)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            raise

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
