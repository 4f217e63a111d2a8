"""Host memory as the Mooncake client sees it: raw addresses, registered regions, copies.

The client moves bytes between addresses: ``put_from``/``get_into`` take a
pointer and a size. Zero-copy calls need memory registered with its transfer
engine (RDMA requires it), so the driver copies values through its staging
leases unless they lie in a region the caller registered. Copies here use
``ctypes.memmove``, which releases the GIL, so worker threads copy in parallel.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


def address_of(view: memoryview) -> int:
    """The address of a flat byte view's first byte (read-only views too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


def copy(destination: int, source: int, size: int) -> None:
    """Copy ``size`` bytes between addresses, with the GIL released."""
    if size:
        ctypes.memmove(destination, source, size)


def view_at(address: int, size: int, *, readonly: bool) -> memoryview:
    """A flat byte view of ``size`` bytes at ``address``; it holds no reference to the
    memory's owner, so the caller must know the memory outlives the view."""
    if not size:
        return memoryview(b"")
    view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return view.toreadonly() if readonly else view


def fresh_buffer(size: int) -> tuple[memoryview, int]:
    """A new writable byte buffer of ``size`` bytes (not zero-filled) and its address."""
    array: Any = np.empty(size, dtype=np.uint8)
    return memoryview(array), int(array.ctypes.data)


@dataclass(frozen=True)
class Region:
    """A caller's buffer registered with the transfer engine, kept alive while registered."""

    start: int
    end: int
    view: memoryview


class Regions:
    """The registered regions, sorted by address, so a value's region is found in log time.

    Changed and read on the driver's event loop only.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[Region]:
        return iter(list(self._regions))

    def overlaps(self, start: int, end: int) -> bool:
        index = bisect.bisect_right(self._starts, start)
        before = self._regions[index - 1] if index else None
        after = self._regions[index] if index < len(self._regions) else None
        return (before is not None and before.end > start) or (
            after is not None and after.start < end
        )

    def add(self, region: Region) -> None:
        index = bisect.bisect_right(self._starts, region.start)
        self._starts.insert(index, region.start)
        self._regions.insert(index, region)

    def remove(self, start: int) -> Region | None:
        index = bisect.bisect_left(self._starts, start)
        if index == len(self._starts) or self._starts[index] != start:
            return None
        del self._starts[index]
        return self._regions.pop(index)

    def holds(self, start: int, size: int) -> bool:
        """Whether ``[start, start + size)`` lies inside one registered region."""
        if not self._regions or not start:
            return False
        index = bisect.bisect_right(self._starts, start) - 1
        return index >= 0 and start + size <= self._regions[index].end
