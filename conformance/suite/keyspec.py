"""Key spec: the chunk keys this installation computes match the spec's test vectors.

Not about the driver: every conformance run also confirms that the stores
sharing a tier derive the same keys (docs/key-spec.md).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, ClassVar

import pytest

from kvstore.keys import Namespace, chunk_keys
from kvstore.layout import KVLayout

from .base import DriverTestBase


def key_vectors() -> list[dict[str, Any]]:
    """The spec's test vectors, shipped with the suite as ``key_vectors.json``."""
    text = resources.files("kvstore.conformance").joinpath("key_vectors.json").read_text()
    vectors: list[dict[str, Any]] = json.loads(text)
    return vectors


def vector_namespace(vector: dict[str, Any]) -> Namespace:
    fields = dict(vector["namespace"])
    return Namespace(layout=KVLayout(**fields.pop("layout")), **fields)


def vector_tokens(vector: dict[str, Any]) -> list[int]:
    tokens = vector["tokens"]
    return list(range(*tokens["range"])) if isinstance(tokens, dict) else list(tokens)


class KeySpecTests(DriverTestBase):
    """The key spec's vectors recompute exactly: namespace bytes, digest, chunk keys."""

    conformance_area: ClassVar[str] = "keyspec"

    @pytest.mark.parametrize("vector", key_vectors(), ids=lambda vector: vector["name"])
    def test_key_vector(self, vector: dict[str, Any]) -> None:
        namespace = vector_namespace(vector)
        assert namespace.canonical_bytes().decode() == vector["namespace_canonical"]
        assert namespace.digest().hex() == vector["namespace_digest"]
        keys = chunk_keys(namespace.digest(), vector_tokens(vector), namespace.chunk_tokens)
        assert [key.hex() for key in keys] == vector["chunk_keys"]
