"""The threaded-driver helpers: error mapping, cancellation and timeouts that never
leave a thread on the caller's buffers, and close waiting for calls in flight."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvstore.errors import (
    DriverClosedError,
    DriverTimeoutError,
    DriverUnavailableError,
    KVStoreError,
)
from kvstore.inflight import CallAbandoned, CallLease, gather_all
from kvstore.threaded import DriverThreads


def unavailable_on_oserror(exc: Exception, operation: str) -> KVStoreError | None:
    if isinstance(exc, OSError):
        return DriverUnavailableError(f"{operation}: {exc}", driver="test")
    return None


def raising(exc: Exception) -> None:
    raise exc


async def test_run_maps_the_clients_errors_and_leaves_others_alone() -> None:
    threads = DriverThreads("test", 2, unavailable_on_oserror)
    try:
        assert await threads.run(sum, [1, 2, 3]) == 6
        with pytest.raises(DriverUnavailableError, match="put: refused") as caught:
            await threads.run(raising, ConnectionRefusedError("refused"), operation="put")
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)
        with pytest.raises(DriverTimeoutError):
            await threads.run(raising, DriverTimeoutError("slow", driver="test"))
        with pytest.raises(ZeroDivisionError):
            await threads.run(divmod, 1, 0)
        with pytest.raises(DriverTimeoutError, match="ended before its threads"):
            await threads.run(raising, CallAbandoned())
    finally:
        await threads.close()
    with pytest.raises(DriverClosedError):
        await threads.run(sum, [1])


async def test_a_cancelled_call_without_a_lease_ends_after_its_thread() -> None:
    """The caller hears of the cancellation only once the thread wrote its buffer."""
    threads = DriverThreads("test", 1, unavailable_on_oserror)
    buffer = bytearray(4)
    started = threading.Event()

    def slow_write() -> None:
        started.set()
        time.sleep(0.2)
        buffer[:] = b"done"

    call = asyncio.ensure_future(threads.complete(threads.run(slow_write)))
    await asyncio.to_thread(started.wait)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert buffer == b"done"
    assert await threads.close(timeout=1)


async def test_a_timed_out_call_with_a_lease_ends_at_once_and_its_thread_stays_out() -> None:
    threads = DriverThreads("test", 1, unavailable_on_oserror)
    buffer = memoryview(bytearray(4))
    release = threading.Event()
    outcome: list[str] = []

    def late_copy(lease: CallLease) -> None:
        release.wait()
        try:
            lease.copy(buffer, 0, b"late")
        except CallAbandoned:
            outcome.append("abandoned")

    lease = CallLease()
    started = time.monotonic()
    with pytest.raises(DriverTimeoutError, match=r"get took longer than 0\.1 s"):
        await threads.complete(
            threads.run(late_copy, lease), operation="get", lease=lease, timeout=0.1
        )
    assert time.monotonic() - started < 1
    assert not lease.live
    release.set()
    assert await threads.close(timeout=5)
    assert outcome == ["abandoned"]
    assert bytes(buffer) == bytes(4)


async def test_close_reports_calls_it_could_not_wait_for() -> None:
    threads = DriverThreads("test", 1, unavailable_on_oserror)
    release = threading.Event()
    lease = CallLease()
    with pytest.raises(DriverTimeoutError):
        await threads.complete(threads.run(release.wait), lease=lease, timeout=0.05)
    assert not await threads.close(timeout=0.05)
    release.set()


async def test_gather_all_raises_the_first_failure_only_after_every_item_ended() -> None:
    finished: list[int] = []

    async def item(index: int) -> int:
        await asyncio.sleep(0.01 * index)
        finished.append(index)
        if index == 0:
            raise DriverUnavailableError("first", driver="test")
        return index

    with pytest.raises(DriverUnavailableError, match="first"):
        await gather_all([item(index) for index in range(3)])
    assert sorted(finished) == [0, 1, 2]
    assert await gather_all([item(index) for index in (1, 2)]) == [1, 2]


async def test_work_runs_to_its_end_even_when_the_call_times_out_before_it_started() -> None:
    """A deadline already past abandons the call, not the work: its cleanup still runs."""
    threads = DriverThreads("test", 1, unavailable_on_oserror)
    cleaned: list[bool] = []

    async def work() -> int:
        try:
            return await threads.run(sum, [1])
        finally:
            cleaned.append(True)

    with pytest.raises(DriverTimeoutError):
        await threads.complete(work(), lease=CallLease(), timeout=0)
    assert await threads.close(timeout=5)
    assert cleaned == [True]
