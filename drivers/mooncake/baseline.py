"""The mooncake tier's yardstick for ``kvstore bench``: the raw Mooncake client, no kvstore.

``RawClientBaseline(url, values)`` uses the Mooncake client of the driver URL's
settings (the very client an open driver of that URL uses: same segment, same
transfer paths), copies the values once (untimed) into a registered source
buffer, and then times ``batch_upsert_from`` of all of them and
``batch_get_into`` back into a registered, pre-touched target buffer: the
client's zero-copy batch calls, in groups of the driver's size spread over as
many threads as the driver's ``io_threads``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from mooncake.store import ReplicateConfig

from kvstore.errors import DriverUnavailableError, TransientError

from .client import CONNECTIONS, ClientSettings, group_indices, local_address
from .config import MooncakeConfig
from .status import OK, name


class RawClientBaseline:
    """Raw ``batch_upsert_from``/``batch_get_into`` of the bench's values; see the module."""

    def __init__(self, url: str, values: list[tuple[bytes, memoryview]]) -> None:
        config = MooncakeConfig.from_url(url)
        self.description = (
            f"Mooncake batch_upsert_from/batch_get_into, registered buffers, "
            f"{config.io_threads} threads, {config.protocol}"
        )
        self._settings = ClientSettings(
            master=config.master,
            metadata=config.metadata,
            protocol=config.protocol,
            device_name=config.device_name,
            local_hostname=config.local_hostname or local_address(config.master),
            global_segment_size=config.global_segment_size,
            local_buffer_size=config.local_buffer_size,
        )
        self._store: Any = CONNECTIONS.acquire(
            self._settings, config.scheme, config.connect_timeout
        ).store
        self._replicate = ReplicateConfig()
        self._replicate.replica_num = config.replicas
        self._names = [f"{config.prefix}baseline/{key.hex()}" for key, _ in values]
        self._sizes = [len(value) for _, value in values]
        offsets = np.cumsum([0, *self._sizes])
        total = max(1, int(offsets[-1]))
        self._source: Any = np.empty(total, dtype=np.uint8)
        self._target: Any = np.empty(total, dtype=np.uint8)
        self._target.fill(0)
        for (_, value), start in zip(values, offsets):
            self._source[start : start + len(value)] = np.frombuffer(value, dtype=np.uint8)
        for buffer in (self._source, self._target):
            if self._store.register_buffer(buffer.ctypes.data, buffer.nbytes) != OK:
                raise DriverUnavailableError("cannot register the baseline's buffers")
        self._offsets = [int(offset) for offset in offsets[:-1]]
        self._groups = group_indices(list(range(len(values))), self._sizes, config.group_bytes)
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="bench-mooncake")

    def write(self) -> float:
        base = self._source.ctypes.data
        return self._timed(
            lambda group: self._store.batch_upsert_from(
                [self._names[i] for i in group],
                [base + self._offsets[i] for i in group],
                [self._sizes[i] for i in group],
                self._replicate,
            )
        )

    def read(self) -> float:
        base = self._target.ctypes.data
        return self._timed(
            lambda group: self._store.batch_get_into(
                [self._names[i] for i in group],
                [base + self._offsets[i] for i in group],
                [self._sizes[i] for i in group],
            )
        )

    def reset(self) -> None:
        """Delete the values; ``force`` skips the read leases, no reader being left."""
        self._store.batch_remove(self._names, True)

    def close(self) -> None:
        self.reset()
        self._pool.shutdown(wait=True)
        for buffer in (self._source, self._target):
            self._store.unregister_buffer(buffer.ctypes.data)
        CONNECTIONS.release(self._settings, linger=0.0)

    def _timed(self, call: Any) -> float:
        start = time.perf_counter()
        outcomes = list(self._pool.map(call, self._groups))
        elapsed = time.perf_counter() - start
        for group, codes in zip(self._groups, outcomes):
            for index, code in zip(group, codes):
                if code < OK or (code > OK and code != self._sizes[index]):
                    raise TransientError(f"the baseline's call failed: {name(code)}")
        return elapsed
