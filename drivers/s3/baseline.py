"""The s3 tier's yardstick for ``kvstore bench``: the same bytes through a plain client.

``RawClientBaseline(url, values)`` writes each value with one ``put_object``
and reads it back with one ``get_object`` into a preallocated buffer, on a
thread pool as wide as the driver's ``io_threads``, with a client built from
the same URL (endpoint, credentials, timeouts, retries, checksums). Objects go
under ``<prefix>/raw-baseline/`` so they never meet the driver's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .client import open_client
from .config import S3Config
from .naming import list_prefix

_DELETE_BATCH = 1000


class RawClientBaseline:
    """botocore ``put_object``/``get_object``, one request per value, in a thread pool."""

    def __init__(self, url: str, values: list[tuple[bytes, memoryview]]) -> None:
        config = S3Config.from_url(url)
        self.description = (
            f"botocore put_object/get_object (readinto a preallocated buffer), one request a "
            f"value, {config.io_threads} threads"
        )
        self._bucket = config.bucket
        self._names = [f"{list_prefix(config.prefix)}raw-baseline/{key.hex()}" for key, _ in values]
        self._bodies = [bytes(value) for _, value in values]
        self._buffers = [memoryview(bytearray(len(body))) for body in self._bodies]
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="s3-baseline")
        self._client = open_client(config)

    def write(self) -> float:
        """Seconds to put every value."""
        return self._timed(self._put, range(len(self._names)))

    def read(self) -> float:
        """Seconds to get every value into its preallocated buffer."""
        return self._timed(self._get, range(len(self._names)))

    def reset(self) -> None:
        """Delete the objects written."""
        for start in range(0, len(self._names), _DELETE_BATCH):
            batch = self._names[start : start + _DELETE_BATCH]
            self._client.delete_objects(
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": name} for name in batch], "Quiet": True},
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def _timed(self, action: Callable[[int], Any], indices: range) -> float:
        start = time.perf_counter()
        list(self._pool.map(action, indices))
        return time.perf_counter() - start

    def _put(self, index: int) -> None:
        self._client.put_object(
            Bucket=self._bucket, Key=self._names[index], Body=self._bodies[index]
        )

    def _get(self, index: int) -> None:
        body = self._client.get_object(Bucket=self._bucket, Key=self._names[index])["Body"]
        buffer = self._buffers[index]
        filled = 0
        try:
            while filled < len(buffer):
                count = body.readinto(buffer[filled:])
                if not count:
                    raise EOFError(f"{self._names[index]} ended after {filled} bytes")
                filled += count
        finally:
            body.close()
