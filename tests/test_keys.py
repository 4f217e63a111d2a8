"""The key spec: test vectors, determinism across processes, namespace binding."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvstore.conformance.suite.keyspec import KeySpecTests, key_vectors
from kvstore.errors import InvalidArgumentError
from kvstore.keys import Namespace, chunk_keys
from kvstore.layout import KVLayout

ROOT = Path(__file__).resolve().parent.parent
VECTORS = key_vectors()


class TestKeySpec(KeySpecTests):
    """The suite's key-spec area, run here on its own (it needs no driver)."""


def test_doc_lists_every_vector() -> None:
    doc = (ROOT / "docs" / "key-spec.md").read_text()
    for vector in VECTORS:
        assert vector["namespace_digest"] in doc
        for key in vector["chunk_keys"]:
            assert key in doc


def test_same_keys_under_any_hash_seed() -> None:
    script = (
        "from kvstore.keys import Namespace, chunk_keys; from kvstore.layout import KVLayout;"
        "ns = Namespace('m', 'r', KVLayout(2, 2, 8), chunk_tokens=4, tenant='t');"
        "print(','.join(k.hex() for k in chunk_keys(ns.digest(), list(range(40)), 4)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "12345", "random")
    }
    assert len(outputs) == 1


def test_token_containers_agree() -> None:
    digest = Namespace("m", "r", KVLayout(1, 1, 8)).digest()
    ids = [5, 1, 99, 7, 3, 2, 8, 1]
    expected = chunk_keys(digest, ids, 4)
    assert chunk_keys(digest, np.array(ids, dtype=np.int64), 4) == expected
    assert chunk_keys(digest, torch.tensor(ids), 4) == expected
    assert chunk_keys(digest, np.array(ids, dtype=np.uint16), 4) == expected


def test_keys_commit_to_the_whole_prefix() -> None:
    digest = Namespace("m", "r", KVLayout(1, 1, 8)).digest()
    a = chunk_keys(digest, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chunk_keys(digest, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]
    assert chunk_keys(digest, [1, 2, 3, 4, 5, 6, 7], 4) == a[:1]
    assert chunk_keys(digest, [1, 2, 3], 4) == []


def test_a_growing_prompt_hashes_on_from_its_last_key() -> None:
    digest = Namespace("m", "r", KVLayout(1, 1, 8)).digest()
    ids = list(range(20))
    whole = chunk_keys(digest, ids, 4)
    assert chunk_keys(digest, ids[8:], 4, after=whole[1]) == whole[2:]
    assert chunk_keys(digest, ids[8:], 4) != whole[2:], "the chain, not the tokens alone"
    with pytest.raises(InvalidArgumentError):
        chunk_keys(digest, ids, 4, after=b"short")


BASE = Namespace("m", "r", KVLayout(2, 2, 8))


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"revision": "r2"},
        {"layout": KVLayout(3, 2, 8)},
        {"layout": KVLayout(2, 4, 8)},
        {"layout": KVLayout(2, 2, 16)},
        {"layout": KVLayout(2, 2, 8, "bfloat16")},
        {"layout": KVLayout(2, 1, 8, mla=True)},
        {"chunk_tokens": 128},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_size": 2},
        {"codec": "int8"},
        {"tenant": "tenant-b"},
    ],
)
def test_every_namespace_field_changes_the_keys(change: dict[str, Any]) -> None:
    other = dataclasses.replace(BASE, **change)
    tokens = list(range(512))
    assert other.digest() != BASE.digest()
    assert set(chunk_keys(other.digest(), tokens, 4)).isdisjoint(
        chunk_keys(BASE.digest(), tokens, 4)
    )


@pytest.mark.parametrize("tokens", [[-1, 2], [2**31], [[1, 2]], [1.5, 2.0]])
def test_bad_tokens_are_rejected(tokens: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        chunk_keys(BASE.digest(), np.array(tokens), 1)


def test_newlines_cannot_forge_fields() -> None:
    with pytest.raises(InvalidArgumentError):
        Namespace("m\ntenant=x", "r", KVLayout(1, 1, 8))
