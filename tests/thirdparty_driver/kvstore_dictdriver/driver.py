"""``dictkv://?capacity=64MiB``: values in a dict, gone when the driver closes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage, fill_into
from kvstore.errors import CapacityError
from kvstore.sizes import ByteSize


class DictConfig(DriverConfig):
    """capacity: an optional hard limit on the bytes of stored values."""

    scheme: ClassVar[str] = "dictkv"

    capacity: ByteSize | None = None


class DictDriver(Driver[DictConfig]):
    """Every call completes without awaiting, so on its one event loop each
    call is atomic: readers see whole values and batches are all or nothing."""

    config_type = DictConfig
    static_capabilities = Capabilities(persistent=False, listable=True)

    def __init__(self, config: DictConfig) -> None:
        super().__init__(config)
        self._values: dict[bytes, bytes] = {}
        self._bytes = 0

    @classmethod
    async def open(cls, config: DictConfig) -> Self:
        return cls(config)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=False, listable=True, capacity_bytes=self.config.capacity)

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        batch = {key: bytes(value) for key, value in items}
        replaced = sum(len(self._values.get(key, b"")) for key in batch)
        total = self._bytes - replaced + sum(len(value) for value in batch.values())
        capacity = self.config.capacity
        if capacity is not None and total > capacity:
            raise CapacityError(
                f"{total} bytes would exceed the capacity of {capacity}", driver=self.name
            )
        self._values.update(batch)
        self._bytes = total

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        targets = into or [None] * len(keys)
        return [
            None if (value := self._values.get(key)) is None else fill_into(value, target)
            for key, target in zip(keys, targets)
        ]

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        return [key in self._values for key in keys]

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        found = []
        for key in keys:
            value = self._values.pop(key, None)
            found.append(value is not None)
            self._bytes -= len(value or b"")
        return found

    async def _list(self) -> AsyncIterator[KeyEntry]:
        for key, value in list(self._values.items()):
            yield KeyEntry(key, len(value))

    async def _usage(self) -> Usage:
        return Usage(len(self._values), self._bytes, self.config.capacity)

    async def _close(self) -> None:
        self._values.clear()
        self._bytes = 0
