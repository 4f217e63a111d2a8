"""How the redis driver lays values out in Redis: key names, manifests, Lua scripts.

Every kvstore key ``K`` under the prefix ``P`` owns Redis keys that share the
hash tag ``{hex(K)}``, so in a Redis Cluster they all live in one slot and one
script or transaction can touch them together:

- ``P:{hex(K)}:v``: the whole value, for values up to the part size (inline);
- ``P:{hex(K)}:m``: a manifest ``<version>:<length>:<part length>`` for a
  larger value, whose bytes live in the parts ``P:{hex(K)}:p:<version>:<i>``.

A parted value is published by writing its parts under a fresh version (with
a staging expiry, so a writer that dies leaves nothing behind), then running
``PUBLISH`` which, atomically, checks the parts exist, makes them permanent
(or gives them the entry's TTL), swaps the manifest, removes any inline value
and deletes the parts of the version it replaced (never its own: a publish
that redis-py repeats after a lost reply must not undo itself). Part keys are never
rewritten, so a reader that fetched a manifest either finds every part of
that version intact or finds one missing (then it reads the manifest again);
it can never assemble a mix of two values.

Invariant: when ``v`` exists it is newer than ``m`` (publishing a manifest
deletes ``v`` in the same step), so readers prefer ``v``; ``TIDY`` runs after
an inline ``SET`` and removes the manifest and parts it superseded.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from kvstore.errors import IntegrityError

VALUE_SUFFIX = b"v"
MANIFEST_SUFFIX = b"m"
PART_SUFFIX = b"p"
_GLOB_SPECIALS = frozenset(b"*?[]\\")

PART_TTL_SLACK_MS = 1000
"""Parts of an entry with a TTL outlive its manifest by this much, so a reader
that still finds the manifest finds its parts."""


class KeyNames:
    """The Redis key names of one prefix (a namespace shared by every client using it)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self._head = self.prefix + b":{"

    def tag(self, key: bytes) -> bytes:
        """The start every Redis key of ``key`` shares, hash tag included."""
        return self._head + key.hex().encode() + b"}:"

    def value(self, key: bytes) -> bytes:
        return self.tag(key) + VALUE_SUFFIX

    def manifest(self, key: bytes) -> bytes:
        return self.tag(key) + MANIFEST_SUFFIX

    def part_prefix(self, key: bytes) -> bytes:
        """What the part keys of ``key`` start with; a version and ``:<i>`` follow."""
        return self.tag(key) + PART_SUFFIX + b":"

    def scan_pattern(self) -> bytes:
        """A SCAN ``MATCH`` pattern for the value and manifest keys of this prefix."""
        escaped = b"".join(
            b"\\" + bytes([byte]) if byte in _GLOB_SPECIALS else bytes([byte])
            for byte in self._head
        )
        return escaped + b"*}:[" + VALUE_SUFFIX + MANIFEST_SUFFIX + b"]"

    def entry_key(self, name: bytes) -> bytes | None:
        """The kvstore key a value or manifest key name belongs to, else ``None``."""
        if not name.startswith(self._head) or name[-3:-1] != b"}:":
            return None
        if name[-1:] not in (VALUE_SUFFIX, MANIFEST_SUFFIX):
            return None
        try:
            return bytes.fromhex(name[len(self._head) : -3].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None


@dataclass(frozen=True)
class Manifest:
    """Where a parted value lives: its version, length and the length of each part."""

    version: bytes
    length: int
    part_length: int

    @classmethod
    def plan(cls, length: int, part_size: int) -> Manifest:
        """A fresh version for a ``length``-byte value cut into equal parts of at most
        ``part_size`` bytes (equal, so no tiny last part costs a round trip of its own)."""
        count = -(-length // part_size)
        return cls(secrets.token_hex(8).encode(), length, -(-length // count))

    @classmethod
    def parse(cls, raw: bytes, driver: str) -> Manifest:
        """Decode a stored manifest; IntegrityError when it is not one of ours."""
        try:
            version, length, part_length = raw.split(b":")
            manifest = cls(version, int(length), int(part_length))
        except ValueError:
            raise IntegrityError(f"malformed manifest {raw[:64]!r}", driver=driver) from None
        if not version.isalnum() or manifest.length < 0 or manifest.part_length <= 0:
            raise IntegrityError(f"malformed manifest {raw[:64]!r}", driver=driver)
        return manifest

    def encode(self) -> bytes:
        return b"%s:%d:%d" % (self.version, self.length, self.part_length)

    def spans(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of each part, in order."""
        return [
            (offset, min(self.part_length, self.length - offset))
            for offset in range(0, self.length, self.part_length)
        ]

    def part_keys(self, part_prefix: bytes) -> list[bytes]:
        return [
            b"%s%s:%d" % (part_prefix, self.version, index) for index in range(len(self.spans()))
        ]


_DROP_PARTS = """
local function drop_parts(manifest, part_prefix)
  if not manifest then return end
  local version, length, part_length = string.match(manifest, '^(%w+):(%d+):(%d+)$')
  if not version then return end
  local count = math.ceil(tonumber(length) / tonumber(part_length))
  for index = 0, count - 1 do
    redis.call('DEL', part_prefix .. version .. ':' .. index)
  end
end
"""

PUBLISH = (
    _DROP_PARTS
    + """
-- KEYS: inline value, manifest, the new version's parts; ARGV: manifest, ttl ms, part prefix
local ttl = tonumber(ARGV[2])
for index = 3, #KEYS do
  if redis.call('EXISTS', KEYS[index]) == 0 then
    return redis.error_reply('KVSTORE_STAGING_EXPIRED a part expired before it was published')
  end
end
for index = 3, #KEYS do
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[index], ttl + """
    + str(PART_TTL_SLACK_MS)
    + """)
  else
    redis.call('PERSIST', KEYS[index])
  end
end
local previous = redis.call('GET', KEYS[2])
if ttl > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[1])
if previous ~= ARGV[1] then
  drop_parts(previous, ARGV[3])
end
return 1
"""
)
"""Publish a parted value atomically (see the module docstring)."""

TIDY = (
    _DROP_PARTS
    + """
-- KEYS: inline value, manifest; ARGV: part prefix. Runs after an inline SET.
if redis.call('EXISTS', KEYS[1]) == 1 then
  local previous = redis.call('GET', KEYS[2])
  if previous then
    redis.call('DEL', KEYS[2])
    drop_parts(previous, ARGV[1])
  end
end
return 0
"""
)
"""Remove the manifest and parts an inline value superseded, if it is still current."""

DELETE = (
    _DROP_PARTS
    + """
-- KEYS: inline value, manifest; ARGV: part prefix. Returns 1 when a value was there.
local removed = redis.call('DEL', KEYS[1])
local previous = redis.call('GET', KEYS[2])
if previous then
  redis.call('DEL', KEYS[2])
  drop_parts(previous, ARGV[1])
  removed = 1
end
return removed
"""
)
"""Delete an entry, inline or parted, in one step."""

DROP_IF_CURRENT = (
    _DROP_PARTS
    + """
-- KEYS: manifest; ARGV: the manifest a reader found broken, part prefix.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('DEL', KEYS[1])
  drop_parts(current, ARGV[2])
  return 1
end
return 0
"""
)
"""Remove a parted entry whose parts are gone (evicted), unless it changed meanwhile."""

SIZE = """
-- KEYS: inline value, manifest. The entry's length, or -1 when there is none.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('STRLEN', KEYS[1])
end
local manifest = redis.call('GET', KEYS[2])
if manifest then
  local length = string.match(manifest, '^%w+:(%d+):%d+$')
  if length then return tonumber(length) end
end
return -1
"""
"""One entry's size for ``list``, read atomically whichever form it has."""
