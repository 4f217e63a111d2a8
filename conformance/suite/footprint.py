"""Footprint: what a driver says a value occupies is what its capacity counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pytest

from kvstore.errors import CapacityError

from ..harness import DriverHarness
from .base import DriverTestBase

MiB = 1 << 20


class FootprintTests(DriverTestBase):
    """Every driver: ``footprint(n)`` is at least ``n`` and never shrinks as ``n``
    grows. Drivers with ``capacity_bytes``: it is exact, so values of odd sizes
    whose footprints fill the capacity all fit, and one more value whose
    footprint exceeds the room left raises ``CapacityError``. The store's
    capacity ledger counts footprints, so a dishonest one makes a full tier
    fail its puts instead of evicting."""

    conformance_area: ClassVar[str] = "footprint"

    def test_footprint_covers_the_value_and_grows_with_it(self, harness: DriverHarness) -> None:
        sizes = [0, 1, 4095, 4096, 4097, 65_537, 589_953, 32 * MiB + 128]
        footprints = [harness.driver.footprint(size) for size in sizes]
        for size, footprint in zip(sizes, footprints):
            assert footprint >= size, f"footprint({size}) is {footprint}, less than the value"
        assert footprints == sorted(footprints), f"footprints {footprints} shrink as values grow"

    def test_values_filling_the_capacity_by_footprint_fit(self, harness: DriverHarness) -> None:
        capacity = harness.capabilities.capacity_bytes
        if capacity is None:
            pytest.skip("capability capacity_bytes=None: no hard capacity to fill")
        if not harness.capabilities.listable:
            pytest.skip("capability listable=False: the room already used cannot be counted")
        footprint = harness.driver.footprint
        room = capacity - sum(footprint(size) for size in harness.listing().values())
        if room > self.max_fill_bytes:
            pytest.skip(f"filling {room} bytes is over max_fill_bytes={self.max_fill_bytes}")
        size = max(1, room // 7 - 999)  # an odd size, not a multiple of any page
        limit = harness.capabilities.max_value_bytes
        if limit is not None:
            size = min(size, limit)
        filler = memoryview(bytes(size))
        count = room // footprint(size)
        for _ in range(count):
            harness.put([(harness.key("fill"), filler)])
        left = room - count * footprint(size)
        fitting = _largest_fitting(footprint, left)
        if fitting is not None:
            harness.put([(harness.key("last"), bytes(fitting))])
            left -= footprint(fitting)
        refused = harness.key("refused")
        with pytest.raises(CapacityError):
            harness.put([(refused, bytes(left + 1))])
        assert harness.contains([refused]) == [False]


def _largest_fitting(footprint: Callable[[int], int], room: int) -> int | None:
    """The largest value size whose footprint is at most ``room``, or ``None``."""
    if footprint(0) > room:
        return None
    low, high = 0, room
    while low < high:
        middle = (low + high + 1) // 2
        if footprint(middle) <= room:
            low = middle
        else:
            high = middle - 1
    return low
