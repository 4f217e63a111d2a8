"""Batches: result order, mixed hits and misses, duplicates, ``into`` buffers."""

from __future__ import annotations

import array
from typing import ClassVar

import pytest

from kvstore.errors import InvalidArgumentError

from ..harness import DriverHarness, assert_value, assert_values
from .base import DriverTestBase


def assert_view_of(view: memoryview, buffer: bytearray | memoryview, what: str) -> None:
    """Fail unless ``view`` shows ``buffer``'s first bytes: a change to the buffer
    shows through the view (checked by flipping the first byte and back)."""
    if len(view) == 0:
        return
    before = view[0]
    buffer[0] ^= 0xFF
    try:
        assert view[0] == buffer[0] != before, f"{what}: the result is not a view of that buffer"
    finally:
        buffer[0] ^= 0xFF


class BatchTests(DriverTestBase):
    """Every driver: batch results line up with their keys, whatever the mix of
    hits, misses and repeats, and ``into`` buffers are filled or bypassed as the
    protocol says."""

    conformance_area: ClassVar[str] = "batch"

    def test_results_follow_key_order(self, harness: DriverHarness) -> None:
        keys = harness.keys(64)
        values = [harness.value(16 + 37 * index) for index in range(len(keys))]
        harness.put(list(zip(keys, values)))
        order = list(range(len(keys)))
        harness.random.shuffle(order)
        got = harness.get([keys[index] for index in order])
        assert_values(got, [values[index] for index in order], "shuffled batch get")
        assert harness.contains([keys[index] for index in order]) == [True] * len(keys)

    def test_mixed_hits_and_misses(self, harness: DriverHarness) -> None:
        keys = harness.keys(12)
        stored = {key: harness.value(100 + index) for index, key in enumerate(keys) if index % 3}
        harness.put(list(stored.items()))
        expected = [stored.get(key) for key in keys]
        assert_values(harness.get(keys), expected, "batch of hits and misses")
        assert harness.contains(keys) == [key in stored for key in keys]
        into = [bytearray(256) for _ in keys]
        got = harness.get(keys, into=into)
        assert_values(got, expected, "hits and misses into buffers")
        for index, (view, buffer) in enumerate(zip(got, into)):
            if view is not None:
                assert_view_of(view, buffer, f"into[{index}] holds the value of keys[{index}]")
        assert harness.delete(keys) == [key in stored for key in keys]
        assert harness.contains(keys) == [False] * len(keys)

    def test_duplicate_keys_in_one_batch(self, harness: DriverHarness) -> None:
        first, second, missing = harness.key(), harness.key(), harness.key("missing")
        values = {first: harness.value(300), second: harness.value(500)}
        harness.put(list(values.items()))
        keys = [first, second, first, missing, first, missing]
        expected = [values.get(key) for key in keys]
        assert_values(harness.get(keys), expected, "batch with repeated keys")
        assert harness.contains(keys) == [key in values for key in keys]
        into = [bytearray(512) for _ in keys]
        assert_values(harness.get(keys, into=into), expected, "repeated keys into buffers")

    def test_last_of_a_key_repeated_in_one_put_wins(self, harness: DriverHarness) -> None:
        key, other = harness.key("repeated"), harness.key("other")
        first, middle, last = harness.value(3000), harness.value(10), harness.value(700)
        before = None if harness.capabilities.shared else harness.usage()
        harness.put([(key, first), (other, middle), (key, middle), (key, last)])
        assert_values(
            harness.get([key, other]), [last, middle], "a key repeated in one put: the last wins"
        )
        if harness.capabilities.listable:
            listed = harness.listing().get(key)
            assert listed == len(last), (
                f"a key repeated in one put is listed with its last value's size: {listed}"
            )
        if before is not None:
            after = harness.usage()
            grown = (after.entries - before.entries, after.bytes - before.bytes)
            assert grown == (2, len(last) + len(middle)), (
                f"a key repeated in one put is counted once, at its last size: usage grew by "
                f"{grown} (entries, bytes)"
            )
        assert harness.delete([key]) == [True]
        assert harness.get([key]) == [None], "a key repeated in one put left a copy behind"

    def test_empty_batches(self, harness: DriverHarness) -> None:
        harness.put([])
        assert harness.get([]) == []
        assert harness.get([], into=[]) == []
        assert harness.contains([]) == []
        assert harness.delete([]) == []

    def test_large_batch(self, harness: DriverHarness) -> None:
        harness.require_room(64 * 200)
        keys = harness.keys(200)
        values = [harness.value(64) for _ in keys]
        harness.put(list(zip(keys, values)))
        assert_values(harness.get(keys), values, "200-key batch")
        assert harness.delete(keys) == [True] * len(keys)
        assert harness.get(keys) == [None] * len(keys)

    def test_into_buffer_that_fits_is_used(self, harness: DriverHarness) -> None:
        keys = harness.keys(3)
        values = [harness.value(size) for size in (1000, 4096, 70_000)]
        harness.put(list(zip(keys, values)))
        buffers = [bytearray(1000), bytearray(5000), bytearray(70_001)]
        got = harness.get(keys, into=buffers)
        assert_values(got, values, "values read into buffers that fit")
        for index, (view, buffer, value) in enumerate(zip(got, buffers, values)):
            assert buffer[: len(value)] == value, f"buffer {index} was not filled with the value"
            assert view is not None
            assert_view_of(view, buffer, f"result {index} is a view of its into buffer")

    def test_into_buffers_larger_than_values(self, harness: DriverHarness) -> None:
        """The protocol's rule: a driver may use all of an ``into`` buffer (past the
        value's length as scratch, as O_DIRECT padding does) and nothing outside it;
        the result is a view of the buffer's first ``len(value)`` bytes."""
        sizes = [1, 511, 4095, 4097, 70_001]
        keys = harness.keys(len(sizes))
        values = [harness.value(size) for size in sizes]
        harness.put(list(zip(keys, values)))
        guard = 8192
        for extra in (0, 1, 4096, 12_345):
            arenas = [bytearray(b"\xa5" * (guard + size + extra + guard)) for size in sizes]
            into = [
                memoryview(arena)[guard : guard + size + extra]
                for arena, size in zip(arenas, sizes)
            ]
            got = harness.get(keys, into=into)
            assert_values(got, values, f"values read into buffers {extra} bytes too large")
            for index, (view, arena, value) in enumerate(zip(got, arenas, values)):
                end = guard + len(into[index])
                assert arena[:guard] == arena[end:] == b"\xa5" * guard, (
                    f"drivers write only inside into buffers: bytes around buffer {index} "
                    f"({len(value)}-byte value, {extra} spare) changed"
                )
                assert arena[guard : guard + len(value)] == value, (
                    f"a value that fits is written at the start of its buffer: buffer {index}"
                )
                assert view is not None
                assert_view_of(view, into[index], f"result {index} is a view of its into buffer")

    def test_into_buffer_of_another_format(self, harness: DriverHarness) -> None:
        key, value = harness.key(), harness.value(4096)
        harness.put([(key, value)])
        buffer = array.array("I", bytes(4096))
        (got,) = harness.get([key], into=[buffer])
        assert_value(got, value, "value read into an array of unsigned ints")
        assert buffer.tobytes() == value

    def test_into_buffer_too_small_still_returns_value(self, harness: DriverHarness) -> None:
        keys = harness.keys(2)
        values = [harness.value(10_000), harness.value(64)]
        harness.put(list(zip(keys, values)))
        got = harness.get(keys, into=[bytearray(100), None])
        assert_values(got, values, "values whose into buffer is too small or None")

    def test_into_with_wrong_count_is_rejected(self, harness: DriverHarness) -> None:
        keys = harness.keys(2)
        harness.put([(key, b"x") for key in keys])
        with pytest.raises(InvalidArgumentError):
            harness.get(keys, into=[bytearray(8)])
        with pytest.raises(InvalidArgumentError):
            harness.get(keys, into=[bytearray(8)] * 3)

    def test_read_only_into_buffer_is_rejected(self, harness: DriverHarness) -> None:
        key = harness.key()
        harness.put([(key, b"abc")])
        with pytest.raises(InvalidArgumentError):
            harness.get([key], into=[bytes(8)])
