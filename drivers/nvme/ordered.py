"""A thread pool that serves the oldest driver call first.

With a plain FIFO pool, read-ahead batches issued together finish together:
each batch's pieces are queued as its files open, so the pieces of all
batches interleave and the first batch, the one its caller waits for, ends
near the end of the last. ``OrderedPool`` gives every piece the number of the
driver call it belongs to (``CALL_ORDER``, set by the driver for the call's
duration) and its threads always take the piece of the oldest call still
queued, so batches finish in the order they were asked for while the device
queue stays as deep as before.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

CALL_ORDER: ContextVar[int] = ContextVar("kvstore_nvme_call_order", default=0)
"""The driver call the current work belongs to; lower numbers are served first."""

_Item = tuple[int, int, "Future[Any]", Callable[..., Any], tuple[Any, ...]]


class OrderedPool(Executor):
    """``threads`` threads running submitted work lowest ``CALL_ORDER`` first, then FIFO."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: list[_Item] = []
        self._ready = threading.Condition()
        self._submitted = itertools.count()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{index}", daemon=True)
            for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            raise TypeError("OrderedPool.submit takes positional arguments only")
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            heapq.heappush(self._queue, (CALL_ORDER.get(), next(self._submitted), future, fn, args))
            self._ready.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._ready:
            self._closed = True
            if cancel_futures:
                for _, _, future, _, _ in self._queue:
                    future.cancel()
                self._queue.clear()
            self._ready.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                _, _, future, fn, args = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
