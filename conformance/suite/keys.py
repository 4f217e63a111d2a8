"""Keys: every distinct key is its own key, up to ``MAX_KEY_BYTES`` bytes."""

from __future__ import annotations

from typing import ClassVar

from kvstore.driver import MAX_KEY_BYTES

from ..harness import DriverHarness, assert_values
from .base import DriverTestBase

LAST_BYTES = (b"\x00\x00", b"\x00\x01", b"\x01\x00", b"\xff\xff", b"aa", b"aA", b"Aa", b"AA")
"""Two-byte endings of otherwise equal keys: they differ in the last byte, the one
before it, and only in letter case."""


class KeyTests(DriverTestBase):
    """Every driver: keys that differ anywhere, even only in their last byte of
    ``MAX_KEY_BYTES``, or only in letter case, or one a prefix of another, hold
    separate values."""

    conformance_area: ClassVar[str] = "keys"

    def test_longest_keys_differing_only_in_their_last_bytes(self, harness: DriverHarness) -> None:
        stem = harness.key().ljust(MAX_KEY_BYTES - 2, b"k")
        keys = [harness.remember(stem + ending) for ending in LAST_BYTES]
        values = [harness.value(100 + index) for index in range(len(keys))]
        harness.put(list(zip(keys, values)))
        assert_values(harness.get(keys), values, "keys of MAX_KEY_BYTES differing in the end")
        assert harness.contains(keys) == [True] * len(keys)
        if harness.capabilities.listable:
            listed = harness.listing()
            sizes = {key: listed.get(key) for key in keys}
            assert sizes == {key: len(value) for key, value in zip(keys, values)}, (
                "list names each of the long keys with its own size"
            )
        assert harness.delete(keys[1:2]) == [True]
        expected = [None if index == 1 else value for index, value in enumerate(values)]
        assert_values(harness.get(keys), expected, "the long keys after deleting one")

    def test_a_key_and_its_prefixes(self, harness: DriverHarness) -> None:
        longest = harness.key().ljust(MAX_KEY_BYTES, b"p")
        keys = [harness.remember(longest[:length]) for length in (MAX_KEY_BYTES, 200, 100, 64)]
        values = [harness.value(50 + index) for index in range(len(keys))]
        harness.put(list(zip(keys, values)))
        assert_values(harness.get(keys), values, "a key and its prefixes")
        assert harness.delete(keys[:1]) == [True]
        assert_values(harness.get(keys), [None, *values[1:]], "prefixes after deleting the key")
