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
thread writing into the caller's buffers (see ``_Lease``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, ClassVar, Literal, Protocol, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode

import fsspec
from fsspec.asyn import AsyncFileSystem
from pydantic import Field, JsonValue, field_validator
from typing_extensions import Self

from kvstore.config_url import DriverConfig, url_scheme
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage, fill_into
from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverLoadError,
    DriverTimeoutError,
    DriverUnavailableError,
    KVStoreError,
    TransientError,
)

from .layout import TEMP_MARKER, key_of, relative_path, temp_path

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_PIECE = 1 << 20
"""Bytes a worker thread reads before copying them into the caller's buffer, and the
first read of a streamed object."""

OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "oci", "oss"})
"""Protocols whose single PUT makes a whole object visible at once (and whose rename
is a copy), so ``write_mode=auto`` writes values in place."""

ATOMIC_WRITE_PROTOCOLS = OBJECT_STORES | {"memory"}
"""``write_mode=auto`` writes in place here; elsewhere it writes a temp file and renames it."""

MASK = "***"
_SECRET_NAME = re.compile(
    r"secret|passw|passphrase|token|credential|signature|(?:^|_)key", re.IGNORECASE
)
_SECRET_QUERY = re.compile(
    r"([?&][^=&#]*(?:secret|passw|passphrase|token|credential|signature|key)[^=&#]*=)[^&#]*",
    re.IGNORECASE,
)
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_LOCATION_FIELDS = ("protocol", "path", "storage_options")
_RESERVED_OPTIONS = ("asynchronous", "loop", "skip_instance_cache")


class FsspecConfig(DriverConfig):
    """Which filesystem, where in it, and how the driver moves values.

    protocol: the fsspec protocol (``memory``, ``file``, ``s3``, ...), from the
        URL scheme ``fsspec+<protocol>``.
    path: the root under which values live (``bucket/prefix`` for object stores).
    storage_options: keyword arguments of the filesystem (``endpoint_url``, ``key``,
        ``anon``, ...): every query parameter that is not a driver option. Values
        that parse as JSON are typed (``anon=true``, ``config_kwargs={"a":1}``);
        quote a string that would otherwise parse (``key="123"``).
    shard_depth: directory levels of two hex digits above each value (0 to 3).
    concurrency: requests in flight (async filesystems) or threads (the others).
    timeout_s: the longest one driver call may take; past it, DriverTimeoutError.
    open_timeout_s: the longest opening (connect, create the root) and closing may take.
    write_mode: ``rename`` writes a temp file and renames it onto the value's
        name; ``direct`` writes the value's name once, for filesystems whose
        single write is atomic; ``auto`` picks ``direct`` for object stores and
        memory, ``rename`` for the rest.
    """

    scheme: ClassVar[str] = "fsspec"
    location_field: ClassVar[str | None] = "path"

    protocol: str = Field(pattern=r"^[a-z][a-z0-9.-]*$")
    path: str = Field(min_length=1)
    storage_options: dict[str, JsonValue] = Field(default_factory=dict)
    shard_depth: int = Field(default=1, ge=0, le=3)
    concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=30.0, gt=0)
    open_timeout_s: float = Field(default=10.0, gt=0)
    write_mode: Literal["auto", "rename", "direct"] = "auto"

    @field_validator("storage_options")
    @classmethod
    def _options_have_free_names(cls, options: dict[str, JsonValue]) -> dict[str, JsonValue]:
        taken = [name for name in options if name in cls.model_fields]
        reserved = [name for name in options if name in _RESERVED_OPTIONS]
        if taken:
            raise ValueError(f"{taken} name driver options, not storage options")
        if reserved:
            raise ValueError(f"{reserved} are set by the driver itself")
        return options

    @classmethod
    def driver_options(cls) -> list[str]:
        """The query parameters that configure the driver rather than the filesystem."""
        return [name for name in cls.model_fields if name not in _LOCATION_FIELDS]

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Parse ``fsspec+<protocol>://<path>?<options>``; a ConfigError says what is wrong."""
        shown = mask_url(url)
        family, _, protocol = url_scheme(url).partition("+")
        if family != cls.scheme or not protocol:
            raise ConfigError(
                f"{cls.__name__} takes fsspec+<protocol>:// URLs such as "
                f"fsspec+s3://bucket/prefix, not {shown!r}"
            )
        if "#" in url:
            raise ConfigError(f"driver URLs take no #fragment: {shown!r}")
        location, _, query = url.split("://", 1)[1].partition("?")
        if not location:
            raise ConfigError(
                f"fsspec URLs need a path (fsspec+memory://kv, fsspec+file:///var/cache/kv, "
                f"fsspec+s3://bucket/prefix): {shown!r}"
            )
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise ConfigError(f"malformed query string in {shown!r}: {exc}") from None
        data: dict[str, Any] = {"protocol": protocol, "path": unquote(location)}
        options: dict[str, JsonValue] = {}
        driver_options = cls.driver_options()
        for name, value in pairs:
            if name in _LOCATION_FIELDS:
                raise ConfigError(f"{name!r} is part of the URL itself, not an option: {shown!r}")
            if name in data or name in options:
                raise ConfigError(f"option {name!r} given twice in {shown!r}")
            if name in driver_options:
                data[name] = value
            else:
                options[name] = decode_option(value)
        data["storage_options"] = options
        return cls.from_mapping(data, source=shown)

    def to_url(self) -> str:
        """The URL that ``from_url`` turns back into this config, secrets included."""
        return self._url(self.storage_options)

    def redacted_url(self) -> str:
        """``to_url`` with the values of secret-looking storage options replaced by ``***``."""
        return self._url(masked_options(self.storage_options))

    def _url(self, options: dict[str, JsonValue]) -> str:
        rendered = self.model_dump(mode="json")
        fields = type(self).model_fields
        query = {
            name: str(rendered[name])
            for name in self.driver_options()
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        }
        query.update((name, encode_option(value)) for name, value in options.items())
        url = f"{self.scheme}+{self.protocol}://{quote(self.path, safe='/:@.-_~')}"
        return f"{url}?{urlencode(query, safe='*')}" if query else url

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, masked_options(value) if name == "storage_options" else value


