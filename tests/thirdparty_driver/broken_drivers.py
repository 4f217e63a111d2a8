"""Deliberately broken variants of the dict driver, each with one realistic bug.

tests/test_conformance_suite.py runs the conformance suite on each and checks
that it fails, in the area the bug belongs to. Not part of the installable
package.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from kvstore_dictdriver.driver import DictConfig, DictDriver

from kvstore.driver import Driver
from kvstore.registry import DriverInfo, DriverRegistry, hookimpl

MiB = 1 << 20


class WrongBytesConfig(DictConfig):
    scheme: ClassVar[str] = "wrongbytes"


class WrongBytesDriver(DictDriver):
    """Flips one bit past the first MiB of every value it returns."""

    config_type = WrongBytesConfig

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        values = await super()._get_many(keys, into)
        return [self._flip(value) for value in values]

    @staticmethod
    def _flip(value: memoryview | None) -> memoryview | None:
        if value is None or len(value) <= MiB:
            return value
        damaged = bytearray(value)
        damaged[MiB] ^= 1
        return memoryview(damaged)


class DropsKeysConfig(DictConfig):
    scheme: ClassVar[str] = "dropskeys"


class DropsKeysDriver(DictDriver):
    """Stores only the first 32 items of a batch."""

    config_type = DropsKeysConfig

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many(items[:32])


class TornWritesConfig(DictConfig):
    scheme: ClassVar[str] = "tornwrites"


class TornWritesDriver(DictDriver):
    """Overwrites a value of the same size in two halves, yielding in between."""

    config_type = TornWritesConfig

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        for key, value in items:
            old = await super()._get_many([key], None)
            current = old[0]
            if current is not None and len(current) == len(value):
                half = len(value) // 2
                torn = value[:half].tobytes() + current[half:].tobytes()
                await super()._put_many([(key, memoryview(torn))])
                await asyncio.sleep(0)
            await super()._put_many([(key, value)])


BROKEN_DRIVERS: dict[str, tuple[type[Driver[DictConfig]], str]] = {
    "wrongbytes": (WrongBytesDriver, "core"),
    "dropskeys": (DropsKeysDriver, "batch"),
    "tornwrites": (TornWritesDriver, "concurrency"),
}
"""Scheme to (driver class, the suite area its bug must fail)."""


class BrokenPlugin:
    """A pluggy plugin object describing one broken driver."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    @hookimpl
    def kvstore_driver(self) -> DriverInfo:
        cls = BROKEN_DRIVERS[self.scheme][0]
        return DriverInfo(
            scheme=self.scheme,
            target=f"{__name__}:{cls.__name__}",
            summary=f"broken on purpose: {cls.__doc__}",
        )


def register_broken_drivers(registry: DriverRegistry) -> None:
    """Make every broken driver openable through ``registry``."""
    for scheme in BROKEN_DRIVERS:
        registry.register(BrokenPlugin(scheme), name=scheme, source="tests (broken on purpose)")
