"""The nvme driver's piece pool serves the oldest driver call first."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import Future

import pytest

from kvstore.drivers.nvme.ordered import CALL_ORDER, OrderedPool


def submit_as(pool: OrderedPool, order: int, fn: object, *args: object) -> Future[object]:
    """Submit from a context whose driver call is number ``order``."""
    context = contextvars.copy_context()
    context.run(CALL_ORDER.set, order)
    return context.run(pool.submit, fn, *args)  # type: ignore[arg-type]


def test_the_oldest_calls_work_runs_first_then_in_submission_order() -> None:
    pool = OrderedPool(1, "test")
    release = threading.Event()
    ran: list[str] = []
    try:
        blocker = submit_as(pool, 0, release.wait)
        futures = [
            submit_as(pool, order, ran.append, name)
            for order, name in [(3, "c1"), (1, "a1"), (2, "b1"), (1, "a2"), (3, "c2")]
        ]
        release.set()
        blocker.result(timeout=5)
        for future in futures:
            future.result(timeout=5)
        assert ran == ["a1", "a2", "b1", "c1", "c2"]
    finally:
        pool.shutdown()


def test_shutdown_cancels_queued_work_and_refuses_more() -> None:
    pool = OrderedPool(1, "test")
    started, release = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait()

    running = pool.submit(hold)
    assert started.wait(timeout=5)
    queued = pool.submit(sum, [1, 2])
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(sum, [1])
    release.set()
    assert running.result(timeout=5) is True
    pool.shutdown()


def test_errors_come_back_on_the_future() -> None:
    pool = OrderedPool(2, "test")
    try:
        with pytest.raises(ZeroDivisionError):
            pool.submit(divmod, 1, 0).result(timeout=5)
        assert pool.submit(divmod, 7, 2).result(timeout=5) == (3, 1)
    finally:
        pool.shutdown()
