"""The ``cpu`` driver: values in one page-locked host-memory arena.

The arena has a hard capacity and is cut into fixed-size pages; a value
takes the lowest free pages it needs (see ``pages.py``), so churn never
fragments it. A put reserves pages under the lock, copies outside it and
publishes under it, so readers see the old value or the new one, never half
of one. A reader pins the entry while it copies, and a loan the entries it
lends, so an overwrite or delete frees the pages only when the last reader or
loan is done. A writer may instead borrow room (``lend_many``: one contiguous
run of pages per value), encode straight into it and commit, which publishes
the values as a put does; an aborted loan frees the pages, unseen. Copies of
1 MiB or more are split across a small thread pool (numpy copies release the
GIL) so the event loop stays free and a big value moves at memcpy speed.

One driver serves one event loop; its copies run on its worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
from kvstore.errors import CapacityError
from kvstore.sizes import ByteSize, format_size, human_size

from .pages import PageAllocator, page_segments, pages_for
from .pinned import HostMemory

OFFLOAD_BYTES = 1 << 20
"""Copies at least this big run on the worker threads; smaller ones inline."""

MIN_SHARE_BYTES = 1 << 20
"""The least one worker thread is given of a split copy."""

_ALIGNMENT = 4096

ByteArray = npt.NDArray[np.uint8]
CopyPair = tuple[ByteArray, ByteArray]
"""A destination and a source array of the same length."""


class CpuConfig(DriverConfig):
    """``cpu://?capacity=4GiB&pin=auto``: a host-memory arena.

    capacity: the arena's size and hard limit, a whole number of pages.
    pin: how the arena is page-locked: ``auto`` (CUDA registration where a
        CUDA device exists, else mlock, else pageable with a warning),
        ``cuda``, ``mlock`` or ``none``.
    page_size: the allocation unit; every value occupies whole pages.
    copy_threads: worker threads for large copies (at most the CPU count is used).
    shared: back the arena with a memfd mapped shared, so another process given
        its descriptor (``CpuDriver.shared_memory``) maps the same pages; the
        node service (docs/node.md) lends its arena to clients this way.
    """

    scheme: ClassVar[str] = "cpu"

    capacity: ByteSize = 1 << 30
    pin: Literal["auto", "cuda", "mlock", "none"] = "auto"
    page_size: ByteSize = 256 << 10
    copy_threads: int = Field(default=4, ge=1, le=64)
    shared: bool = False

    @model_validator(mode="after")
    def _whole_pages(self) -> Self:
        if self.page_size < _ALIGNMENT or self.page_size % _ALIGNMENT:
            raise ValueError(f"page_size must be a positive multiple of {_ALIGNMENT} bytes")
        if self.capacity < self.page_size or self.capacity % self.page_size:
            raise ValueError(
                f"capacity must be a whole number of pages of {format_size(self.page_size)}"
            )
        return self


@dataclass(eq=False)
class ArenaEntry:
    """A value in the arena: its size, its pages (``segments``: the arena offset and
    length of each run), and who is still reading it."""

    size: int
    pages: list[int]
    segments: list[tuple[int, int]]
    readers: int = 0
    retired: bool = False


class CpuDriver(Driver[CpuConfig]):
    """Values in one page-locked host-memory arena of a hard capacity."""

    config_type: ClassVar[type[DriverConfig]] = CpuConfig
    static_capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False,
        listable=True,
        zero_copy=True,
        lends_views=True,
        lends_room=True,
        in_process=True,
        shared=False,
    )

    def __init__(self, config: CpuConfig, memory: HostMemory) -> None:
        super().__init__(config)
        self._memory = memory
        self._page_size = config.page_size
        self._pages = PageAllocator(config.capacity // config.page_size)
        self._entries: dict[bytes, ArenaEntry] = {}
        self._stored_bytes = 0
        self._lock = threading.Lock()
        self._workers = min(config.copy_threads, os.cpu_count() or 1)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="kvstore-cpu-copy"
        )
        self._active_calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._capabilities = dataclasses.replace(
            self.static_capabilities,
            max_value_bytes=config.capacity,
            capacity_bytes=config.capacity,
            # Other processes write a shared arena: what it holds crossed a
            # process boundary, so reads of it stay verified.
            in_process=not config.shared,
            details=(
                ("pinning", memory.pinning),
                ("page_size", format_size(config.page_size)),
                ("copy_threads", str(self._workers)),
                *((("memory", "shared memfd"),) if config.shared else ()),
            ),
        )

    @classmethod
    async def open(cls, config: CpuConfig) -> Self:
        """Map and pin the arena (off the event loop: pinning touches every page)."""
        memory = await asyncio.to_thread(
            HostMemory.allocate, config.capacity, config.pin, config.scheme, shared=config.shared
        )
        return cls(config, memory)

    @property
    def capabilities(self) -> Capabilities:
        """The static flags plus the capacity and, in ``details``, the pinning in effect."""
        return self._capabilities

    def footprint(self, nbytes: int) -> int:
        """Whole pages: a value takes ``pages_for(nbytes)`` pages of the arena."""
        return pages_for(nbytes, self._page_size) * self._page_size

    @property
    def free_bytes(self) -> int:
        """Bytes of free pages: the largest value a put can take right now."""
        with self._lock:
            return self._pages.free_count * self._page_size

    @property
    def shared_memory(self) -> int | None:
        """The memfd of a ``shared`` arena (``None`` otherwise); mapping it gives
        another process the arena, offsets as in ``ArenaEntry.segments``."""
        return self._memory.fd

    def reserve_room(
        self, items: Sequence[tuple[bytes, int]], *, one_run: bool = False
    ) -> list[ArenaEntry | None]:
        """Pages for values of the given sizes, to be written in place (through the
        shared mapping) and then published with ``commit_room`` or freed with
        ``abort_room``; unseen by readers until committed. CapacityError when the
        batch does not fit. With ``one_run`` each value gets one contiguous run
        of pages, ``None`` where no free run can hold it."""
        self._check_open()
        return self._reserve_runs(items, one_run=one_run)

    def commit_room(self, keys: Sequence[bytes], entries: Sequence[ArenaEntry | None]) -> None:
        """Publish reserved room, written in full, as the values of ``keys``
        (skipping the ``None`` entries a ``one_run`` reservation may hold)."""
        lent = [(key, entry) for key, entry in zip(keys, entries, strict=True) if entry is not None]
        self._publish([key for key, _ in lent], [entry for _, entry in lent])

    def abort_room(self, entries: Sequence[ArenaEntry | None]) -> None:
        """Free reserved room that will not be committed."""
        self._discard(list(entries))

    def lend(self, keys: Sequence[bytes]) -> list[ArenaEntry | None]:
        """The entries of ``keys`` (``None`` where absent), kept intact, whatever is
        overwritten or deleted meanwhile, until ``end_loan``."""
        self._check_open()
        return self._pin(list(keys))

    def end_loan(self, entries: Sequence[ArenaEntry | None]) -> None:
        """End a loan from ``lend``; pages retired meanwhile are freed now."""
        self._unpin(list(entries))

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        with self._call():
            entries = self._reserve([(key, len(view)) for key, view in items])
            try:
                pairs: list[CopyPair] = []
                for (_, view), entry in zip(items, entries, strict=True):
                    value = np.frombuffer(view, dtype=np.uint8)
                    pairs.extend(self._pairs(entry, value, to_arena=True))
                await self._copy(pairs)
            except BaseException:
                self._discard(entries)
                raise
            self._publish([key for key, _ in items], entries)

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        with self._call():
            entries = self._pin(keys)
            try:
                results: list[memoryview | None] = []
                pairs: list[CopyPair] = []
                for index, entry in enumerate(entries):
                    if entry is None:
                        results.append(None)
                        continue
                    target = None if into is None else into[index]
                    if target is not None and entry.size <= len(target):
                        result = target[: entry.size]
                        value = np.frombuffer(result, dtype=np.uint8)
                    else:
                        value = np.empty(entry.size, dtype=np.uint8)
                        result = value.data
                    results.append(result)
                    pairs.extend(self._pairs(entry, value, to_arena=False))
                await self._copy(pairs)
                return results
            finally:
                self._unpin(entries)

    def _borrow_many(
        self, keys: list[bytes]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        return _Loan(self, keys)

    def _lend_many(
        self, items: list[tuple[bytes, int]]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        return _Room(self, items)

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._entries for key in keys]

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        deleted: list[bool] = []
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                deleted.append(entry is not None)
                if entry is not None:
                    self._stored_bytes -= entry.size
                    self._retire(entry)
        return deleted

    async def _list(self) -> AsyncIterator[KeyEntry]:
        with self._lock:
            snapshot = [KeyEntry(key, entry.size) for key, entry in self._entries.items()]
        for entry in snapshot:
            yield entry

    async def _usage(self) -> Usage:
        with self._lock:
            return Usage(len(self._entries), self._stored_bytes, self.config.capacity)

    async def _close(self) -> None:
        await self._idle.wait()
        self._executor.shutdown(wait=True)
        with self._lock:
            self._entries.clear()
            self._stored_bytes = 0
        self._memory.release()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Count a call that copies, so ``close`` waits for it before unmapping."""
        self._active_calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active_calls -= 1
            if not self._active_calls:
                self._idle.set()

    def _reserve(self, items: Sequence[tuple[bytes, int]]) -> list[ArenaEntry]:
        """Allocate pages for every value of a batch, or raise CapacityError for all of it."""
        entries = self._reserve_runs(items, one_run=False)
        return [entry for entry in entries if entry is not None]

    def _reserve_runs(
        self, items: Sequence[tuple[bytes, int]], *, one_run: bool
    ) -> list[ArenaEntry | None]:
        """``_reserve``; with ``one_run``, each value in one contiguous run of pages,
        ``None`` for a value no free run can hold."""
        if not items:
            return []
        capacity = self.config.capacity
        largest = max(size for _, size in items)
        if largest > capacity:
            raise CapacityError(
                f"a value of {largest} bytes is larger than the capacity of {capacity} bytes",
                driver=self.name,
            )
        counts = [pages_for(size, self._page_size) for _, size in items]
        with self._lock:
            if sum(counts) > self._pages.free_count:
                self._make_room([key for key, _ in items], sum(counts))
            entries: list[ArenaEntry | None] = []
            for (_, size), count in zip(items, counts, strict=True):
                pages = self._pages.allocate_run(count) if one_run else self._pages.allocate(count)
                if pages is None:
                    entries.append(None)
                    continue
                entries.append(ArenaEntry(size, pages, page_segments(pages, self._page_size, size)))
        return entries

    def _make_room(self, keys: list[bytes], needed: int) -> None:
        """Drop the old values of the keys a batch overwrites when that frees
        enough pages for it (they read as misses until it lands); else raise."""
        replaced = {
            key: entry
            for key in keys
            if (entry := self._entries.get(key)) is not None and entry.readers == 0
        }
        free = self._pages.free_count
        if free + sum(len(entry.pages) for entry in replaced.values()) < needed:
            raise CapacityError(
                f"the batch needs {human_size(needed * self._page_size)} of pages and "
                f"{human_size(free * self._page_size)} of "
                f"{human_size(self.config.capacity)} is free",
                driver=self.name,
            )
        for key, entry in replaced.items():
            del self._entries[key]
            self._stored_bytes -= entry.size
            self._retire(entry)

    def _publish(self, keys: list[bytes], entries: list[ArenaEntry]) -> None:
        with self._lock:
            for key, entry in zip(keys, entries, strict=True):
                old = self._entries.get(key)
                self._entries[key] = entry
                self._stored_bytes += entry.size
                if old is not None:
                    self._stored_bytes -= old.size
                    self._retire(old)

    def _discard(self, entries: Sequence[ArenaEntry | None]) -> None:
        with self._lock:
            for entry in entries:
                if entry is not None:
                    self._pages.release(entry.pages)

    def _pin(self, keys: list[bytes], *, one_run: bool = False) -> list[ArenaEntry | None]:
        """The entries of ``keys``, pinned so their pages outlive an overwrite or
        delete; ``None`` where absent or, with ``one_run``, held in several runs."""
        with self._lock:
            entries = [self._entries.get(key) for key in keys]
            if one_run:
                entries = [
                    entry if entry is not None and len(entry.segments) <= 1 else None
                    for entry in entries
                ]
            for entry in entries:
                if entry is not None:
                    entry.readers += 1
        return entries

    def _unpin(self, entries: list[ArenaEntry | None]) -> None:
        with self._lock:
            for entry in entries:
                if entry is not None:
                    entry.readers -= 1
                    if entry.retired and not entry.readers:
                        self._pages.release(entry.pages)

    def _retire(self, entry: ArenaEntry) -> None:
        """Mark an unpublished entry's pages for reuse once no reader holds them."""
        entry.retired = True
        if not entry.readers:
            self._pages.release(entry.pages)

    def _pairs(self, entry: ArenaEntry, value: ByteArray, *, to_arena: bool) -> list[CopyPair]:
        """The copies between ``value`` and the arena runs that hold it."""
        arena = self._memory.array
        pairs: list[CopyPair] = []
        position = 0
        for offset, length in entry.segments:
            stored = arena[offset : offset + length]
            piece = value[position : position + length]
            pairs.append((stored, piece) if to_arena else (piece, stored))
            position += length
        return pairs

    async def _copy(self, pairs: list[CopyPair]) -> None:
        """Run the copies: inline when small, else split across the worker threads.

        Returns only once every worker has stopped, even when cancelled, so the
        caller never releases pages a thread is still copying.
        """
        total = sum(len(destination) for destination, _ in pairs)
        if total < OFFLOAD_BYTES:
            _copy_all(pairs)
            return
        shares = _split(pairs, min(self._workers, max(1, total // MIN_SHARE_BYTES)))
        futures = [self._executor.submit(_copy_all, share) for share in shares]
        try:
            await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
        finally:
            concurrent.futures.wait(futures)


def _copy_all(pairs: list[CopyPair]) -> None:
    for destination, source in pairs:
        np.copyto(destination, source)


def _split(pairs: list[CopyPair], count: int) -> list[list[CopyPair]]:
    """Cut the copies into ``count`` shares of about equal bytes."""
    total = sum(len(destination) for destination, _ in pairs)
    share_bytes = -(-total // count)
    shares: list[list[CopyPair]] = [[]]
    room = share_bytes
    for destination, source in pairs:
        start = 0
        while start < len(destination):
            if not room:
                shares.append([])
                room = share_bytes
            end = min(len(destination), start + room)
            shares[-1].append((destination[start:end], source[start:end]))
            room -= end - start
            start = end
    return shares


class _Loan:
    """Read-only views of arena values held in one contiguous run, for one ``async with``.

    The lent entries, and only those, are pinned like a reader's, so an
    overwrite or delete meanwhile leaves their pages alone until the loan ends
    (a value not lent is freed at once), and ``close`` waits for it.
    """

    def __init__(self, driver: CpuDriver, keys: list[bytes]) -> None:
        self._driver = driver
        self._keys = keys
        self._entries: list[ArenaEntry | None] = []
        self._call = driver._call()

    async def __aenter__(self) -> list[memoryview | None]:
        self._call.__enter__()
        self._entries = self._driver._pin(self._keys, one_run=True)
        arena = self._driver._memory.array
        views: list[memoryview | None] = []
        for entry in self._entries:
            if entry is None:
                views.append(None)
                continue
            offset = entry.segments[0][0] if entry.segments else 0
            views.append(arena[offset : offset + entry.size].data.toreadonly())
        return views

    async def __aexit__(self, *exc: object) -> None:
        self._driver._unpin(self._entries)
        self._call.__exit__(None, None, None)


class _Room:
    """Writable room for new values, one contiguous run of pages each, for one
    ``async with``: published together when the block exits normally, freed
    unseen when it exits by an exception."""

    def __init__(self, driver: CpuDriver, items: list[tuple[bytes, int]]) -> None:
        self._driver = driver
        self._items = items
        self._entries: list[ArenaEntry | None] = []
        self._call = driver._call()

    async def __aenter__(self) -> list[memoryview | None]:
        self._call.__enter__()
        try:
            self._entries = self._driver._reserve_runs(self._items, one_run=True)
        except BaseException:
            self._call.__exit__(None, None, None)
            raise
        arena = self._driver._memory.array
        rooms: list[memoryview | None] = []
        for entry in self._entries:
            offset = entry.segments[0][0] if entry is not None and entry.segments else 0
            rooms.append(None if entry is None else arena[offset : offset + entry.size].data)
        return rooms

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self._driver.commit_room([key for key, _ in self._items], self._entries)
            else:
                self._driver._discard(self._entries)
        finally:
            self._call.__exit__(None, None, None)
