"""Loans: ``borrow_many`` lends views that match the values and stay intact."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from ..harness import DriverHarness, assert_value
from .base import DriverTestBase
from .concurrency import PATTERN_SIZES, pattern, torn

MiB = 1 << 20


class LoanTests(DriverTestBase):
    """Every driver: ``borrow_many`` answers with views or ``None``, never wrong
    bytes. Drivers with ``lends_views=True``: values are lent, read-only, and
    stay intact for the whole loan while the keys are overwritten or deleted;
    with a ``capacity_bytes`` too, a lent value deleted during its loan gives its
    room back once the loan ends."""

    conformance_area: ClassVar[str] = "loans"

    def test_loans_never_lie(self, harness: DriverHarness) -> None:
        keys = harness.keys(3)
        values = [harness.value(size) for size in (10, 4096, MiB + 5)]
        harness.require_room(sum(len(v) for v in values))
        harness.put(list(zip(keys, values)))
        missing = harness.key("never-written")

        async def borrow() -> list[memoryview | None]:
            async with harness.driver.borrow_many([*keys, missing]) as views:
                return [None if view is None else memoryview(bytes(view)) for view in views]

        lent = harness.run(borrow())
        assert lent[-1] is None, "an absent key must not be lent"
        for got, value in zip(lent, values):
            if got is not None:
                assert_value(got, value, "a lent value")
        if harness.capabilities.lends_views:
            assert any(got is not None for got in lent), "lends_views=True but nothing was lent"

    def test_lent_values_survive_overwrite_and_delete(self, harness: DriverHarness) -> None:
        if not harness.capabilities.lends_views:
            pytest.skip("capability lends_views=False: the driver lends no views")
        keys = harness.keys(2)
        values = [harness.value(64 * 1024), harness.value(2 * MiB)]
        harness.require_room(3 * sum(len(v) for v in values))
        harness.put(list(zip(keys, values)))

        async def borrow_then_change() -> list[memoryview | None]:
            async with harness.driver.borrow_many(keys) as views:
                for view in views:
                    assert view is None or view.readonly, "lent views must be read-only"
                await harness.driver.put_many([(keys[0], harness.value(len(values[0])))])
                await harness.driver.delete_many([keys[1]])
                await harness.driver.put_many([(harness.key(), harness.value(len(values[1])))])
                return [None if view is None else memoryview(bytes(view)) for view in views]

        for got, value in zip(harness.run(borrow_then_change()), values):
            if got is not None:
                assert_value(got, value, "a lent value after its key changed")

    def test_lent_values_stay_whole_while_a_writer_puts(self, harness: DriverHarness) -> None:
        harness.require_room(8 * max(PATTERN_SIZES))
        key = harness.key()
        harness.put([(key, pattern(1))])
        driver = harness.driver
        problems: list[str] = []
        lent = 0

        async def writer() -> None:
            for round_ in range(48):
                await driver.put_many([(key, pattern(2 + round_ % 8))])
                await asyncio.sleep(0)

        async def borrower() -> None:
            nonlocal lent
            for _ in range(16):
                async with driver.borrow_many([key]) as (view,):
                    if view is None:
                        continue
                    lent += 1
                    at_start = view.tobytes()
                    for _ in range(3):
                        await asyncio.sleep(0)
                    problem = torn(view, allow_miss=False)
                    if problem is None and view.tobytes() != at_start:
                        problem = "a lent value changed during its loan"
                    if problem:
                        problems.append(problem)
                await asyncio.sleep(0)

        async def scenario() -> None:
            await asyncio.gather(writer(), borrower(), borrower())

        harness.run(scenario())
        assert not problems, (
            f"lent values stay intact for the whole loan: {len(problems)} of {lent} loans "
            f"broke it while a writer put, the first: {problems[0]}"
        )

    def test_room_of_a_deleted_lent_value_returns_when_the_loan_ends(
        self, harness: DriverHarness
    ) -> None:
        if not harness.capabilities.lends_views:
            pytest.skip("capability lends_views=False: the driver lends no views")
        free = harness.free_bytes()
        if free is None:
            pytest.skip("capability capacity_bytes=None: no hard capacity to test")
        size = free * 6 // 10
        if size > self.max_fill_bytes:
            pytest.skip(
                f"needs {2 * size} bytes written, over max_fill_bytes={self.max_fill_bytes}"
            )
        harness.require_value_size(size)
        filler = memoryview(bytes(size))
        key = harness.key("lent")
        harness.put([(key, filler)])

        async def lend_then_delete() -> bool:
            async with harness.driver.borrow_many([key]) as (view,):
                if view is not None:
                    assert await harness.driver.delete_many([key]) == [True]
                return view is not None

        if not harness.run(lend_then_delete()):
            pytest.skip("the driver lent no view of the value")
        other = harness.key("after")
        harness.put([(other, filler)])  # needs the lent value's room: 60% + 60% > 100%
        assert harness.contains([key, other]) == [False, True]
