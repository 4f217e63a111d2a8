"""The redis tier's yardstick for ``kvstore bench``: redis-py alone, nothing in between.

``RawClientBaseline(url, values)`` opens the redis-py client the driver would
open for ``url`` (same server, credentials, TLS, timeouts, connection count,
and the same connection settings: values sent without copies, 1 MiB socket
reads) and moves the same values the plain way: whole values with ``SET`` and
``GET``, spread over as many threads as the URL's ``max_connections``, one
pipeline per thread; each value read is then copied into a preallocated
buffer (redis-py cannot read into caller memory). Values live under
``<prefix>:baseline:<hex key>``, with no parts, manifests or scripts, so the
difference to the driver is what kvstore adds.

redis-py's stock command packer is not the yardstick: with hiredis installed it
copies each argument twice, which costs a 32 MiB value about a quarter second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvstore.registry import default_registry

from .config import RedisConfig
from .connection import Client, client_for

_PAGE = 4096


class RawClientBaseline:
    """Pipelined SET/GET of whole values on ``max_connections`` threads."""

    def __init__(self, url: str, values: list[tuple[bytes, memoryview]]) -> None:
        config = default_registry().parse_url(url)
        if not isinstance(config, RedisConfig):
            raise TypeError(f"not a redis URL: {config.scheme}://")
        self._client: Client = client_for(config)
        prefix = config.prefix.encode() + b":baseline:"
        self._names = [prefix + key.hex().encode() for key, _ in values]
        self._values = [value for _, value in values]
        self._buffers = [bytearray(len(value)) for value in self._values]
        for buffer in self._buffers:
            buffer[::_PAGE] = bytes(len(range(0, len(buffer), _PAGE)))  # touch every page
        threads = max(1, min(config.max_connections, len(values)))
        self._shares = [list(range(start, len(values), threads)) for start in range(threads)]
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="redis-baseline")
        self.description = (
            f"redis-py SET/GET of whole values, one pipeline on each of {threads} threads, "
            "reads copied into preallocated buffers"
        )

    def write(self) -> float:
        def share(indices: list[int]) -> None:
            pipeline = self._client.pipeline(transaction=False)
            for index in indices:
                pipeline.set(self._names[index], self._values[index])
            pipeline.execute()

        return _timed(lambda: list(self._pool.map(share, self._shares)))

    def read(self) -> float:
        def share(indices: list[int]) -> None:
            pipeline = self._client.pipeline(transaction=False)
            for index in indices:
                pipeline.get(self._names[index])
            for index, value in zip(indices, pipeline.execute()):
                memoryview(self._buffers[index])[: len(value)] = value

        return _timed(lambda: list(self._pool.map(share, self._shares)))

    def buffers_match(self) -> bool:
        """Whether the last ``read`` brought back exactly the values written."""
        return all(buffer == value for buffer, value in zip(self._buffers, self._values))

    def reset(self) -> None:
        """Delete the values, as the store's clear() deletes its chunks."""
        pipeline = self._client.pipeline(transaction=False)
        for name in self._names:
            pipeline.delete(name)
        pipeline.execute()

    def close(self) -> None:
        try:
            self.reset()
        finally:
            self._pool.shutdown(wait=True)
            self._client.close()


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start
