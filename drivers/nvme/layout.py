"""The nvme driver's on-disk layout: where each value lives and its header block.

A store directory holds a lock file and 256 shard directories named by the
low byte of the key's xxh3-64 hash in hex (``00`` .. ``ff``): keys that share
a prefix (every storage key starts with its tenant and namespace tags) still
spread over every shard. Each value is one file in its shard, named by the
key's hex (or ``h`` + the key's blake3 digest when the hex would make too long
a file name). Directories written before shards were chosen by hash (the key's
first byte) are moved into place when the directory is opened (``scan_shard``).
A file is one 4 KiB header block followed by the value, zero-padded to a
multiple of 4 KiB so O_DIRECT can move it whole:

    offset  size  field
    0       8     magic  b"KVSNVME\\x00"
    8       2     format version (little-endian, currently 1)
    10      2     key length k
    12      4     reserved, zero
    16      8     value length
    24      k     key
    24+k    8     xxh3-64 of bytes [0, 24+k)
    ...           zeros up to 4096, then the padded value

Files being written are ``.tmp-*`` files in the same shard; they become
visible only by an atomic rename onto the final name.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass

import blake3
import xxhash

ALIGN = 4096
"""Alignment of O_DIRECT offsets, lengths and buffers."""

HEADER_SIZE = ALIGN
MAGIC = b"KVSNVME\x00"
FORMAT_VERSION = 1
LOCK_NAME = ".lock"
SLOTS_DIR = "slots"
"""Where the private slots of the processes sharing a directory live (``slots/1`` ...)."""
TEMP_PREFIX = ".tmp-"
SHARDS = tuple(f"{i:02x}" for i in range(256))

_FIXED = struct.Struct("<8sHHIQ")
_CHECKSUM = struct.Struct("<Q")
_MAX_HEX_NAME = 200


class HeaderError(Exception):
    """A header block that is not a valid header of this format."""


def padded(length: int) -> int:
    """``length`` rounded up to a multiple of ``ALIGN``."""
    return -(-length // ALIGN) * ALIGN


def file_size(value_length: int) -> int:
    """The exact size of the file holding a value of ``value_length`` bytes."""
    return HEADER_SIZE + padded(value_length)


def largest_value(capacity: int) -> int:
    """The longest value whose file fits in ``capacity`` bytes (0 when none does)."""
    return max(0, (capacity - HEADER_SIZE) // ALIGN * ALIGN)


def shard_of(key: bytes) -> str:
    """The shard directory name of ``key``: the low byte of its xxh3-64 hash in hex."""
    return f"{xxhash.xxh3_64_intdigest(key) & 0xFF:02x}"


def file_name(key: bytes) -> str:
    """The file name of ``key`` within its shard."""
    name = key.hex()
    return name if len(name) <= _MAX_HEX_NAME else "h" + blake3.blake3(key).hexdigest()


def entry_path(root: str, key: bytes) -> str:
    """Where the value of ``key`` lives under the store directory ``root``."""
    return os.path.join(root, shard_of(key), file_name(key))


def temp_path(root: str, key: bytes) -> str:
    """A fresh temporary file name in the shard of ``key`` (same filesystem as its final path)."""
    return os.path.join(root, shard_of(key), TEMP_PREFIX + uuid.uuid4().hex)


def encode_header(key: bytes, value_length: int) -> bytes:
    """The meaningful prefix of the header block (the rest of the block is zeros)."""
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, len(key), 0, value_length) + key
    return fixed + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(fixed))


def decode_header(block: bytes | memoryview) -> tuple[bytes, int]:
    """The key and value length a header block describes, or HeaderError."""
    if len(block) < _FIXED.size:
        raise HeaderError("header block is too short")
    magic, version, key_length, _, value_length = _FIXED.unpack_from(block)
    if magic != MAGIC:
        raise HeaderError("not an nvme driver file (bad magic)")
    if version != FORMAT_VERSION:
        raise HeaderError(f"unsupported format version {version}")
    end = _FIXED.size + key_length
    if key_length == 0 or end + _CHECKSUM.size > HEADER_SIZE:
        raise HeaderError(f"bad key length {key_length}")
    (checksum,) = _CHECKSUM.unpack_from(block, end)
    if checksum != xxhash.xxh3_64_intdigest(bytes(block[:end])):
        raise HeaderError("header checksum mismatch")
    return bytes(block[_FIXED.size : end]), value_length


@dataclass
class ShardScan:
    """What scanning one shard directory found and cleaned."""

    entries: list[tuple[bytes, int]]
    removed_temp: int = 0
    removed_invalid: int = 0
    relocated: int = 0


def scan_shard(shard_dir: str) -> ShardScan:
    """Index the valid files of one shard, deleting temp leftovers and invalid files.

    A file is valid when its header decodes, its key maps to its own name, and
    its size is exactly what the header's value length implies (a truncated or
    foreign file fails one of these). A valid file in another shard than its
    key's (the layout before shards were chosen by hash) is moved to its shard,
    unless that holds the key's file already. Only the directory's owner may
    call this: it assumes no write is in flight.
    """
    scan = ShardScan(entries=[])
    shard = os.path.basename(shard_dir)
    root = os.path.dirname(shard_dir)
    with os.scandir(shard_dir) as listing:
        for item in listing:
            if not item.is_file(follow_symlinks=False):
                continue
            if item.name.startswith(TEMP_PREFIX):
                os.unlink(item.path)
                scan.removed_temp += 1
                continue
            entry = _read_entry(item.path)
            if entry is None or file_name(entry[0]) != item.name:
                os.unlink(item.path)
                scan.removed_invalid += 1
                continue
            if shard_of(entry[0]) != shard:
                placed = entry_path(root, entry[0])
                if os.path.exists(placed):
                    os.unlink(item.path)
                    continue
                os.replace(item.path, placed)
                scan.relocated += 1
            scan.entries.append(entry)
    return scan


def _read_entry(path: str) -> tuple[bytes, int] | None:
    with open(path, "rb") as file:
        block = file.read(HEADER_SIZE)
        size = os.fstat(file.fileno()).st_size
    try:
        key, value_length = decode_header(block)
    except HeaderError:
        return None
    return (key, value_length) if size == file_size(value_length) else None
