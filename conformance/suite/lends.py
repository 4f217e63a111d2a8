"""Lent room: ``lend_many`` lends writable room that is published only at commit."""

from __future__ import annotations

from typing import ClassVar

import pytest

from ..harness import DriverHarness, assert_value, assert_values
from .base import DriverTestBase

MiB = 1 << 20


class _Abort(Exception):
    """Raised inside a loan to abort it."""


class LendTests(DriverTestBase):
    """Every driver: ``lend_many`` answers with writable room of the asked size or
    ``None``; what is written there is published at commit, as ``put_many``
    would, and never before. Drivers with ``lends_room=True`` lend room; an
    aborted loan publishes nothing and, with a ``capacity_bytes``, frees its room."""

    conformance_area: ClassVar[str] = "loans"

    def test_committed_room_holds_the_values(self, harness: DriverHarness) -> None:
        keys = harness.keys(3)
        values = [harness.value(size) for size in (0, 4096, MiB + 5)]
        harness.require_room(sum(len(v) for v in values))

        async def lend() -> list[bool]:
            async with harness.driver.lend_many(
                [(key, len(value)) for key, value in zip(keys, values)]
            ) as rooms:
                for room, value in zip(rooms, values):
                    if room is not None:
                        assert not room.readonly, "lent room must be writable"
                        assert len(room) == len(value), "lent room must be the size asked for"
                        room[:] = value
            return [room is not None for room in rooms]

        lent = harness.run(lend())
        if harness.capabilities.lends_room:
            assert any(lent), "lends_room=True but nothing was lent"
        leftover = [(key, value) for key, value, was in zip(keys, values, lent) if not was]
        harness.put(leftover)
        assert_values(harness.get(keys), values, "values written into lent room")

    def test_room_is_invisible_until_committed(self, harness: DriverHarness) -> None:
        if not harness.capabilities.lends_room:
            pytest.skip("capability lends_room=False: the driver lends no room")
        old_key, new_key = harness.keys(2)
        old = harness.value(64 * 1024)
        fresh = [harness.value(64 * 1024), harness.value(2 * MiB)]
        harness.require_room(2 * len(old) + sum(len(v) for v in fresh))
        harness.put([(old_key, old)])
        driver = harness.driver

        async def lend() -> None:
            items = [(old_key, len(fresh[0])), (new_key, len(fresh[1]))]
            async with driver.lend_many(items) as rooms:
                for room, value in zip(rooms, fresh):
                    if room is not None:
                        room[:] = value
                seen = await driver.get_many([old_key, new_key])
                assert seen[1] is None, "a value in lent room was visible before its commit"
                if seen[0] is not None:
                    assert_value(seen[0], old, "an overwritten key before the commit")
                assert (await driver.contains_many([new_key])) == [False], (
                    "contains_many saw a value in lent room before its commit"
                )
                listed = (
                    {entry.key async for entry in driver.list()}
                    if (harness.capabilities.listable)
                    else set()
                )
                assert new_key not in listed, "list showed a value in lent room before its commit"

        harness.run(lend())
        assert_values(harness.get([old_key, new_key]), fresh, "values after the commit")

    def test_aborted_loan_publishes_nothing_and_frees_its_room(
        self, harness: DriverHarness
    ) -> None:
        if not harness.capabilities.lends_room:
            pytest.skip("capability lends_room=False: the driver lends no room")
        free = harness.free_bytes()
        size = 2 * MiB if free is None else free * 6 // 10
        if size > self.max_fill_bytes:
            pytest.skip(
                f"needs {2 * size} bytes written, over max_fill_bytes={self.max_fill_bytes}"
            )
        harness.require_value_size(size)
        key = harness.key("aborted")

        async def lend_then_fail() -> bool:
            try:
                async with harness.driver.lend_many([(key, size)]) as (room,):
                    if room is not None:
                        room[:16] = b"never published!"
                    raise _Abort
            except _Abort:
                pass
            return room is not None

        if not harness.run(lend_then_fail()):
            pytest.skip("the driver lent no room for the value")
        assert harness.contains([key]) == [False], "an aborted loan published its value"
        assert harness.get([key]) == [None], "an aborted loan published its value"
        other = harness.key("after")
        harness.put([(other, memoryview(bytes(size)))])  # 60% + 60% > 100% unless freed
        assert harness.contains([other]) == [True]
