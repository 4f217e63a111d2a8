"""Sustained reads: one driver instance answers thousands of reads, every one right."""

from __future__ import annotations

import math
from typing import ClassVar

from ..harness import DriverHarness, assert_value
from .base import DriverTestBase

RARE_FAULT_RATE = 1 / 1000
"""The rarest per-call fault the run is sized to catch."""

CATCH_PROBABILITY = 0.999
"""The chance of catching a fault that rare in one run."""

SUSTAINED_READS = math.ceil(math.log(1 - CATCH_PROBABILITY) / math.log(1 - RARE_FAULT_RATE))
"""6905: reads enough that a fault hitting one call in a thousand shows up with
probability above 0.999."""


class SustainedTests(DriverTestBase):
    """Every driver: a fault that lives in one driver instance and hits rarely
    (one read in a thousand) is caught by reading through one instance long
    enough, every read verified."""

    conformance_area: ClassVar[str] = "sustained"

    sustained_reads: ClassVar[int] = SUSTAINED_READS
    """Reads in the run; fewer catch rare faults with a lower probability."""

    def test_every_read_of_a_long_run_returns_the_value_written(
        self, harness: DriverHarness
    ) -> None:
        keys = harness.keys(16, "sustained")
        values = {key: harness.value(64 + 61 * index) for index, key in enumerate(keys)}
        harness.require_room(4 * sum(len(value) for value in values.values()))
        harness.put(list(values.items()))
        driver = harness.driver
        rewrites = [harness.value(64 + 97 * index) for index in range(len(keys))]

        async def run() -> None:
            for read in range(self.sustained_reads):
                key = keys[read % len(keys)]
                if read % 61 == 60:
                    values[key] = rewrites[(read // 61) % len(rewrites)]
                    await driver.put_many([(key, values[key])])
                into = [bytearray(4096)] if read % 2 else None
                (got,) = await driver.get_many([key], into)
                assert_value(got, values[key], f"reads return the value written: read {read + 1}")

        harness.run(run(), timeout=max(self.call_timeout_s, 600.0))
