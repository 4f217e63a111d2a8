"""Concurrency: many asyncio tasks and several threads on one driver, no torn values."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pytest

from kvstore.driver import Driver

from ..harness import DriverHarness, assert_value, assert_values
from .base import DriverTestBase

PATTERN_SIZES = (48 << 10, 80 << 10)
"""The sizes of pattern values: runs of four markers share one, so writers of
one key replace values of the same size and of another size."""


def pattern(marker: int) -> bytes:
    """A value that is ``marker`` repeated, of a size that depends on ``marker``,
    so a reader can tell a whole value from a mix of two."""
    return bytes([marker]) * PATTERN_SIZES[marker // 4 % len(PATTERN_SIZES)]


def torn(value: memoryview | None, allow_miss: bool) -> str | None:
    """Why ``value`` is not one whole pattern (``None`` when it is), naming the
    promise broken: a mix of two writes, or bytes no writer wrote."""
    if value is None:
        return None if allow_miss else "a miss, though the key was never deleted"
    data = value.tobytes()
    if not data:
        return "bytes no writer wrote: an empty value"
    runs = _runs(data)
    expected = pattern(data[0])
    if len(runs) == 1 and len(data) == len(expected):
        return None
    if len(runs) == 2:
        (first, head), (second, tail) = runs
        if head == len(pattern(first)) and len(data) == len(pattern(second)):
            return (
                f"an overwrite kept the old value's tail: value {first} ({head} bytes) "
                f"followed by the last {tail} bytes of value {second}"
            )
        if len(data) in (len(pattern(first)), len(pattern(second))):
            return (
                f"a mix of two writes (readers see whole values): {len(data)} bytes, "
                f"the first {head} of value {first}, the rest of value {second}"
            )
    if len(runs) == 1:
        return (
            f"bytes no writer wrote: {len(data)} bytes of value {data[0]}, "
            f"which is {len(expected)} bytes long"
        )
    return (
        f"bytes no writer wrote: {len(data)} bytes in {len(runs)} runs, "
        f"starting with {runs[:3]} (marker, length)"
    )


def _runs(data: bytes) -> list[tuple[int, int]]:
    """``data`` as (byte, run length) pairs, at most 16 of them."""
    runs: list[tuple[int, int]] = []
    start = 0
    while start < len(data) and len(runs) < 16:
        end = start + len(data[start:]) - len(data[start:].lstrip(data[start : start + 1]))
        runs.append((data[start], end - start))
        start = end
    return runs


class ConcurrencyTests(DriverTestBase):
    """Every driver: concurrent calls from many tasks on the driver's loop and
    from other threads (through that loop) keep every value whole: a reader
    sees the old value, the new one or a miss, never a mix."""

    conformance_area: ClassVar[str] = "concurrency"

    task_count: ClassVar[int] = 32
    thread_count: ClassVar[int] = 4
    rounds: ClassVar[int] = 6

    def test_many_tasks_on_different_keys(self, harness: DriverHarness) -> None:
        harness.require_room(self.task_count * 20_000)
        driver = harness.driver
        keys = harness.keys(self.task_count)
        values = [harness.value(1000 + 577 * index) for index in range(len(keys))]

        async def one(key: bytes, value: bytes) -> None:
            for _ in range(self.rounds):
                await driver.put_many([(key, value)])
                (got,) = await driver.get_many([key])
                assert_value(got, value, f"value of {key!r} read back by its own task")
                assert await driver.contains_many([key]) == [True]
            assert await driver.delete_many([key]) == [True]
            assert await driver.get_many([key]) == [None]

        async def scenario() -> None:
            await asyncio.gather(*(one(key, value) for key, value in zip(keys, values)))

        harness.run(scenario())

    def test_many_tasks_on_one_key(self, harness: DriverHarness) -> None:
        harness.require_room(2 * self.task_count * max(PATTERN_SIZES))
        driver = harness.driver
        key = harness.key()
        markers = range(1, self.task_count // 2 + 1)
        problems: list[str] = []

        async def writer(marker: int) -> None:
            for _ in range(self.rounds):
                await driver.put_many([(key, pattern(marker))])
                await asyncio.sleep(0)

        async def reader(use_into: bool) -> None:
            for _ in range(self.rounds * 2):
                into = [bytearray(max(PATTERN_SIZES))] if use_into else None
                (got,) = await driver.get_many([key], into)
                problem = torn(got, allow_miss=True)
                if problem:
                    problems.append(problem)
                await asyncio.sleep(0)

        async def deleter() -> None:
            for _ in range(self.rounds):
                await driver.delete_many([key])
                await asyncio.sleep(0)

        async def scenario() -> None:
            # A reader runs right after each writer, while a careless write may be half done.
            interleaved = [
                task for marker in markers for task in (writer(marker), reader(marker % 2 == 0))
            ]
            await asyncio.gather(*interleaved, deleter())
            await driver.put_many([(key, pattern(1))])

        harness.run(scenario())
        assert not problems, f"{len(problems)} bad reads, the first: {problems[0]}"
        assert_value(harness.get([key])[0], pattern(1), "value after the last write")

    def test_threads_and_tasks_share_one_driver(self, harness: DriverHarness) -> None:
        harness.require_room(
            (self.thread_count * self.rounds + 2) * max(PATTERN_SIZES) + self.task_count * 4096
        )
        driver = harness.driver
        shared = harness.key("shared")
        harness.put([(shared, pattern(0))])
        own_keys = [harness.keys(self.rounds, f"thread{t}-") for t in range(self.thread_count)]

        def thread_work(index: int) -> dict[bytes, bytes]:
            sync = harness.sync()
            rng = random.Random(index)
            written: dict[bytes, bytes] = {}
            for key in own_keys[index]:
                value = rng.randbytes(rng.randrange(1, 64 << 10))
                sync.put_many([(key, value), (shared, pattern(index + 1))])
                written[key] = value
                own, common = sync.get_many([key, shared])
                assert_value(own, value, f"thread {index}: its own key")
                problem = torn(common, allow_miss=True)
                assert problem is None, f"thread {index} read the shared key: {problem}"
            return written

        async def task_work(index: int) -> None:
            key = harness.key(f"task{index}")
            value = bytes([index]) * 4096
            await driver.put_many([(key, value), (shared, pattern(100 + index))])
            own, common = await driver.get_many([key, shared])
            assert_value(own, value, f"task {index}: its own key")
            problem = torn(common, allow_miss=True)
            assert problem is None, f"task {index} read the shared key: {problem}"

        async def tasks() -> None:
            for _ in range(self.rounds):
                await asyncio.gather(*(task_work(index) for index in range(self.task_count)))

        with ThreadPoolExecutor(self.thread_count) as pool:
            futures = [pool.submit(thread_work, index) for index in range(self.thread_count)]
            harness.run(tasks())
            written = [future.result(harness.call_timeout_s) for future in futures]
        for expected in written:
            assert_values(harness.get(list(expected)), list(expected.values()), "threads' keys")
        assert torn(harness.get([shared])[0], allow_miss=False) is None

    def test_list_and_usage_during_writes(self, harness: DriverHarness) -> None:
        if not harness.capabilities.listable:
            pytest.skip("capability listable=False: list need not enumerate every key")
        harness.require_room(2 * self.task_count * 4096)
        driver = harness.driver
        steady = harness.keys(self.task_count, "steady")
        churn = harness.keys(self.task_count, "churn")
        harness.put([(key, bytes(4096)) for key in steady])

        async def churner(key: bytes) -> None:
            for _ in range(self.rounds):
                await driver.put_many([(key, bytes(4096))])
                await asyncio.sleep(0)
                await driver.delete_many([key])

        async def lister() -> dict[bytes, int]:
            listed: dict[bytes, int] = {}
            async for entry in driver.list():
                listed[entry.key] = entry.size
                await asyncio.sleep(0)
            await driver.usage()
            return listed

        async def scenario() -> dict[bytes, int]:
            churners = [asyncio.ensure_future(churner(key)) for key in churn]
            listed = await lister()
            await asyncio.gather(*churners)
            return listed

        listed = harness.run(scenario())
        missing = [key for key in steady if listed.get(key) != 4096]
        assert not missing, f"{len(missing)} keys stored throughout were not listed during writes"

    def test_drivers_of_one_shared_config_see_each_other(self, harness: DriverHarness) -> None:
        if not harness.capabilities.shared:
            pytest.skip("capability shared=False: two open drivers need not see each other")
        other: Driver[Any] = harness.open()
        key, value = harness.key(), harness.value(10_000)
        harness.put([(key, value)])
        (got,) = harness.run(other.get_many([key]))
        assert_value(got, value, "a value written by another driver of the same config")
