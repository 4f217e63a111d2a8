"""Core: single values round-trip, misses, overwrite, delete, list, usage, config."""

from __future__ import annotations

import array
import pickle
from typing import ClassVar

import pytest
from typing_extensions import Buffer

from kvstore.driver import MAX_KEY_BYTES, Capabilities

from ..harness import DriverHarness, assert_value
from .base import DriverTestBase

MiB = 1 << 20

ROUND_TRIP_SIZES = [1, 2, 100, 4096, 65_537, MiB + 7, 8 * MiB, 16 * MiB + 3]
"""Up to just over 16 MiB, so a run with ``-m "not kvstore_large"`` still moves a
value past the common 8 MiB and 16 MiB request and buffer limits."""
LARGE_VALUE_BYTES = 33 * MiB + 1
"""Past 32 MiB, where a driver's single-request or single-buffer limits tend to show."""


class CoreTests(DriverTestBase):
    """Every driver: values round-trip exactly, misses are ``None``/``False``,
    the last write wins, delete reports what it removed, ``list`` and ``usage``
    agree with what was written, and the config round-trips through its URL."""

    conformance_area: ClassVar[str] = "core"

    @pytest.mark.parametrize("size", ROUND_TRIP_SIZES)
    def test_round_trip(self, harness: DriverHarness, size: int) -> None:
        harness.require_value_size(size)
        harness.require_room(size)
        key, value = harness.key(), harness.value(size)
        harness.put([(key, value)])
        (got,) = harness.get([key])
        assert_value(got, value, f"{size}-byte value")
        assert harness.contains([key]) == [True]

    @pytest.mark.kvstore_large
    def test_round_trip_larger_than_32_mib(self, harness: DriverHarness) -> None:
        harness.require_value_size(LARGE_VALUE_BYTES)
        harness.require_room(LARGE_VALUE_BYTES)
        key, value = harness.key(), harness.value(LARGE_VALUE_BYTES)
        harness.put([(key, value)])
        (got,) = harness.get([key])
        assert_value(got, value, f"{LARGE_VALUE_BYTES}-byte value")
        into = bytearray(LARGE_VALUE_BYTES)
        (got,) = harness.get([key], into=[into])
        assert_value(got, value, f"{LARGE_VALUE_BYTES}-byte value read into a buffer")

    def test_empty_value_round_trips(self, harness: DriverHarness) -> None:
        key = harness.key()
        harness.put([(key, b"")])
        (got,) = harness.get([key])
        assert_value(got, b"", "zero-length value")
        (got,) = harness.get([key], into=[bytearray(8)])
        assert_value(got, b"", "zero-length value read into a buffer")
        assert harness.contains([key]) == [True], "a zero-length value is stored, not a miss"

    def test_miss_is_none_and_false(self, harness: DriverHarness) -> None:
        harness.put([(harness.key("neighbour"), b"a value next to the missing key")])
        key = harness.key("never-written")
        assert harness.get([key]) == [None], "a key never written is a miss: get_many"
        assert harness.get([key], into=[bytearray(16)]) == [None], (
            "a key never written is a miss: get_many with into"
        )
        assert harness.contains([key]) == [False], "a key never written is a miss: contains_many"
        assert harness.delete([key]) == [False], (
            "delete reports True only where a value was deleted"
        )

    def test_overwrite_replaces_value_and_its_size(self, harness: DriverHarness) -> None:
        key = harness.key()
        for size in (1000, 10, 5000, 0, 4096):
            value = harness.value(size)
            harness.put([(key, value)])
            (got,) = harness.get([key])
            assert_value(got, value, f"the last write wins: value after overwriting with {size} B")
            if harness.capabilities.listable:
                listed = harness.listing().get(key)
                assert listed == size, (
                    f"list reports the current size: {listed} listed after overwriting "
                    f"with {size} bytes"
                )

    def test_idempotent_re_put(self, harness: DriverHarness) -> None:
        key, value = harness.key(), harness.value(3000)
        harness.put([(key, value)])
        before = harness.usage()
        harness.put([(key, value)])
        (got,) = harness.get([key])
        assert_value(got, value, "value put twice")
        if harness.capabilities.listable:
            assert harness.listing().get(key) == len(value)
        if not harness.capabilities.shared:
            after = harness.usage()
            assert (after.entries, after.bytes) == (before.entries, before.bytes), (
                "putting the same key and value again must not change usage"
            )

    def test_delete_returns_true_then_false(self, harness: DriverHarness) -> None:
        key, value = harness.key(), harness.value(512)
        harness.put([(key, value)])
        assert harness.delete([key]) == [True]
        assert harness.get([key]) == [None]
        assert harness.contains([key]) == [False]
        assert harness.delete([key]) == [False]
        harness.put([(key, value)])
        (got,) = harness.get([key])
        assert_value(got, value, "value put again after delete")

    def test_binary_keys_round_trip(self, harness: DriverHarness) -> None:
        prefix = harness.key()
        suffixes = [b"\x00", b"/", b"/../..", b"\xff\xfe", b" %2F ?#&=", b"\n\t", b".", b"\\"]
        keys = [harness.remember(prefix + suffix) for suffix in suffixes]
        keys.append(harness.remember(prefix + b"\x80" * (MAX_KEY_BYTES - len(prefix))))
        values = [harness.value(64 + index) for index in range(len(keys))]
        harness.put(list(zip(keys, values)))
        for key, value, got in zip(keys, values, harness.get(keys)):
            assert_value(got, value, f"value of key {key!r}")
        assert harness.contains(keys) == [True] * len(keys)
        if harness.capabilities.listable:
            listed = harness.listing()
            assert {key: listed.get(key) for key in keys} == {
                key: len(value) for key, value in zip(keys, values)
            }
        assert harness.delete(keys) == [True] * len(keys)

    def test_accepts_any_contiguous_buffer(self, harness: DriverHarness) -> None:
        raw = harness.value(4096)
        doubles = array.array("d", raw[:4096])
        buffers: list[tuple[str, Buffer, bytes]] = [
            ("bytes", raw, raw),
            ("bytearray", bytearray(raw), raw),
            ("memoryview slice", memoryview(raw)[7:1031], raw[7:1031]),
            ("array of doubles", doubles, doubles.tobytes()),
            ("2-D memoryview", memoryview(raw).cast("B", (64, 64)), raw),
        ]
        keys = harness.keys(len(buffers))
        harness.put([(key, buffer) for key, (_, buffer, _) in zip(keys, buffers)])
        for (kind, _, expected), got in zip(buffers, harness.get(keys)):
            assert_value(got, expected, f"value stored from a {kind}")

    def test_stored_value_is_independent_of_callers_buffer(self, harness: DriverHarness) -> None:
        key, value = harness.key(), harness.value(8192)
        buffer = bytearray(value)
        harness.put([(key, buffer)])
        buffer[:] = bytes(len(buffer))
        (got,) = harness.get([key])
        assert_value(got, value, "value after the caller reused its buffer")

    def test_returned_value_survives_overwrite_and_delete(self, harness: DriverHarness) -> None:
        key, first, second = harness.key(), harness.value(8192), harness.value(8192)
        harness.put([(key, first)])
        (held,) = harness.get([key])
        harness.put([(key, second)])
        harness.delete([key])
        harness.put([(harness.key(), harness.value(8192)) for _ in range(4)])
        assert_value(held, first, "a value the caller holds after its key was overwritten")

    def test_list_includes_our_keys_with_sizes(self, harness: DriverHarness) -> None:
        if not harness.capabilities.listable:
            pytest.skip("capability listable=False: list need not enumerate every key")
        sizes = [0, 1, 777, 4096, 100_000]
        keys = harness.keys(len(sizes))
        harness.put([(key, harness.value(size)) for key, size in zip(keys, sizes)])
        listed = harness.listing()
        assert {key: listed.get(key) for key in keys} == dict(zip(keys, sizes))
        harness.delete(keys[:2])
        listed = harness.listing()
        assert [key in listed for key in keys] == [False, False, True, True, True]

    def test_usage_tracks_entries_and_bytes(self, harness: DriverHarness) -> None:
        if harness.capabilities.shared:
            pytest.skip("capability shared=True: usage also counts other writers")
        base = harness.usage()
        sizes = [100, 2000, 30_000]
        keys = harness.keys(len(sizes))
        harness.put([(key, harness.value(size)) for key, size in zip(keys, sizes)])
        grown = harness.usage()
        assert (grown.entries - base.entries, grown.bytes - base.bytes) == (3, sum(sizes))
        harness.put([(keys[0], harness.value(5000))])
        resized = harness.usage()
        assert (resized.entries, resized.bytes - grown.bytes) == (grown.entries, 5000 - 100)
        harness.delete(keys)
        after = harness.usage()
        assert (after.entries, after.bytes) == (base.entries, base.bytes)

    def test_usage_reports_capacity(self, harness: DriverHarness) -> None:
        usage = harness.usage()
        assert usage.capacity_bytes == harness.capabilities.capacity_bytes
        assert usage.entries >= 0
        assert usage.bytes >= 0
        if usage.capacity_bytes is not None:
            assert usage.bytes <= usage.capacity_bytes

    def test_capabilities_are_consistent(self, harness: DriverHarness) -> None:
        capabilities = harness.driver.capabilities
        assert isinstance(capabilities, Capabilities)
        assert isinstance(type(harness.driver).static_capabilities, Capabilities)
        assert harness.driver.capabilities == capabilities, "capabilities must not change"
        if capabilities.max_value_bytes is not None:
            assert capabilities.max_value_bytes > 0
        if capabilities.capacity_bytes is not None:
            assert capabilities.capacity_bytes > 0

    def test_config_round_trips_through_its_url(self, harness: DriverHarness) -> None:
        config = harness.driver.config
        url = config.to_url()
        assert type(config).from_url(url) == config, f"{url} does not parse back to {config!r}"
        assert harness.registry.parse_url(url) == config
        assert harness.driver.name == config.scheme
        assert isinstance(type(harness.driver).config_type, type)
        assert isinstance(config, type(harness.driver).config_type)

    def test_config_pickles(self, harness: DriverHarness) -> None:
        config = harness.driver.config
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            assert pickle.loads(pickle.dumps(config, protocol=protocol)) == config