def decode_option(text: str) -> JsonValue:
    """A storage option from its query-string text: its JSON value if it parses as
    JSON (numbers, ``true``, ``null``, objects, quoted strings), else the text."""
    try:
        value: JsonValue = json.loads(text)
    except ValueError:
        return text
    return value


def encode_option(value: JsonValue) -> str:
    """The query-string text that ``decode_option`` turns back into ``value``."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, separators=(",", ":"))


def masked_options(options: Any) -> Any:
    """``options`` with the values of secret-looking names (nested too) replaced by ``***``."""
    if not isinstance(options, dict):
        return options
    return {
        name: MASK if _SECRET_NAME.search(name) and value else masked_options(value)
        for name, value in options.items()
    }


def mask_url(url: str) -> str:
    """A URL fit for messages: values of secret-looking query parameters replaced by ``***``."""
    return _SECRET_QUERY.sub(lambda match: match.group(1) + MASK, url)


class _Abandoned(Exception):
    """A worker thread found that the call it works for has already ended."""


class _Lease:
    """A call's permission for worker threads to touch the caller's memory.

    The call revokes it when it ends, in time or not; a thread copies into a
    caller's buffer only while holding the lease's lock and only if the lease
    is live, so once ``revoke`` returns no abandoned thread writes there again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live = True

    def copy(self, target: memoryview, offset: int, source: Any) -> None:
        with self._lock:
            if not self._live:
                raise _Abandoned
            target[offset : offset + len(source)] = source

    def check(self) -> None:
        if not self._live:
            raise _Abandoned

    def revoke(self) -> None:
        with self._lock:
            self._live = False


