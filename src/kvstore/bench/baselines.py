"""The raw baselines each tier is measured against: a copy, O_DIRECT I/O, a server's raw client."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from kvstore.bench.rows import _ALIGN, _O_CLOEXEC, _O_DIRECT, Workload
from kvstore.errors import ConfigError
from kvstore.sizes import format_size


class Baseline(Protocol):
    """The raw yardstick of a tier: the same bytes moved with nothing in between."""

    description: str

    def write(self) -> float: ...

    def read(self) -> float: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class CopyBaseline:
    """The cpu tier's yardstick: ``dst.copy_(src)`` per chunk, pre-touched tensors."""

    def __init__(self, workload: Workload) -> None:
        self.description = f"torch copy_, {torch.get_num_threads()} threads"
        self._host = workload.kv_bytes().clone()
        self._arena = torch.zeros_like(self._host)

    def write(self) -> float:
        return _timed(lambda: _copy_rows(self._arena, self._host))

    def read(self) -> float:
        return _timed(lambda: _copy_rows(self._host, self._arena))

    def reset(self) -> None:
        """Nothing to undo: the next write overwrites the same memory."""

    def close(self) -> None:
        """The tensors go with the object."""


def _copy_rows(destination: torch.Tensor, source: torch.Tensor) -> None:
    for target, row in zip(destination, source):
        target.copy_(row)


class DirectIOBaseline:
    """The nvme tier's yardstick: O_DIRECT pwrite/pread of one file per chunk.

    Each chunk, padded to 4 KiB as O_DIRECT requires, moves in ``piece``-byte
    pwrite/pread calls spread over ``threads`` threads: the queue depth the
    nvme driver keeps with the same ``io_threads`` and ``io_block``. Buffers
    are anonymous mappings (page-aligned, touched before timing); the files
    live next to the store's, on the same filesystem and device. With
    ``fsync`` (the driver's default) each file is fsynced before it is closed,
    so both sides pay for durability.
    """

    def __init__(
        self, directory: Path, workload: Workload, *, threads: int, piece: int, fsync: bool
    ) -> None:
        _check_direct_io(directory)
        self.description = (
            f"O_DIRECT pwrite{'+fsync' if fsync else ''}/pread of {format_size(piece)} "
            f"pieces on {threads} threads, a file a chunk"
        )
        self.threads = threads
        self._fsync = fsync
        chunks = workload.chunks
        size = -(-workload.chunk_bytes // _ALIGN) * _ALIGN
        self._paths = [directory / f"chunk-{i:05d}" for i in range(chunks)]
        self._source = mmap.mmap(-1, size * chunks)
        self._target = mmap.mmap(-1, size * chunks)
        source = np.frombuffer(self._source, dtype=np.uint8).reshape(chunks, size)
        source[:, workload.chunk_bytes :] = 0
        source[:, : workload.chunk_bytes] = workload.kv_bytes().numpy()
        np.frombuffer(self._target, dtype=np.uint8)[:] = 0
        self._pieces = [
            (index, offset, min(piece, size - offset))
            for index in range(chunks)
            for offset in range(0, size, piece)
        ]
        self._size = size
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-direct-io")

    def _view(self, buffer: mmap.mmap, index: int, offset: int, length: int) -> memoryview:
        start = index * self._size + offset
        return memoryview(buffer)[start : start + length]

    def _open_all(self, flags: int) -> list[int]:
        return [os.open(path, flags | _O_DIRECT | _O_CLOEXEC, 0o600) for path in self._paths]

    def _move(self, fds: list[int], buffer: mmap.mmap, write: bool) -> None:
        def one(piece: tuple[int, int, int]) -> None:
            index, offset, length = piece
            view = self._view(buffer, index, offset, length)
            done = 0
            while done < length:
                if write:
                    moved = os.pwrite(fds[index], view[done:], offset + done)
                else:
                    moved = os.preadv(fds[index], [view[done:]], offset + done)
                if moved == 0:
                    raise OSError(f"{self._paths[index]} is shorter than it was written")
                done += moved

        list(self._pool.map(one, self._pieces))

    def _finish(self, fd: int) -> None:
        try:
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def write(self) -> float:
        def run() -> None:
            fds = self._open_all(os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                self._move(fds, self._source, write=True)
            finally:
                list(self._pool.map(self._finish, fds))

        return _timed(run)

    def read(self) -> float:
        def run() -> None:
            fds = self._open_all(os.O_RDONLY)
            try:
                self._move(fds, self._target, write=False)
            finally:
                for fd in fds:
                    os.close(fd)

        return _timed(run)

    def reset(self) -> None:
        """Delete the files, as the store's clear() deletes its chunks."""
        for path in self._paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.reset()
        self._pool.shutdown(wait=True)
        self._source.close()
        self._target.close()


def _check_direct_io(directory: Path) -> None:
    """Refuse a filesystem without O_DIRECT (tmpfs): the baseline would be meaningless."""
    probe = directory / "baseline-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | _O_DIRECT | _O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"{directory} does not support O_DIRECT ({exc.strerror}); "
            "pass --dir on a disk-backed filesystem"
        ) from None
    os.close(fd)
    probe.unlink()


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start
