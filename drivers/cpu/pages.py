"""Fixed-size pages of the cpu driver's arena and the runs a value occupies.

The arena is cut into equal pages and a value takes as many pages as it
needs, wherever they are free, so no pattern of puts and deletes can leave
free space that a value cannot use (no external fragmentation). Handing out
the lowest free pages first keeps values mostly contiguous, and
``page_segments`` merges neighbouring pages so one value usually costs one
memmove.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


class PageAllocator:
    """Hands out page indices of an arena, lowest free index first.

    Not thread-safe: the driver calls it under its own lock.
    """

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self._free = list(range(page_count))  # an ascending list is already a heap

    @property
    def free_count(self) -> int:
        """How many pages are free."""
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """The ``count`` lowest free pages, ascending; the caller checked ``free_count``."""
        if count > len(self._free):
            raise ValueError(f"{count} pages requested, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(count)]

    def allocate_run(self, count: int) -> list[int] | None:
        """The lowest ``count`` neighbouring free pages, ascending, or ``None`` when
        no run that long is free (the caller checked ``free_count``)."""
        free = self._free
        free.sort()  # a sorted list is still a heap, and slicing keeps it sorted
        for start in range(len(free) - count + 1):
            if free[start + count - 1] - free[start] == count - 1:
                run = free[start : start + count]
                del free[start : start + count]
                return run
        return None

    def release(self, pages: Sequence[int]) -> None:
        """Return pages that ``allocate`` handed out."""
        for page in pages:
            heapq.heappush(self._free, page)


def pages_for(size: int, page_size: int) -> int:
    """How many pages a value of ``size`` bytes occupies."""
    return -(-size // page_size)


def page_segments(pages: Sequence[int], page_size: int, size: int) -> list[tuple[int, int]]:
    """The ``(arena offset, length)`` runs holding a value of ``size`` bytes
    stored in ascending ``pages``, neighbouring pages merged into one run."""
    segments: list[tuple[int, int]] = []
    remaining = size
    run_start = 0
    for index in range(1, len(pages) + 1):
        if index == len(pages) or pages[index] != pages[index - 1] + 1:
            length = min((index - run_start) * page_size, remaining)
            segments.append((pages[run_start] * page_size, length))
            remaining -= length
            run_start = index
    return segments
