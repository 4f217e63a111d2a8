"""Persistence: what was written survives closing the driver and opening it again."""

from __future__ import annotations

from typing import ClassVar

import pytest

from ..harness import DriverHarness, assert_values
from .base import DriverTestBase

MiB = 1 << 20


def require_persistent(harness: DriverHarness) -> None:
    if not harness.capabilities.persistent:
        pytest.skip("capability persistent=False: values need not survive close")


class PersistenceTests(DriverTestBase):
    """Drivers with ``persistent=True``: values, overwrites and deletes survive
    ``close`` and a fresh ``open`` of the same config."""

    conformance_area: ClassVar[str] = "persistence"

    def test_values_survive_reopen(self, harness: DriverHarness) -> None:
        require_persistent(harness)
        sizes = [0, 1, 4096, MiB + 3]
        harness.require_room(sum(sizes))
        keys = harness.keys(len(sizes))
        values = [harness.value(size) for size in sizes]
        shared = harness.capabilities.shared
        before = None if shared else harness.usage()
        harness.put(list(zip(keys, values)))
        harness.reopen()
        assert_values(harness.get(keys), values, "values after reopening")
        assert harness.contains(keys) == [True] * len(keys)
        if harness.capabilities.listable:
            listed = harness.listing()
            assert {key: listed.get(key) for key in keys} == dict(zip(keys, sizes))
        if before is not None:
            after = harness.usage()
            assert (after.entries - before.entries, after.bytes - before.bytes) == (
                len(keys),
                sum(sizes),
            ), "usage after reopening must count the values that survived"

    def test_overwrite_and_delete_survive_reopen(self, harness: DriverHarness) -> None:
        require_persistent(harness)
        kept, deleted = harness.key("kept"), harness.key("deleted")
        newest = harness.value(3000)
        harness.put([(kept, harness.value(5000)), (deleted, harness.value(100))])
        harness.put([(kept, newest)])
        assert harness.delete([deleted]) == [True]
        harness.reopen()
        assert_values(harness.get([kept, deleted]), [newest, None], "values after reopening")
        assert harness.contains([kept, deleted]) == [True, False]

    def test_reopened_driver_accepts_writes(self, harness: DriverHarness) -> None:
        require_persistent(harness)
        key, value = harness.key(), harness.value(2048)
        harness.put([(key, harness.value(10))])
        harness.reopen()
        harness.put([(key, value)])
        assert_values(harness.get([key]), [value], "value written after reopening")
        harness.reopen()
        assert_values(harness.get([key]), [value], "value written after reopening, reopened")
        assert harness.delete([key]) == [True]
        harness.reopen()
        assert harness.get([key]) == [None]
