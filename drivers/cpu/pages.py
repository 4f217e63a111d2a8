"""Fixed-size pages of the cpu driver's arena and the runs a value occupies.

The arena is cut into equal pages and a value takes as many pages as it
needs, wherever they are free, so no pattern of puts and deletes can leave
free space that a value cannot use (no external fragmentation). Handing out
the lowest free pages first keeps values mostly contiguous, and
``page_segments`` merges neighbouring pages so one value usually costs one
memmove.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class PageAllocator:
    """Hands out page indices of an arena, lowest free index first.

    Free pages are kept as runs of neighbouring pages (start, length), sorted by
    start, so finding a run for a value and giving pages back cost a step per
    free run rather than per free page: an 8192-page arena spent about 0.1 ms a
    value sorting and scanning a list of free pages. Not thread-safe: the
    driver calls it under its own lock.
    """

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self._starts: list[int] = [0] if page_count else []
        self._lengths: dict[int, int] = {0: page_count} if page_count else {}
        self._free = page_count

    @property
    def free_count(self) -> int:
        """How many pages are free."""
        return self._free

    def allocate(self, count: int) -> list[int]:
        """The ``count`` lowest free pages, ascending; the caller checked ``free_count``."""
        if count > self._free:
            raise ValueError(f"{count} pages requested, {self._free} free")
        pages: list[int] = []
        used = 0
        while len(pages) < count:
            start = self._starts[used]
            length = self._lengths.pop(start)
            take = min(length, count - len(pages))
            pages.extend(range(start, start + take))
            if take < length:
                self._starts[used] = start + take
                self._lengths[start + take] = length - take
            else:
                used += 1
        del self._starts[:used]
        self._free -= count
        return pages

    def allocate_run(self, count: int) -> list[int] | None:
        """The lowest ``count`` neighbouring free pages, ascending, or ``None`` when
        no run that long is free (the caller checked ``free_count``)."""
        for index, start in enumerate(self._starts):
            length = self._lengths[start]
            if length < count:
                continue
            del self._lengths[start]
            if length == count:
                del self._starts[index]
            else:
                self._starts[index] = start + count
                self._lengths[start + count] = length - count
            self._free -= count
            return list(range(start, start + count))
        return None

    def release(self, pages: Sequence[int]) -> None:
        """Return pages that ``allocate`` or ``allocate_run`` handed out."""
        ordered = sorted(pages)
        first = 0
        for index in range(1, len(ordered) + 1):
            if index == len(ordered) or ordered[index] != ordered[index - 1] + 1:
                self._free_run(ordered[first], index - first)
                first = index
        self._free += len(ordered)

    def _free_run(self, start: int, length: int) -> None:
        """Add the free run ``[start, start + length)``, merged with its neighbours."""
        index = bisect.bisect_left(self._starts, start)
        if index < len(self._starts) and self._starts[index] == start + length:
            length += self._lengths.pop(start + length)
            del self._starts[index]
        if index > 0:
            before = self._starts[index - 1]
            if before + self._lengths[before] == start:
                self._lengths[before] += length
                return
        self._starts.insert(index, start)
        self._lengths[start] = length


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