class _Filesystem(Protocol):
    """What the driver needs of a filesystem, on paths it has already laid out."""

    async def read(self, path: str, target: memoryview | None, lease: _Lease) -> memoryview | None:
        """The value at ``path`` (in ``target`` when it fits), or ``None`` if absent."""

    async def write(self, path: str, value: memoryview, lease: _Lease) -> None:
        """Make ``value`` the whole content of ``path``, atomically for readers."""

    async def exists(self, path: str) -> bool:
        """Whether ``path`` holds a value."""

    async def remove_many(self, paths: list[str]) -> list[bool]:
        """Delete distinct paths; ``True`` where a value was there."""

    async def entries(self, root: str) -> list[tuple[str, int]]:
        """Every file under ``root`` with its size, values or not."""

    async def makedirs(self, path: str) -> None:
        """Create ``path`` (a directory, a bucket) unless it exists."""

    async def close(self) -> None:
        """Release clients, sessions and threads."""


class _AsyncFilesystem:
    """An async fsspec implementation driven on the driver's event loop.

    Every copy into a caller's buffer happens on the loop, so a call that is
    cancelled or times out stops copying at once. Objects are streamed
    straight into the caller's buffer where the implementation offers
    ``open_async`` (s3fs), else fetched whole with ``_cat_file``.
    """

    def __init__(self, fs: Any, *, rename: bool, concurrency: int) -> None:
        self.fs = fs
        self._rename = rename
        self._slots = asyncio.Semaphore(concurrency)
        self._streams = type(fs).open_async is not AsyncFileSystem.open_async

    async def read(self, path: str, target: memoryview | None, lease: _Lease) -> memoryview | None:
        async with self._slots:
            if not self._streams:
                try:
                    data = await self.fs._cat_file(path)
                except FileNotFoundError:
                    return None
                return fill_into(data, target)
            try:
                stream = await self.fs.open_async(path, "rb")
                chunk = await stream.read(READ_PIECE)
            except FileNotFoundError:
                return None
            size = int(stream.size)
            if target is None or len(target) < size:
                target = memoryview(bytearray(size))
            filled = 0
            while True:
                target[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
                if filled >= size:
                    return target[:size]
                chunk = await stream.read(size - filled)
                if not chunk:
                    raise EOFError(f"{path} ended after {filled} of {size} bytes")

    async def write(self, path: str, value: memoryview, lease: _Lease) -> None:
        async with self._slots:
            data = _as_bytes(value)
            if not self._rename:
                await self._put(path, data)
                return
            temp = temp_path(path)
            await self._put(temp, data)
            try:
                await self.fs._mv_file(temp, path)
            except BaseException:
                with suppress(Exception):
                    await self.fs._rm_file(temp)
                raise

    async def _put(self, path: str, data: bytes) -> None:
        """Write ``path``, re-creating a missing parent (a directory, a deleted bucket) once."""
        try:
            await self.fs._pipe_file(path, data)
        except FileNotFoundError:
            await self.fs._makedirs(self.fs._parent(path), exist_ok=True)
            await self.fs._pipe_file(path, data)

    async def exists(self, path: str) -> bool:
        async with self._slots:
            return bool(await self.fs._exists(path))

    async def remove_many(self, paths: list[str]) -> list[bool]:
        """Find which paths exist, then delete those in one ``_rm`` (a bulk delete on
        object stores, which cannot tell themselves whether a key existed)."""
        found = await _gather_all(self.exists(path) for path in paths)
        present = [path for path, exists in zip(paths, found) if exists]
        if present:
            async with self._slots:
                await self.fs._rm(present)
        return found

    async def entries(self, root: str) -> list[tuple[str, int]]:
        try:
            found = await self.fs._find(root, detail=True)
        except FileNotFoundError:
            return []
        return [(name, int(info["size"])) for name, info in found.items()]

    async def makedirs(self, path: str) -> None:
        await self.fs._makedirs(path, exist_ok=True)

    async def close(self) -> None:
        """Close the client session of implementations that expose one (s3fs, http)."""
        set_session = getattr(self.fs, "set_session", None)
        if set_session is not None:
            session = await set_session()
            close = getattr(session, "close", None)
            if close is not None:
                await close()


class _ThreadFilesystem:
    """A blocking fsspec implementation run on the driver's thread pool.

    Threads touch a caller's buffer only through the call's ``_Lease``: local
    files are read in ``READ_PIECE`` pieces into a per-thread scratch buffer
    and copied under the lease; other filesystems hand back bytes
    (``cat_file``) that are copied the same way. A put reads the caller's
    value in the thread and publishes it (rename or write) only if the lease
    was still live once the value was read, so a late thread never publishes
    bytes the caller had already taken back.
    """

    def __init__(self, fs: Any, pool: ThreadPoolExecutor, *, rename: bool) -> None:
        self.fs = fs
        self._pool = pool
        self._rename = rename
        self._local = bool(getattr(fs, "local_file", False))
        self._scratch = threading.local()

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def read(self, path: str, target: memoryview | None, lease: _Lease) -> memoryview | None:
        reader = self._read_local if self._local else self._read_bytes
        return await self._run(reader, path, target, lease)

    def _read_bytes(self, path: str, target: memoryview | None, lease: _Lease) -> memoryview | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        if target is None or len(target) < len(data):
            return memoryview(data)
        lease.copy(target, 0, data)
        return target[: len(data)]

    def _read_local(self, path: str, target: memoryview | None, lease: _Lease) -> memoryview | None:
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return None
        with file:
            size = os.fstat(file.fileno()).st_size
            if target is None or len(target) < size:
                buffer = memoryview(bytearray(size))
                _read_exactly(file, buffer, path)
                return buffer
            scratch = self._scratch_buffer()
            filled = 0
            while filled < size:
                piece = scratch[: min(READ_PIECE, size - filled)]
                _read_exactly(file, piece, path)
                lease.copy(target, filled, piece)
                filled += len(piece)
            return target[:size]

    def _scratch_buffer(self) -> memoryview:
        scratch: memoryview | None = getattr(self._scratch, "buffer", None)
        if scratch is None:
            scratch = memoryview(bytearray(READ_PIECE))
            self._scratch.buffer = scratch
        return scratch

    async def write(self, path: str, value: memoryview, lease: _Lease) -> None:
        await self._run(self._write, path, value, lease)

    def _write(self, path: str, value: memoryview, lease: _Lease) -> None:
        if not self._rename:
            data = value.tobytes()
            lease.check()
            self._put(path, data)
            return
        temp = temp_path(path)
        try:
            self._put(temp, value)
            lease.check()
            self.fs.mv(temp, path)
        except BaseException:
            with suppress(OSError):
                self.fs.rm_file(temp)
            raise

    def _put(self, path: str, data: Any) -> None:
        """Write ``path``, creating its missing parent directories once."""
        try:
            self.fs.pipe_file(path, data)
        except FileNotFoundError:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            self.fs.pipe_file(path, data)

    async def exists(self, path: str) -> bool:
        return bool(await self._run(self.fs.isfile, path))

    async def remove_many(self, paths: list[str]) -> list[bool]:
        return await _gather_all(self._run(self._remove, path) for path in paths)

    def _remove(self, path: str) -> bool:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    async def entries(self, root: str) -> list[tuple[str, int]]:
        return await self._run(_local_entries if self._local else self._found_entries, root)

    def _found_entries(self, root: str) -> list[tuple[str, int]]:
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return []
        return [(name, int(info["size"])) for name, info in found.items()]

    async def makedirs(self, path: str) -> None:
        await self._run(lambda: self.fs.makedirs(path, exist_ok=True))

    async def close(self) -> None:
        """Stop the pool without waiting for threads a timed-out call left behind."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read_exactly(file: Any, buffer: memoryview, path: str) -> None:
    filled = 0
    while filled < len(buffer):
        got = file.readinto(buffer[filled:])
        if not got:
            raise EOFError(f"{path} ended after {filled} of {len(buffer)} bytes")
        filled += got


def _local_entries(root: str) -> list[tuple[str, int]]:
    """Every file under ``root`` with its size; files removed meanwhile are skipped (a
    plain ``find`` drops a whole directory whose entry vanishes while it is listed)."""
    found: list[tuple[str, int]] = []
    for directory, _, names in os.walk(root):
        for name in names:
            if TEMP_MARKER in name:
                continue
            path = os.path.join(directory, name)
            try:
                found.append((path, os.stat(path).st_size))
            except FileNotFoundError:
                continue
    return found


def _as_bytes(value: memoryview) -> bytes:
    """``value`` as bytes, for clients that take nothing else (botocore): the caller's
    own bytes object when the view covers all of it, else one copy."""
    owner = value.obj
    if type(owner) is bytes and len(owner) == value.nbytes:
        return owner
    return value.tobytes()


async def _gather_all(work: Iterable[Awaitable[T]]) -> list[T]:
    """Await every item; on the first failure cancel the rest and wait for them, so no
    task of a finished call still runs."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


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
        filesystem: _Filesystem,
        root: str,
        rename: bool,
        io_mode: str,
    ) -> None:
        super().__init__(config)
        self._filesystem = filesystem
        self._root = root
        self._prefix = root.rstrip("/") + "/"
        self._where = f"{config.protocol}://{root}"
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
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
        filesystem: _Filesystem | None = None
        pool: ThreadPoolExecutor | None = None
        loop = asyncio.get_running_loop()
        try:
            if fs_class.async_impl:
                fs = fs_class(asynchronous=True, loop=loop, **options)
                filesystem = _AsyncFilesystem(fs, rename=rename, concurrency=config.concurrency)
                io_mode = f"async, {config.concurrency} requests in flight"
            else:
                pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="kvstore-fsspec")
                built = loop.run_in_executor(pool, lambda: fs_class(**options))
                fs = await asyncio.wait_for(built, config.open_timeout_s)
                filesystem = _ThreadFilesystem(fs, pool, rename=rename)
                io_mode = f"{config.concurrency} threads"
            root = str(fs._strip_protocol(config.path))
            where = f"{config.protocol}://{root}"
            await asyncio.wait_for(filesystem.makedirs(root), config.open_timeout_s)
        except BaseException as exc:
            if filesystem is not None:
                await _close_quietly(filesystem, config.open_timeout_s)
            elif pool is not None:
                pool.shutdown(wait=False)
            if isinstance(exc, KVStoreError) or not isinstance(exc, Exception):
                raise
            raise _open_error(exc, config, where) from exc
        return cls(config, filesystem=filesystem, root=root, rename=rename, io_mode=io_mode)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _path(self, key: bytes) -> str:
        return self._prefix + relative_path(key, self.config.shard_depth)

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        values = dict(items)
        await self._call(
            "put_many",
            lambda lease: _gather_all(
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
            lambda lease: _gather_all(
                self._filesystem.read(self._path(key), target, lease)
                for key, target in zip(keys, targets)
            ),
        )

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        return await self._call(
            "contains_many",
            lambda _: _gather_all(self._filesystem.exists(self._path(key)) for key in keys),
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
        await self._idle.wait()
        await _close_quietly(self._filesystem, self.config.open_timeout_s)

    async def _call(self, operation: str, work: Callable[[_Lease], Awaitable[T]]) -> T:
        """Run one driver call within ``timeout_s``; library errors become typed ones."""
        lease = _Lease()
        self._calls += 1
        self._idle.clear()
        try:
            return await asyncio.wait_for(work(lease), self.config.timeout_s)
        except KVStoreError:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            raise DriverTimeoutError(
                f"{operation} on {self._where} took longer than {self.config.timeout_s} s",
                driver=self.name,
            ) from None
        except Exception as exc:
            raise _call_error(exc, operation, self._where, self.name) from exc
        finally:
            lease.revoke()
            self._calls -= 1
            if not self._calls:
                self._idle.set()


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


def _call_error(exc: Exception, operation: str, where: str, driver: str) -> KVStoreError:
    """Full storage is CapacityError, a value cut short TransientError, the rest (refused
    connections, HTTP and filesystem errors) DriverUnavailableError."""
    if isinstance(exc, OSError) and exc.errno in _FULL_DISK:
        return CapacityError(f"{operation} on {where}: the storage is full: {exc}", driver=driver)
    if isinstance(exc, EOFError):
        return TransientError(f"{operation} on {where}: {exc}", driver=driver)
    return DriverUnavailableError(
        f"{operation} on {where} failed: {type(exc).__name__}: {exc}", driver=driver
    )


async def _close_quietly(filesystem: _Filesystem, timeout: float) -> None:
    try:
        await asyncio.wait_for(filesystem.close(), timeout)
    except Exception as exc:
        log.warning("closing the fsspec filesystem failed: %s: %s", type(exc).__name__, exc)
