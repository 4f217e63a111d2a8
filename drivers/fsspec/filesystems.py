"""The filesystems under the fsspec driver: an async fsspec implementation driven on
the event loop, or a blocking one run on a thread pool, behind one small protocol."""

from __future__ import annotations

import asyncio
import os
import threading
from contextlib import suppress
from typing import Any, Protocol, TypeVar

from fsspec.asyn import AsyncFileSystem

from kvstore.driver import fill_into
from kvstore.inflight import CallLease, gather_all
from kvstore.threaded import DriverThreads

from .layout import TEMP_MARKER, temp_path

T = TypeVar("T")


READ_PIECE = 1 << 20
"""Bytes a worker thread reads before copying them into the caller's buffer, and the
first read of a streamed object."""


class Filesystem(Protocol):
    """What the driver needs of a filesystem, on paths it has already laid out."""

    async def read(
        self, path: str, target: memoryview | None, lease: CallLease
    ) -> memoryview | None:
        """The value at ``path`` (in ``target`` when it fits), or ``None`` if absent."""

    async def write(self, path: str, value: memoryview, lease: CallLease) -> None:
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
        """Release clients and sessions."""


class AsyncFilesystem:
    """An async fsspec implementation driven on the driver's event loop.

    Every copy into a caller's buffer happens on the loop under the call's
    lease, so a call that is cancelled or times out stops copying at once, and
    a put whose call has ended publishes nothing. Objects are streamed
    straight into the caller's buffer where the implementation offers
    ``open_async`` (s3fs), else fetched whole with ``_cat_file``.
    """

    def __init__(self, fs: Any, *, rename: bool, concurrency: int) -> None:
        self.fs = fs
        self._rename = rename
        self._slots = asyncio.Semaphore(concurrency)
        self._streams = type(fs).open_async is not AsyncFileSystem.open_async

    async def read(
        self, path: str, target: memoryview | None, lease: CallLease
    ) -> memoryview | None:
        async with self._slots:
            if not self._streams:
                try:
                    data = await self.fs._cat_file(path)
                except FileNotFoundError:
                    return None
                with lease.touching():
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
                lease.copy(target, filled, chunk)
                filled += len(chunk)
                if filled >= size:
                    return target[:size]
                chunk = await stream.read(size - filled)
                if not chunk:
                    raise EOFError(f"{path} ended after {filled} of {size} bytes")

    async def write(self, path: str, value: memoryview, lease: CallLease) -> None:
        async with self._slots:
            data = _as_bytes(value)
            if not self._rename:
                lease.check()
                await self._put(path, data)
                return
            temp = temp_path(path)
            await self._put(temp, data)
            try:
                lease.check()
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
        found = await gather_all(self.exists(path) for path in paths)
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


class ThreadFilesystem:
    """A blocking fsspec implementation run on the driver's thread pool.

    Threads touch a caller's buffer only through the call's ``CallLease``: local
    files are read in ``READ_PIECE`` pieces into a per-thread scratch buffer
    and copied under the lease; other filesystems hand back bytes
    (``cat_file``) that are copied the same way. A put reads the caller's
    value in the thread and publishes it (rename or write) only if the lease
    was still live once the value was read, so a late thread never publishes
    bytes the caller had already taken back.
    """

    def __init__(self, fs: Any, threads: DriverThreads, *, rename: bool) -> None:
        self.fs = fs
        self._threads = threads
        self._rename = rename
        self._local = bool(getattr(fs, "local_file", False))
        self._scratch = threading.local()

    async def read(
        self, path: str, target: memoryview | None, lease: CallLease
    ) -> memoryview | None:
        reader = self._read_local if self._local else self._read_bytes
        return await self._threads.run(reader, path, target, lease)

    def _read_bytes(
        self, path: str, target: memoryview | None, lease: CallLease
    ) -> memoryview | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        if target is None or len(target) < len(data):
            return memoryview(data)
        lease.copy(target, 0, data)
        return target[: len(data)]

    def _read_local(
        self, path: str, target: memoryview | None, lease: CallLease
    ) -> memoryview | None:
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

    async def write(self, path: str, value: memoryview, lease: CallLease) -> None:
        await self._threads.run(self._write, path, value, lease)

    def _write(self, path: str, value: memoryview, lease: CallLease) -> None:
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
        return bool(await self._threads.run(self.fs.isfile, path))

    async def remove_many(self, paths: list[str]) -> list[bool]:
        return await gather_all(self._threads.run(self._remove, path) for path in paths)

    def _remove(self, path: str) -> bool:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    async def entries(self, root: str) -> list[tuple[str, int]]:
        return await self._threads.run(_local_entries if self._local else self._found_entries, root)

    def _found_entries(self, root: str) -> list[tuple[str, int]]:
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return []
        return [(name, int(info["size"])) for name, info in found.items()]

    async def makedirs(self, path: str) -> None:
        await self._threads.run(
            lambda: self.fs.makedirs(path, exist_ok=True), operation=f"creating {path}"
        )

    async def close(self) -> None:
        """Nothing to release: the driver stops the threads."""


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
