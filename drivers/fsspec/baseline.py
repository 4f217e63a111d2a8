"""The fsspec tier's yardstick for ``kvstore bench``: the same bytes moved by fsspec alone.

``RawClientBaseline(url, values)`` opens the filesystem of an ``fsspec+...`` URL
the plain fsspec way (``fsspec.filesystem(protocol, **storage_options)``) and
moves each value as one file with fsspec's own batch calls: ``fs.pipe`` and
``fs.cat`` of all paths on async implementations (fsspec runs them
concurrently, ``concurrency`` at a time), ``pipe_file``/``cat_file`` on a
thread pool ``concurrency`` wide on the others. Files go under
``<root>/.baseline-<random>/``, a name the driver never lists.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import fsspec

from .config import FsspecConfig


class RawClientBaseline:
    """``fs.pipe``/``fs.cat`` (or ``pipe_file``/``cat_file`` on threads) of the bench's values."""

    def __init__(self, url: str, values: list[tuple[bytes, memoryview]]) -> None:
        config = FsspecConfig.from_url(url)
        options: dict[str, Any] = {"use_listings_cache": False, **config.storage_options}
        self._fs: Any = fsspec.filesystem(config.protocol, skip_instance_cache=True, **options)
        root = str(self._fs._strip_protocol(config.path)).rstrip("/")
        directory = f"{root}/.baseline-{secrets.token_hex(4)}"
        self._fs.makedirs(directory, exist_ok=True)
        self._paths = [f"{directory}/{key.hex()}" for key, _ in values]
        self._data = [value.tobytes() for _, value in values]
        self._width = config.concurrency
        self._pool = None if self._fs.async_impl else ThreadPoolExecutor(config.concurrency)
        calls = (
            f"fs.pipe/fs.cat, {self._width} at a time"
            if self._pool is None
            else f"pipe_file/cat_file on {self._width} threads"
        )
        self.description = f"fsspec {config.protocol} {calls}, a file a value"

    def write(self) -> float:
        if self._pool is None:
            return _timed(
                lambda: self._fs.pipe(dict(zip(self._paths, self._data)), batch_size=self._width)
            )
        pool = self._pool
        return _timed(lambda: list(pool.map(self._fs.pipe_file, self._paths, self._data)))

    def read(self) -> float:
        """Read every value back; fsspec returns new bytes (it has no read-into call)."""
        if self._pool is None:
            return _timed(lambda: self._fs.cat(self._paths, batch_size=self._width))
        pool = self._pool
        return _timed(lambda: list(pool.map(self._fs.cat_file, self._paths)))

    def reset(self) -> None:
        """Delete the files, as the store's clear() deletes its chunks."""
        with suppress(FileNotFoundError):
            self._fs.rm(self._paths)

    def close(self) -> None:
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start
