"""Where a key's value lives in the bucket: ``<prefix>/<shard>/<hex key>``.

The shard is the first byte of SHA-256 of the key, in hex, so writes spread
over 256 prefixes and no single S3 partition gets hot. The name holds the
whole key (hex), so ``list`` recovers keys from names alone; names that do not
follow this scheme (other data in the bucket) are ignored.
"""

from __future__ import annotations

import hashlib

SHARD_CHARS = 2
"""Hex characters of the shard directory: 256 shards."""


def shard_of(key: bytes) -> str:
    """The shard directory of ``key``."""
    return hashlib.sha256(key).hexdigest()[:SHARD_CHARS]


def object_name(prefix: str, key: bytes) -> str:
    """The S3 object key that holds the value of ``key`` under ``prefix``."""
    return f"{list_prefix(prefix)}{shard_of(key)}/{key.hex()}"


def list_prefix(prefix: str) -> str:
    """The S3 key prefix every value under ``prefix`` starts with."""
    return f"{prefix}/" if prefix else ""


def key_of(prefix: str, name: str) -> bytes | None:
    """The key whose value ``name`` holds, or ``None`` for a foreign object."""
    start = list_prefix(prefix)
    if not name.startswith(start):
        return None
    shard, separator, encoded = name[len(start) :].partition("/")
    if not separator or not encoded or "/" in encoded:
        return None
    try:
        key = bytes.fromhex(encoded)
    except ValueError:
        return None
    if not key or key.hex() != encoded or shard_of(key) != shard:
        return None
    return key
