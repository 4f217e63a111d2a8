"""Where a key's value lives under the driver's root, and which paths are values.

A value of key ``k`` is the file ``<root>/<shard>.../<hex of k>``: ``shard_depth``
directories named by the bytes of ``blake2b(k)`` in hex (``ab/``), spreading
keys evenly whatever they look like, then the key in lowercase hex. Names
longer than ``SEGMENT_HEX`` characters (keys over 100 bytes) are cut into
segments; every segment but the last is a directory whose name ends with
``CONTINUED``, so a long key's directory never collides with a shorter
key's file. Temp files of puts in progress end in ``.tmp-<random>``. Any
other name (temp files, foreign files) is not a value, so listing skips it.
"""

from __future__ import annotations

import hashlib
import re
import secrets

SEGMENT_HEX = 200
"""Hex characters per path component: 100 key bytes, with room for the temp suffix
under the 255-byte name limit of local filesystems."""

CONTINUED = "-"
"""Suffix of the directory that holds the rest of a long key's name."""

TEMP_MARKER = ".tmp-"

_SHARD = re.compile(r"[0-9a-f]{2}\Z")
_HEX = re.compile(r"(?:[0-9a-f]{2})+\Z")


def shards(key: bytes, depth: int) -> list[str]:
    """The shard directory names of ``key``, outermost first."""
    if depth == 0:
        return []
    digest = hashlib.blake2b(key, digest_size=depth).hexdigest()
    return [digest[2 * level : 2 * level + 2] for level in range(depth)]


def relative_path(key: bytes, depth: int) -> str:
    """The path of ``key``'s value relative to the root, with ``/`` separators."""
    name = key.hex()
    segments = [name[start : start + SEGMENT_HEX] for start in range(0, len(name), SEGMENT_HEX)]
    parts = [*shards(key, depth), *(segment + CONTINUED for segment in segments[:-1]), segments[-1]]
    return "/".join(parts)


def temp_path(path: str) -> str:
    """A fresh temp name next to ``path``, for a put that renames it into place."""
    return f"{path}{TEMP_MARKER}{secrets.token_hex(8)}"


def key_of(relative: str, depth: int) -> bytes | None:
    """The key whose value lives at ``relative`` (a path under the root), or ``None``
    for anything that is not a value: temp files, foreign files, misplaced names."""
    parts = relative.split("/")
    if len(parts) <= depth or not all(_SHARD.match(part) for part in parts[:depth]):
        return None
    *continued, last = parts[depth:]
    if not 0 < len(last) <= SEGMENT_HEX or not _HEX.match(last):
        return None
    for part in continued:
        if len(part) != SEGMENT_HEX + len(CONTINUED) or not part.endswith(CONTINUED):
            return None
        if not _HEX.match(part[:SEGMENT_HEX]):
            return None
    key = bytes.fromhex("".join(part[:SEGMENT_HEX] for part in continued) + last)
    return key if shards(key, depth) == parts[:depth] else None
