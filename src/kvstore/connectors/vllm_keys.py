"""Each live vLLM request's chunk keys, hashed once and shared by its lookup, load and saves.

A request's lookup, its load, the save of its prompt and the save of what it
generated all name the same chunks. The worker hashes a request's tokens the
first time one of them asks and hands the same keys to the others; when its
generated tokens complete new chunks, only those are hashed, chained on from
the last key (``KVStore.keys(after=...)``). Each entry keeps the tokens it was
hashed from and is used only for tokens that agree with them, so a reused
request id never gets another prompt's keys.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from kvstore.store import KVStore

MAX_REQUESTS = 4096
"""Requests whose keys are kept; the least recently used beyond are hashed again if asked."""


class RequestKeys:
    """Storage keys of each request's whole chunks, by request id; thread safe."""

    def __init__(self, store: KVStore, chunk_tokens: int, max_requests: int = MAX_REQUESTS) -> None:
        self._store = store
        self._chunk = chunk_tokens
        self._max = max_requests
        self._lock = threading.Lock()
        self._known: OrderedDict[str, tuple[npt.NDArray[np.int32], list[bytes]]] = OrderedDict()

    def of(self, req_id: str, tokens: Sequence[int] | npt.NDArray[np.int32]) -> list[bytes]:
        """The storage keys of every whole chunk of ``tokens``, request ``req_id``'s tokens."""
        whole = len(tokens) // self._chunk
        array = np.array(tokens[: whole * self._chunk], dtype="<i4")
        with self._lock:
            known = self._known.get(req_id)
        keys: list[bytes] = []
        if known is not None:
            hashed, keys = known
            if len(keys) >= whole and np.array_equal(hashed[: len(array)], array):
                with self._lock:
                    self._known.move_to_end(req_id)
                return keys[:whole]
            if not (keys and np.array_equal(array[: len(hashed)], hashed)):
                keys = []
        done = len(keys) * self._chunk
        keys = keys + self._store.keys(array[done:], after=keys[-1] if keys else None)
        with self._lock:
            self._known[req_id] = (array, keys)
            self._known.move_to_end(req_id)
            while len(self._known) > self._max:
                self._known.popitem(last=False)
        return keys

    def forget(self, req_ids: Sequence[str]) -> None:
        """Drop finished requests' keys."""
        with self._lock:
            for req_id in req_ids:
                self._known.pop(req_id, None)


__all__ = ["MAX_REQUESTS", "RequestKeys"]
