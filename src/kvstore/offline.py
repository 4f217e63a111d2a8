"""The stand-in for a tier whose driver could not be opened.

A store opens with a tier below the first one down (its server unreachable at
start): the tier gets an ``OfflineDriver``, every call of which fails at once
with ``DriverUnavailableError``, so the tier serves misses and takes no writes
until the store's background reconnect swaps the real driver in.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import AsyncIterator
from typing import ClassVar, NoReturn

from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
from kvstore.errors import DriverUnavailableError
from kvstore.registry import default_registry


class OfflineDriver(Driver[DriverConfig]):
    """A driver that is down: ``reason`` says why it could not be opened.

    Its capabilities are the real driver's static ones (shared, persistent),
    listing nothing, with ``capacity_bytes`` the tier's configured capacity
    (0 when it has none), so the tier keeps its place and its size.
    """

    config_type: ClassVar[type[DriverConfig]] = DriverConfig
    static_capabilities: ClassVar[Capabilities] = Capabilities(persistent=False, listable=False)

    def __init__(
        self, config: DriverConfig, real: Capabilities, capacity: int | None, reason: str
    ) -> None:
        super().__init__(config)
        self.reason = reason
        self._capabilities = dataclasses.replace(
            real, listable=False, lends_views=False, capacity_bytes=capacity or 0
        )

    @classmethod
    def standing_in(cls, url: str, capacity: int | None, reason: str) -> OfflineDriver:
        """The stand-in for the driver of ``url`` (a tier of ``capacity``), down for ``reason``."""
        registry = default_registry()
        config = registry.parse_url(url)
        real = registry.get(config.scheme).load().static_capabilities
        return cls(config, real, capacity, reason)

    @classmethod
    async def open(cls, config: DriverConfig) -> Self:
        raise DriverUnavailableError("an offline driver is never opened", driver=config.scheme)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _down(self) -> NoReturn:
        raise DriverUnavailableError(f"the tier is down: {self.reason}", driver=self.name)

    async def _put_many(self, items: builtins.list[tuple[bytes, memoryview]]) -> None:
        self._down()

    async def _get_many(
        self, keys: builtins.list[bytes], into: builtins.list[memoryview | None] | None
    ) -> builtins.list[memoryview | None]:
        self._down()

    async def _contains_many(self, keys: builtins.list[bytes]) -> builtins.list[bool]:
        self._down()

    async def _delete_many(self, keys: builtins.list[bytes]) -> builtins.list[bool]:
        self._down()

    def _list(self) -> AsyncIterator[KeyEntry]:
        self._down()

    async def _usage(self) -> Usage:
        self._down()

    async def _close(self) -> None:
        return None
