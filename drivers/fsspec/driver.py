"""The ``fsspec`` driver: any fsspec filesystem as a tier.

``fsspec+<protocol>://<path>?<options>`` stores each value as one file under
``<path>`` of the fsspec filesystem ``<protocol>`` (``fsspec+memory://kv``,
``fsspec+file:///var/cache/kv``, ``fsspec+s3://bucket/prefix?endpoint_url=...``);
see layout.py for the names and docs/drivers/fsspec.md for the whole story.

Async implementations (s3fs, gcsfs: ``async_impl``) run on the event loop that
opened the driver, a bounded number of requests at a time; blocking ones (local, memory,
sftp) run on a thread pool the driver owns. A put is atomic for readers: it
is either one write that the filesystem makes visible whole (an object-store
PUT, a memory-filesystem entry) or a temp file renamed onto the final name.
Every call is bounded by ``timeout_s``; a call that ends early never leaves a
thread writing into the caller's buffers (``kvstore.threaded``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import fsspec
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverLoadError,
    DriverUnavailableError,
    KVStoreError,
    TransientError,
)
from kvstore.inflight import CallLease, gather_all
from kvstore.threaded import DriverThreads

from .config import FsspecConfig, masked_options
from .filesystems import AsyncFilesystem, Filesystem, ThreadFilesystem
from .layout import key_of, relative_path

log = logging.getLogger(__name__)

T = TypeVar("T")

OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "oci", "oss"})
"""Protocols whose single PUT makes a whole object visible at once (and whose rename
is a copy), so ``write_mode=auto`` writes values in place."""

ATOMIC_WRITE_PROTOCOLS = OBJECT_STORES | {"memory"}
"""``write_mode=auto`` writes in place here; elsewhere it writes a temp file and renames it."""

_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class FsspecDriver(Driver[FsspecConfig]):
    """Values as files of any fsspec filesystem; listable, shared and persistent except
    on ``memory``."""

    config_type: ClassVar[type[DriverConfig]] = FsspecConfig
    static_capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False,
        listable=True,
        shared=True,
        details=(
            ("persistent", "true for every protocol but memory"),
            ("shared", "false only for memory with global_store=false"),
        ),
    )

    def __init__(
        self,
        config: FsspecConfig,
        *,
        filesystem: Filesystem,
        threads: DriverThreads,
        root: str,
        rename: bool,
        io_mode: str,
    ) -> None:
        super().__init__(config)
        self._filesystem = filesystem
        self._threads = threads
        self._root = root
        self._prefix = root.rstrip("/") + "/"
        self._where = f"{config.protocol}://{root}"
        memory = config.protocol == "memory"
        self._capabilities = Capabilities(
            persistent=not memory,
            listable=True,
            zero_copy=False,
            shared=not memory or config.storage_options.get("global_store", True) is not False,
            details=(
                ("protocol", config.protocol),
                ("root", root),
                ("writes", "temp file renamed into place" if rename else "one atomic write"),
                ("io", io_mode),
            ),
        )

    @classmethod
    async def open(cls, config: FsspecConfig) -> Self:
        """Build the filesystem and create the root (a directory, a bucket) if missing."""
        fs_class = _filesystem_class(config)
        options: dict[str, Any] = {"use_listings_cache": False, **config.storage_options}
        options["skip_instance_cache"] = True
        rename = config.write_mode == "rename" or (
            config.write_mode == "auto" and config.protocol not in ATOMIC_WRITE_PROTOCOLS
        )
        where = f"{config.protocol}://{config.path}"
        filesystem: Filesystem | None = None
        threads = DriverThreads(config.scheme, config.concurrency, _call_error)
        loop = asyncio.get_running_loop()
        try:
            if fs_class.async_impl:
                fs = fs_class(asynchronous=True, loop=loop, **options)
                filesystem = AsyncFilesystem(fs, rename=rename, concurrency=config.concurrency)
                io_mode = f"async, {config.concurrency} requests in flight"
            else:
                built = loop.run_in_executor(threads.pool, lambda: fs_class(**options))
                fs = await asyncio.wait_for(built, config.open_timeout_s)
                filesystem = ThreadFilesystem(fs, threads, rename=rename)
                io_mode = f"{config.concurrency} threads"
            root = str(fs._strip_protocol(config.path))
            where = f"{config.protocol}://{root}"
            await asyncio.wait_for(filesystem.makedirs(root), config.open_timeout_s)
        except BaseException as exc:
            if filesystem is not None:
                await _close_quietly(filesystem, config.open_timeout_s)
            threads.abandon()
            if isinstance(exc, KVStoreError) or not isinstance(exc, Exception):
                raise
            raise _open_error(exc, config, where) from exc
        return cls(
            config,
            filesystem=filesystem,
            threads=threads,
            root=root,
            rename=rename,
            io_mode=io_mode,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _path(self, key: bytes) -> str:
        return self._prefix + relative_path(key, self.config.shard_depth)

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        values = dict(items)
        await self._call(
            "put_many",
            lambda lease: gather_all(
                self._filesystem.write(self._path(key), value, lease)
                for key, value in values.items()
            ),
        )

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        targets: list[memoryview | None] = [None] * len(keys) if into is None else into
        return await self._call(
            "get_many",
            lambda lease: gather_all(
                self._filesystem.read(self._path(key), target, lease)
                for key, target in zip(keys, targets)
            ),
        )

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        return await self._call(
            "contains_many",
            lambda _: gather_all(self._filesystem.exists(self._path(key)) for key in keys),
        )

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        paths = [self._path(key) for key in keys]
        unique = list(dict.fromkeys(paths))
        removed = await self._call("delete_many", lambda _: self._filesystem.remove_many(unique))
        outcome = dict(zip(unique, removed))
        seen: set[str] = set()
        results: list[bool] = []
        for path in paths:
            results.append(outcome[path] and path not in seen)
            seen.add(path)
        return results

    async def _list(self) -> AsyncIterator[KeyEntry]:
        for key, size in await self._entries("list"):
            yield KeyEntry(key, size)

    async def _usage(self) -> Usage:
        entries = await self._entries("usage")
        return Usage(len(entries), sum(size for _, size in entries), None)

    async def _entries(self, operation: str) -> list[tuple[bytes, int]]:
        """A snapshot of every stored key and its size, from one listing of the root."""
        found = await self._call(operation, lambda _: self._filesystem.entries(self._root))
        depth = self.config.shard_depth
        entries: list[tuple[bytes, int]] = []
        for path, size in found:
            if path.startswith(self._prefix):
                key = key_of(path[len(self._prefix) :], depth)
                if key is not None:
                    entries.append((key, size))
        return entries

    async def _close(self) -> None:
        await self._threads.close(timeout=self.config.open_timeout_s)
        await _close_quietly(self._filesystem, self.config.open_timeout_s)

    async def _call(self, operation: str, work: Callable[[CallLease], Awaitable[T]]) -> T:
        """Run one driver call within ``timeout_s``, its copies under a lease of its own."""
        lease = CallLease()
        return await self._threads.complete(
            work(lease),
            operation=f"{operation} on {self._where}",
            lease=lease,
            timeout=self.config.timeout_s,
        )


def _filesystem_class(config: FsspecConfig) -> Any:
    try:
        return fsspec.get_filesystem_class(config.protocol)
    except ImportError as exc:
        raise DriverLoadError(
            f"fsspec protocol {config.protocol!r} needs another package: {exc}",
            driver=config.scheme,
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"{exc} (in {config.redacted_url()!r})", driver=config.scheme) from None


def _open_error(exc: Exception, config: FsspecConfig, where: str) -> KVStoreError:
    """The typed error for a failed open."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return DriverUnavailableError(
            f"{where} did not answer within open_timeout_s={config.open_timeout_s}",
            driver=config.scheme,
        )
    if isinstance(exc, (TypeError, ValueError)):
        return ConfigError(
            f"cannot open {where} with storage options "
            f"{masked_options(config.storage_options)}: {type(exc).__name__}: {exc}",
            driver=config.scheme,
        )
    return DriverUnavailableError(
        f"cannot open {where}: {type(exc).__name__}: {exc}", driver=config.scheme
    )


def _call_error(exc: Exception, operation: str) -> KVStoreError:
    """The driver's ErrorMap: full storage is CapacityError, a value cut short
    TransientError, the rest (refused connections, HTTP and filesystem errors)
    DriverUnavailableError."""
    if isinstance(exc, OSError) and exc.errno in _FULL_DISK:
        return CapacityError(f"{operation}: the storage is full: {exc}", driver=FsspecConfig.scheme)
    if isinstance(exc, EOFError):
        return TransientError(f"{operation}: {exc}", driver=FsspecConfig.scheme)
    return DriverUnavailableError(
        f"{operation} failed: {type(exc).__name__}: {exc}", driver=FsspecConfig.scheme
    )


async def _close_quietly(filesystem: Filesystem, timeout: float) -> None:
    try:
        await asyncio.wait_for(filesystem.close(), timeout)
    except Exception as exc:
        log.warning("closing the fsspec filesystem failed: %s: %s", type(exc).__name__, exc)
