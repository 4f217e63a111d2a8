"""The ``nvme`` driver: one file per value on a local disk, moved with O_DIRECT.

``nvme:///var/cache/kv?capacity=64GiB`` stores values under /var/cache/kv
(see layout.py for the files and docs/drivers/nvme.md for the whole story).
Values are split into ``io_block`` pieces that a pool of ``io_threads``
threads reads or writes in parallel with ``preadv``/``pwritev`` (GIL
released), straight from or into the caller's memory when it is 4 KiB
aligned; the pieces of earlier calls go first (ordered.py), and opens,
syncs, renames and closes run on a second pool of as many threads, so a
batch's file steps never queue behind other batches' pieces: read-ahead
batches finish in the order they were asked for, not all together. A put becomes
visible only once its file is complete and synced: temp file, fsync, atomic
rename, fsync of the directory. One process owns
the directory; others that open it each take a private slot of it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import Executor
from contextlib import suppress
from functools import partial
from typing import Any, ClassVar, TypeVar

from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
from kvstore.errors import CapacityError, DriverUnavailableError, KVStoreError
from kvstore.sizes import format_size
from kvstore.threaded import DriverThreads

from .config import NvmeConfig
from .directio import (
    O_CLOEXEC,
    O_DIRECT,
    Scratch,
    Transfer,
    aligned_buffer,
    pieces,
    probe_direct_io,
    read_piece,
    write_piece,
)
from .index import EntryIndex
from .layout import (
    LOCK_NAME,
    SHARDS,
    SLOTS_DIR,
    encode_header,
    entry_path,
    file_size,
    largest_value,
    padded,
    scan_shard,
    temp_path,
)
from .ordered import CALL_ORDER, OrderedPool

log = logging.getLogger(__name__)

T = TypeVar("T")


ZERO_COPY_NOTE = "get into buffers at 4096-aligned addresses (buffered I/O: any buffer)"
_READ_ATTEMPTS = 3
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NvmeDriver(Driver[NvmeConfig]):
    """Values as files on a local disk; persistent, listable, one owner per directory
    (or per slot of it, for the other processes that open it: ``slots``)."""

    config_type: ClassVar[type[DriverConfig]] = NvmeConfig
    static_capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        listable=True,
        zero_copy=True,
        shared=False,
        details=(
            ("io", "O_DIRECT, or buffered where the filesystem refuses it"),
            ("zero_copy", ZERO_COPY_NOTE),
        ),
    )

    def __init__(
        self,
        config: NvmeConfig,
        *,
        root: str,
        lock_fd: int,
        threads: DriverThreads,
        files: DriverThreads,
        index: EntryIndex,
        io_mode: str,
    ) -> None:
        super().__init__(config)
        self._root = root
        self._lock_fd = lock_fd
        self._threads = threads
        self._files = files
        self._call_numbers = itertools.count(1)
        self._index = index
        self._direct = io_mode == "O_DIRECT"
        self._scratch = Scratch(config.io_block)
        self._capabilities = Capabilities(
            persistent=True,
            listable=True,
            zero_copy=True,
            shared=False,
            max_value_bytes=largest_value(config.capacity),
            capacity_bytes=config.capacity,
            details=(("io", io_mode), ("zero_copy", ZERO_COPY_NOTE), ("path", root)),
        )

    @classmethod
    async def open(cls, config: NvmeConfig) -> Self:
        """Lock the directory, choose the I/O mode, clean leftovers and rebuild the index."""

        def errors(exc: Exception, operation: str) -> KVStoreError | None:
            return (
                _disk_error(exc, config.path, config.scheme) if isinstance(exc, OSError) else None
            )

        pieces = OrderedPool(config.io_threads, "kvstore-nvme")
        threads = DriverThreads(config.scheme, config.io_threads, errors, pool=pieces)
        files = DriverThreads(config.scheme, config.io_threads, errors)
        try:
            root, lock_fd, index, io_mode = await asyncio.to_thread(_prepare, config, threads.pool)
        except BaseException:
            await threads.close()
            await files.close()
            raise
        return cls(
            config,
            root=root,
            lock_fd=lock_fd,
            threads=threads,
            files=files,
            index=index,
            io_mode=io_mode,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def footprint(self, nbytes: int) -> int:
        """The value's file: a 4 KiB header block plus the value padded to 4 KiB."""
        return file_size(nbytes)

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        values = dict(items)
        capacity = self.config.capacity
        for value in values.values():
            if file_size(len(value)) > capacity:
                raise CapacityError(
                    f"a value of {len(value)} bytes takes {file_size(len(value))} bytes on disk, "
                    f"more than the capacity of {capacity} bytes",
                    driver=self.name,
                )
        if not self._index.reserve((key, len(value)) for key, value in values.items()):
            total = sum(file_size(len(value)) for value in values.values())
            raise CapacityError(
                f"{len(values)} values taking {total} bytes on disk do not fit: "
                f"{self._index.used} of {capacity} bytes are used",
                driver=self.name,
            )
        await self._in_order(self._put_batch(values))

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        targets: list[memoryview | None] = [None] * len(keys) if into is None else into
        return await self._in_order(self._get_batch(keys, targets))

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        return [key in self._index for key in keys]

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        return await self._in_order(self._delete_batch(keys))

    async def _list(self) -> AsyncIterator[KeyEntry]:
        for entry in self._index.entries():
            yield entry

    async def _usage(self) -> Usage:
        return Usage(len(self._index), self._index.value_bytes, self.config.capacity)

    async def _close(self) -> None:
        await self._threads.close()
        await self._files.close()
        await asyncio.to_thread(self._unlock)

    async def _in_order(self, work: Coroutine[Any, Any, T]) -> T:
        """Run one driver call under the next ``CALL_ORDER`` number, so its pieces are
        served before those of calls made after it."""
        token = CALL_ORDER.set(next(self._call_numbers))
        try:
            return await self._threads.complete(work)
        finally:
            CALL_ORDER.reset(token)

    def _unlock(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    async def _put_batch(self, values: dict[bytes, memoryview]) -> None:
        outcomes = await asyncio.gather(
            *(self._write_temp(key, value) for key, value in values.items()),
            return_exceptions=True,
        )
        staged: list[tuple[bytes, int, str]] = []
        errors: list[BaseException] = []
        for (key, value), outcome in zip(values.items(), outcomes):
            if isinstance(outcome, BaseException):
                self._index.release(len(value))
                errors.append(outcome)
            else:
                staged.append((key, len(value), outcome))
        if staged:
            directories, publish_errors = await self._files.run(self._publish, staged)
            errors.extend(_disk_error(exc, self._root, self.name) for exc in publish_errors)
            if self.config.fsync:
                synced = await asyncio.gather(
                    *(self._files.run(_fsync_directory, path) for path in directories),
                    return_exceptions=True,
                )
                errors.extend(exc for exc in synced if isinstance(exc, BaseException))
        if errors:
            raise errors[0]

    async def _write_temp(self, key: bytes, value: memoryview) -> str:
        """Write ``value`` with its header to a new temp file, synced; return its path."""
        path = temp_path(self._root, key)
        transfer = Transfer.source(value, self._direct)
        header = encode_header(key, len(value))
        parts = pieces(len(value), self.config.io_block)
        if len(parts) == 1:
            await self._threads.run(self._write_whole, path, transfer, parts[0], header)
            return path
        fd = await self._files.run(self._create_temp, path)
        scratch = self._scratch
        outcomes = await asyncio.gather(
            *(
                self._threads.run(
                    write_piece, fd, transfer, part, header if part[0] == 0 else None, scratch
                )
                for part in parts
            ),
            return_exceptions=True,
        )
        failure = next((exc for exc in outcomes if isinstance(exc, BaseException)), None)
        await self._files.run(self._seal_temp, fd, path, failure is None)
        if failure is not None:
            raise failure
        return path

    def _create_temp(self, path: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC | (O_DIRECT if self._direct else 0)
        return os.open(path, flags, 0o644)

    def _write_whole(
        self, path: str, transfer: Transfer, part: tuple[int, int], header: bytes
    ) -> None:
        fd = self._create_temp(path)
        try:
            write_piece(fd, transfer, part, header, self._scratch)
        except BaseException:
            self._seal_temp(fd, path, keep=False)
            raise
        self._seal_temp(fd, path, keep=True)

    def _seal_temp(self, fd: int, path: str, keep: bool) -> None:
        """Sync (when kept) and close a temp file; remove it unless it is kept and synced."""
        try:
            if keep and self.config.fsync:
                os.fsync(fd)
        except BaseException:
            keep = False
            raise
        finally:
            os.close(fd)
            if not keep:
                _remove_quietly(path)

    def _publish(self, staged: list[tuple[bytes, int, str]]) -> tuple[set[str], list[OSError]]:
        """Rename synced temp files onto their final names; the directories to sync and
        the renames that failed (their temp files removed, their reservations released)."""
        directories: set[str] = set()
        errors: list[OSError] = []
        for key, size, temp in staged:
            final = entry_path(self._root, key)
            try:
                self._index.commit(key, size, partial(os.replace, temp, final))
            except OSError as exc:
                self._index.release(size)
                _remove_quietly(temp)
                errors.append(exc)
            else:
                directories.add(os.path.dirname(final))
        return directories, errors

    async def _get_batch(
        self, keys: list[bytes], targets: list[memoryview | None]
    ) -> list[memoryview | None]:
        return list(await asyncio.gather(*(self._get_one(key, t) for key, t in zip(keys, targets))))

    async def _get_one(self, key: bytes, target: memoryview | None) -> memoryview | None:
        """Read one value; retried when a concurrent put replaced the file under us."""
        path = entry_path(self._root, key)
        for _ in range(_READ_ATTEMPTS):
            length = self._index.size(key)
            if length is None:
                return None
            buffer = (
                target
                if target is not None and len(target) >= length
                else aligned_buffer(padded(length))
            )
            transfer = Transfer.destination(buffer, length, self._direct)
            found = await self._read_file(path, key, transfer)
            if found is None:
                return None
            if found == length:
                return buffer[:length]
        return None

    async def _read_file(self, path: str, key: bytes, transfer: Transfer) -> int | None:
        """Read a value's file into ``transfer``: the value length its header names
        (a different length means the file was replaced; read again), or ``None`` for a
        miss (absent, or corrupt and now removed)."""
        parts = pieces(transfer.length, self.config.io_block)
        if len(parts) == 1:
            return await self._threads.run(self._read_whole, path, key, transfer)
        fd = await self._files.run(self._open_value, path)
        if fd is None:
            return None
        outcomes = await asyncio.gather(
            *(
                self._threads.run(
                    read_piece, fd, transfer, part, self._direct, self._scratch, index == 0
                )
                for index, part in enumerate(parts)
            ),
            return_exceptions=True,
        )
        read: list[tuple[tuple[bytes, int] | None, bool]] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                await self._files.run(os.close, fd)
                raise outcome
            read.append(outcome)
        header = read[0][0]
        complete = all(piece_complete for _, piece_complete in read)
        return await self._files.run(
            self._conclude_read, fd, path, key, transfer.length, header, complete
        )

    def _read_whole(self, path: str, key: bytes, transfer: Transfer) -> int | None:
        fd = self._open_value(path)
        if fd is None:
            return None
        try:
            part = pieces(transfer.length, self.config.io_block)[0]
            header, complete = read_piece(fd, transfer, part, self._direct, self._scratch, True)
        except BaseException:
            os.close(fd)
            raise
        return self._conclude_read(fd, path, key, transfer.length, header, complete)

    def _open_value(self, path: str) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | O_CLOEXEC | (O_DIRECT if self._direct else 0))
        except FileNotFoundError:
            return None

    def _conclude_read(
        self,
        fd: int,
        path: str,
        key: bytes,
        length: int,
        header: tuple[bytes, int] | None,
        complete: bool,
    ) -> int | None:
        """Judge a finished read and close its file; remove the file if it is corrupt."""
        try:
            if header is not None and header[0] == key and header[1] != length:
                return header[1]
            if header is not None and header[0] == key and complete:
                return length
            reason = "a bad header" if header is None or header[0] != key else "a truncated value"
            if self._drop_if_current(key, path, fd):
                log.warning("removed %s: %s", path, reason)
            return None
        finally:
            os.close(fd)

    def _drop_if_current(self, key: bytes, path: str, fd: int) -> bool:
        """Remove the file at ``path`` if it is still the one open as ``fd``."""
        opened = os.fstat(fd)

        def unlink_same() -> bool:
            try:
                current = os.stat(path)
            except FileNotFoundError:
                return False
            if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                return False
            os.unlink(path)
            return True

        return self._index.remove(key, unlink_same)

    async def _delete_batch(self, keys: list[bytes]) -> list[bool]:
        removed, directories = await self._files.run(self._unlink_values, keys)
        if self.config.fsync and directories:
            await asyncio.gather(*(self._files.run(_fsync_directory, path) for path in directories))
        return removed

    def _unlink_values(self, keys: list[bytes]) -> tuple[list[bool], set[str]]:
        removed: list[bool] = []
        directories: set[str] = set()
        for key in keys:
            path = entry_path(self._root, key)
            gone = self._index.remove(key, partial(_unlink_if_present, path))
            removed.append(gone)
            if gone:
                directories.add(os.path.dirname(path))
        return removed, directories


def _disk_error(exc: OSError, where: str, driver: str) -> KVStoreError:
    """The kvstore error for a failed disk operation under ``where``: CapacityError when
    the disk is full, else DriverUnavailableError."""
    if exc.errno in _FULL_DISK:
        return CapacityError(f"the disk under {where} is full: {exc}", driver=driver)
    return DriverUnavailableError(f"disk I/O failed under {where}: {exc}", driver=driver)


def _prepare(config: NvmeConfig, pool: Executor) -> tuple[str, int, EntryIndex, str]:
    """Blocking part of ``open``: the slot directory taken and its lock, the shard
    directories, the I/O mode and the index."""
    path = os.path.abspath(config.path)
    try:
        root, lock_fd = _take_slot(path, config)
    except OSError as exc:
        raise DriverUnavailableError(f"cannot open {path}: {exc}", driver=config.scheme) from exc
    try:
        io_mode = _choose_io_mode(config, root)
        present = set(os.listdir(root))
        for shard in SHARDS:
            if shard not in present:
                os.mkdir(os.path.join(root, shard))
        if config.fsync and not present.issuperset(SHARDS):
            _fsync_directory(root)
        scans = list(pool.map(scan_shard, [os.path.join(root, shard) for shard in SHARDS]))
    except BaseException as exc:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
        if isinstance(exc, OSError):
            raise DriverUnavailableError(
                f"cannot open {root}: {exc}", driver=config.scheme
            ) from exc
        raise
    removed_temp = sum(scan.removed_temp for scan in scans)
    removed_invalid = sum(scan.removed_invalid for scan in scans)
    if removed_temp or removed_invalid:
        log.warning(
            "%s: removed %d unfinished temp files and %d corrupt or foreign files",
            root,
            removed_temp,
            removed_invalid,
        )
    relocated = sum(scan.relocated for scan in scans)
    if relocated:
        log.info("%s: moved %d files into the shards their keys hash to", root, relocated)
    index = EntryIndex(config.capacity, (entry for scan in scans for entry in scan.entries))
    if index.used > config.capacity:
        log.warning(
            "%s holds %s, more than its capacity of %s; puts fail until entries are deleted",
            root,
            format_size(index.used),
            format_size(config.capacity),
        )
    return root, lock_fd, index, io_mode


def _take_slot(path: str, config: NvmeConfig) -> tuple[str, int]:
    """The first slot of ``path`` no open driver holds (``path`` itself, then
    ``path/slots/1`` ...) and its lock, or DriverUnavailableError naming who holds them."""
    holders: list[str] = []
    for slot in range(config.slots):
        root = path if slot == 0 else os.path.join(path, SLOTS_DIR, str(slot))
        os.makedirs(root, exist_ok=True)
        fd, holder = _lock_directory(root)
        if fd is not None:
            if slot:
                log.info("%s is in use by process %s; this driver takes %s", path, holders[0], root)
            return root, fd
        holders.append(holder)
    lock = os.path.join(path, LOCK_NAME)
    if config.slots == 1:
        reason = f"process {holders[0]} holds the lock on {lock}; close that driver first"
    else:
        reason = f"all {config.slots} slots are taken (processes {', '.join(holders)})"
    raise DriverUnavailableError(
        f"{path} is in use by another open nvme driver ({reason}); raise slots= or use "
        "another directory",
        driver=config.scheme,
    )


def _lock_directory(root: str) -> tuple[int | None, str]:
    """Take the directory's exclusive lock (an flock on its lock file): its file
    descriptor, or ``None`` and the pid of the process that holds it."""
    path = os.path.join(root, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, str(os.getpid())


def _choose_io_mode(config: NvmeConfig, root: str) -> str:
    """``"O_DIRECT"``, or ``"buffered: <why>"`` where O_DIRECT is off or refused."""
    if config.direct_io == "off":
        return "buffered: direct_io=off"
    refusal = probe_direct_io(root)
    if refusal is None:
        return "O_DIRECT"
    if config.direct_io == "on":
        raise DriverUnavailableError(f"direct_io=on but {refusal} at {root}", driver=config.scheme)
    return f"buffered: {refusal}"


def _fsync_directory(path: str) -> None:
    """Make renames and unlinks in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    """Remove a temp file on a failure path; one left behind is cleaned on the next open."""
    with suppress(OSError):
        os.unlink(path)


def _unlink_if_present(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
