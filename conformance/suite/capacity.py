"""Capacity: a put past the hard limit raises CapacityError and loses nothing."""

from __future__ import annotations

from typing import ClassVar

import pytest
from typing_extensions import Buffer

from kvstore.errors import CapacityError

from ..harness import DriverHarness, assert_values
from .base import DriverTestBase


class CapacityTests(DriverTestBase):
    """Drivers with ``capacity_bytes`` (and ``max_value_bytes``) set: limits
    are hard, a put past them raises ``CapacityError``, values already stored
    stay intact, and deleting frees room again."""

    conformance_area: ClassVar[str] = "capacity"

    max_value_check_bytes: ClassVar[int] = 64 << 20
    """``max_value_bytes`` is checked only up to this: the check writes a value of
    ``max_value_bytes + 1`` bytes and then one of ``max_value_bytes``."""

    def _capacity(self, harness: DriverHarness) -> int:
        capacity = harness.capabilities.capacity_bytes
        if capacity is None:
            pytest.skip("capability capacity_bytes=None: no hard capacity to test")
        return capacity

    def _values_totalling(self, harness: DriverHarness, total: int) -> list[tuple[bytes, Buffer]]:
        """Items whose sizes add up to ``total``, none over ``max_value_bytes``; they
        share one zero-filled buffer, so filling a large driver costs little memory."""
        limit = harness.capabilities.max_value_bytes or total
        sizes = [limit] * (total // limit) + ([total % limit] if total % limit else [])
        filler = memoryview(bytes(max(sizes, default=0)))
        return [(harness.key("fill"), filler[:size]) for size in sizes]

    def _require_fill(self, nbytes: int) -> None:
        if nbytes > self.max_fill_bytes:
            pytest.skip(
                f"capability capacity_bytes needs {nbytes} bytes written to fill, over "
                f"max_fill_bytes={self.max_fill_bytes}"
            )

    def test_put_past_capacity_raises_and_keeps_stored_values(self, harness: DriverHarness) -> None:
        capacity = self._capacity(harness)
        keys = harness.keys(3, "kept")
        values = [harness.value(size) for size in (10, 1000, 4096)]
        harness.require_room(sum(len(value) for value in values))
        harness.put(list(zip(keys, values)))
        free = capacity - harness.usage().bytes
        self._require_fill(free + 1)
        with pytest.raises(CapacityError) as caught:
            harness.put(self._values_totalling(harness, free + 1))
        assert caught.value.driver == harness.driver.name, "errors name their driver"
        assert_values(harness.get(keys), values, "values stored before the failed put")
        assert harness.usage().bytes <= capacity

    def test_value_larger_than_capacity_is_refused(self, harness: DriverHarness) -> None:
        capacity = self._capacity(harness)
        self._require_fill(capacity + 1)
        key = harness.key()
        with pytest.raises(CapacityError) as caught:
            harness.put([(key, bytes(capacity + 1))])
        assert caught.value.driver == harness.driver.name, "errors name their driver"
        assert harness.contains([key]) == [False]

    def test_deleting_frees_room(self, harness: DriverHarness) -> None:
        capacity = self._capacity(harness)
        free = capacity - harness.usage().bytes
        amount = free * 6 // 10
        self._require_fill(amount)
        if amount == 0:
            pytest.skip("capability capacity_bytes: the driver is already full")
        first = self._values_totalling(harness, amount)
        harness.put(first)
        harness.delete([key for key, _ in first])
        second = self._values_totalling(harness, amount)
        harness.put(second)
        assert harness.contains([key for key, _ in second]) == [True] * len(second)

    def test_max_value_bytes_is_enforced(self, harness: DriverHarness) -> None:
        limit = harness.capabilities.max_value_bytes
        if limit is None:
            pytest.skip("capability max_value_bytes=None: no value size limit to test")
        if limit + 1 > self.max_value_check_bytes:
            pytest.skip(
                f"capability max_value_bytes={limit}: checking it writes a value that "
                f"large, over max_value_check_bytes={self.max_value_check_bytes}"
            )
        key = harness.key()
        with pytest.raises(CapacityError) as caught:
            harness.put([(key, bytes(limit + 1))])
        assert caught.value.driver == harness.driver.name, "errors name their driver"
        assert harness.contains([key]) == [False]
        free = harness.free_bytes()
        if free is None or free >= limit:
            harness.put([(key, bytes(limit))])
            assert harness.contains([key]) == [True]
