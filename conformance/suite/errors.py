"""Errors: bad arguments and closed drivers raise the typed errors of the taxonomy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import pytest

from kvstore.driver import MAX_KEY_BYTES, Driver
from kvstore.errors import DriverClosedError, InvalidArgumentError, InvalidKeyError

from ..harness import DriverHarness
from .base import DriverTestBase

KeyedCall = Callable[[Driver[Any], list[Any]], Coroutine[Any, Any, object]]

KEYED_METHODS: dict[str, KeyedCall] = {
    "put_many": lambda driver, keys: driver.put_many([(key, b"value") for key in keys]),
    "get_many": lambda driver, keys: driver.get_many(keys),
    "contains_many": lambda driver, keys: driver.contains_many(keys),
    "delete_many": lambda driver, keys: driver.delete_many(keys),
}


async def _list_all(driver: Driver[Any]) -> None:
    async for _ in driver.list():
        pass


EVERY_METHOD: dict[str, Callable[[Driver[Any]], Coroutine[Any, Any, object]]] = {
    "put_many": lambda driver: driver.put_many([(b"key", b"value")]),
    "get_many": lambda driver: driver.get_many([b"key"]),
    "get_many into": lambda driver: driver.get_many([b"key"], [bytearray(8)]),
    "contains_many": lambda driver: driver.contains_many([b"key"]),
    "delete_many": lambda driver: driver.delete_many([b"key"]),
    "list": _list_all,
    "usage": lambda driver: driver.usage(),
}


class ErrorTests(DriverTestBase):
    """Every driver: bad keys raise ``InvalidKeyError``, other bad arguments
    ``InvalidArgumentError`` (with nothing stored), errors name the driver, and
    every method of a closed driver raises ``DriverClosedError``."""

    conformance_area: ClassVar[str] = "errors"

    @pytest.mark.parametrize("method", list(KEYED_METHODS))
    def test_bad_keys_are_rejected(self, harness: DriverHarness, method: str) -> None:
        bad_keys: list[object] = [
            "text",
            bytearray(b"mutable"),
            memoryview(b"view"),
            42,
            None,
            b"",
            b"k" * (MAX_KEY_BYTES + 1),
        ]
        for bad in bad_keys:
            with pytest.raises(InvalidKeyError) as caught:
                harness.run(KEYED_METHODS[method](harness.driver, [harness.key(), bad]))
            assert caught.value.driver == harness.driver.name, "errors must name their driver"

    @pytest.mark.parametrize("method", ["get_many", "contains_many", "delete_many"])
    def test_single_key_instead_of_a_sequence(self, harness: DriverHarness, method: str) -> None:
        single_key: Any = harness.key()
        with pytest.raises(InvalidArgumentError):
            harness.run(KEYED_METHODS[method](harness.driver, single_key))

    def test_longest_key_is_accepted(self, harness: DriverHarness) -> None:
        key = harness.remember(harness.key().ljust(MAX_KEY_BYTES, b"k"))
        harness.put([(key, b"value")])
        assert harness.contains([key]) == [True]
        assert harness.delete([key]) == [True]

    def test_bad_values_are_rejected(self, harness: DriverHarness) -> None:
        key = harness.key()
        for bad in ["text", 42, None, [1, 2, 3], memoryview(b"abcdef")[::2]]:
            with pytest.raises(InvalidArgumentError):
                harness.put([(key, bad)])  # type: ignore[list-item]
        assert harness.contains([key]) == [False]

    def test_rejected_batch_stores_nothing(self, harness: DriverHarness) -> None:
        good, other = harness.key("good"), harness.key("other")
        with pytest.raises(InvalidKeyError):
            harness.put([(good, b"value"), (b"", b"value")])
        with pytest.raises(InvalidArgumentError):
            harness.put([(good, b"value"), (other, "not a buffer")])  # type: ignore[list-item]
        assert harness.contains([good, other]) == [False, False]

    @pytest.mark.parametrize("method", list(EVERY_METHOD))
    def test_closed_driver_raises(self, harness: DriverHarness, method: str) -> None:
        driver = harness.driver
        harness.run(driver.close())
        assert driver.closed
        with pytest.raises(DriverClosedError) as caught:
            harness.run(EVERY_METHOD[method](driver))
        assert caught.value.driver == driver.name

    def test_close_is_idempotent(self, harness: DriverHarness) -> None:
        driver = harness.driver
        harness.run(driver.close())
        harness.run(driver.close())
        assert driver.closed

    def test_async_with_closes(self, harness: DriverHarness) -> None:
        driver = harness.driver

        async def use() -> None:
            async with driver:
                await driver.contains_many([b"kvconf-probe"])
            await asyncio.sleep(0)

        harness.run(use())
        assert driver.closed
