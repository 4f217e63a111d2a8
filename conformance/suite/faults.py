"""Faults: the FaultyDriver wrapper, over this driver, injects exactly what its plan says."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import pytest

from kvstore.driver import Driver
from kvstore.errors import ALL_ERRORS, TransientError

from ..faults import (
    OPERATIONS,
    FaultPlan,
    FaultyConfig,
    FaultyDriver,
    Operation,
)
from ..harness import DriverHarness, assert_value, assert_values
from .base import DriverTestBase


def wrap(harness: DriverHarness, plan: FaultPlan) -> FaultyDriver:
    """A FaultyDriver around the harness driver, reopened first if an earlier
    wrapper closed it (drivers may refuse two open at once on one config)."""
    if harness.driver.closed:
        harness.reopen()
    return FaultyDriver.wrap(harness.driver, plan)


def operation_calls(
    driver: Driver[Any], key: bytes
) -> dict[Operation, Callable[[], Coroutine[Any, Any, object]]]:
    """One call of each operation on ``driver``, touching only ``key``."""

    async def list_all() -> None:
        async for _ in driver.list():
            pass

    async def borrow_one() -> None:
        async with driver.borrow_many([key]):
            pass

    async def lend_one() -> None:
        async with driver.lend_many([(key, 5)]) as (room,):
            if room is not None:
                room[:] = b"value"

    return {
        "put_many": lambda: driver.put_many([(key, b"value")]),
        "get_many": lambda: driver.get_many([key]),
        "lend_many": lend_one,
        "borrow_many": borrow_one,
        "contains_many": lambda: driver.contains_many([key]),
        "delete_many": lambda: driver.delete_many([key]),
        "list": list_all,
        "usage": driver.usage,
    }


def bit_flips(actual: bytes, expected: bytes) -> int:
    """How many bits differ between two equal-length values."""
    return sum((a ^ b).bit_count() for a, b in zip(actual, expected))


class FaultTests(DriverTestBase):
    """The fault-injection wrapper, over this driver: faults hit only the planned
    calls with the planned kind, values are damaged only in what the caller
    gets back, and everything else passes through unchanged."""

    conformance_area: ClassVar[str] = "faults"

    @pytest.mark.parametrize("operation", OPERATIONS)
    def test_error_hits_only_planned_operation(
        self, harness: DriverHarness, operation: Operation
    ) -> None:
        faulty = wrap(harness, FaultPlan(action="error", operations={operation}))
        calls = operation_calls(faulty, harness.key())
        for name, call in calls.items():
            if name != operation:
                harness.run(call())
        with pytest.raises(TransientError) as caught:
            harness.run(calls[operation]())
        assert caught.value.driver == faulty.name
        assert faulty.injected == {operation: 1}

    def test_error_is_the_planned_class(self, harness: DriverHarness) -> None:
        for error in ALL_ERRORS:
            faulty = wrap(harness, FaultPlan(action="error", error=error))
            with pytest.raises(error) as caught:
                harness.run(faulty.usage())
            assert type(caught.value) is error
            harness.run(faulty.close())
            assert faulty.inner.closed, "closing the wrapper closes the wrapped driver"

    def test_every_nth_call(self, harness: DriverHarness) -> None:
        faulty = wrap(harness, FaultPlan(operations={"contains_many"}, every_nth=3))
        outcomes = []
        for _ in range(7):
            try:
                harness.run(faulty.contains_many([b"kvconf-probe"]))
                outcomes.append("ok")
            except TransientError:
                outcomes.append("fault")
        assert outcomes == ["ok", "ok", "fault", "ok", "ok", "fault", "ok"]

    def test_probability_is_seeded(self, harness: DriverHarness) -> None:
        def pattern(seed: int, probability: float) -> list[bool]:
            plan = FaultPlan(operations={"usage"}, probability=probability, seed=seed)
            faulty = wrap(harness, plan)
            faults = []
            for _ in range(60):
                try:
                    harness.run(faulty.usage())
                    faults.append(False)
                except TransientError:
                    faults.append(True)
            harness.run(faulty.close())
            return faults

        first = pattern(seed=7, probability=0.5)
        assert pattern(seed=7, probability=0.5) == first, "one seed, one fault sequence"
        assert 10 <= sum(first) <= 50
        assert not any(pattern(seed=7, probability=0.0))
        assert all(pattern(seed=7, probability=1.0))

    def test_hang_outlasts_a_timeout(self, harness: DriverHarness) -> None:
        key, value = harness.key(), harness.value(100)
        faulty = wrap(harness, FaultPlan(action="hang", operations={"get_many"}))
        harness.run(faulty.put_many([(key, value)]))

        async def timed_out() -> bool:
            try:
                await asyncio.wait_for(faulty.get_many([key]), timeout=0.05)
            except asyncio.TimeoutError:
                return True
            return False

        assert harness.run(timed_out()), "a hung get_many must outlast the caller's timeout"
        assert harness.run(faulty.contains_many([key])) == [True]
        assert faulty.injected["get_many"] == 1

    def test_corruption_flips_bits_of_returned_values_only(self, harness: DriverHarness) -> None:
        keys = [harness.key(), harness.key(), harness.key("missing")]
        values = [harness.value(4096), b""]
        faulty = wrap(harness, FaultPlan(action="corrupt", flip_bits=3, seed=1))
        harness.run(faulty.put_many(list(zip(keys, values))))
        for into in (None, [bytearray(4096), bytearray(4), None]):
            corrupted, empty, missing = harness.run(faulty.get_many(keys, into))
            assert corrupted is not None
            assert len(corrupted) == len(values[0]), "corruption keeps the length"
            assert bit_flips(corrupted.tobytes(), values[0]) == 3
            assert_value(empty, b"", "an empty value under corruption")
            assert missing is None, "a miss stays a miss"
        assert_values(harness.run(faulty.inner.get_many(keys)), [*values, None], "stored values")

    def test_truncation_returns_a_prefix(self, harness: DriverHarness) -> None:
        key, value = harness.key(), harness.value(1001)
        faulty = wrap(harness, FaultPlan(action="truncate"))
        harness.run(faulty.put_many([(key, value)]))
        (short,) = harness.run(faulty.get_many([key]))
        assert_value(short, value[:500], "a truncated value")
        (stored,) = harness.run(faulty.inner.get_many([key]))
        assert_value(stored, value, "the stored value under truncation")

    def test_pass_through_without_faults(self, harness: DriverHarness) -> None:
        faulty = wrap(harness, FaultPlan(probability=0.0))
        keys = harness.keys(3)
        values = [harness.value(size) for size in (0, 10, 5000)]
        harness.run(faulty.put_many(list(zip(keys, values))))
        assert_values(harness.run(faulty.get_many(keys)), values, "values through the wrapper")
        assert harness.run(faulty.contains_many(keys)) == [True] * 3
        assert faulty.capabilities == faulty.inner.capabilities
        if faulty.capabilities.listable:
            listed = harness.listing(faulty)
            assert {key: listed.get(key) for key in keys} == {
                key: len(value) for key, value in zip(keys, values)
            }
        assert harness.run(faulty.usage()) == harness.run(faulty.inner.usage())
        assert harness.run(faulty.delete_many(keys)) == [True] * 3
        assert faulty.calls["put_many"] == 1
        assert not faulty.injected

    def test_wrapper_config_round_trips(self, harness: DriverHarness) -> None:
        faulty = wrap(harness, FaultPlan(action="corrupt", probability=0.25, seed=3))
        config = faulty.config
        assert config.inner == harness.config.to_url()
        assert FaultyConfig.from_url(config.to_url()) == config
        assert pickle.loads(pickle.dumps(config)) == config
        assert faulty.name == "faulty"
