"""Aligned memory and whole-range vectored I/O for O_DIRECT files.

O_DIRECT moves data between the device and user memory with no page cache,
provided buffer addresses, file offsets and lengths are multiples of the
logical block size (``ALIGN`` covers every common device). The helpers here
allocate such memory, tell whether a caller's buffer qualifies, and loop
``os.preadv``/``os.pwritev`` (which release the GIL) until a range is done.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from typing_extensions import Buffer

from .layout import ALIGN, HEADER_SIZE, HeaderError, decode_header, padded

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
ZERO_BLOCK = memoryview(bytes(ALIGN))


class ShortReadError(Exception):
    """The file ended before the range that was read (it was truncated)."""


def aligned_buffer(size: int) -> memoryview:
    """A writable, uninitialised byte buffer of ``size`` bytes at an ``ALIGN``-aligned address."""
    raw = np.empty(size + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + size].data


def address_of(buffer: memoryview) -> int:
    """The address of the first byte of ``buffer`` (read-only buffers too)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


def is_aligned(buffer: memoryview) -> bool:
    return address_of(buffer) % ALIGN == 0


def copy_bytes(target: memoryview, source: memoryview) -> None:
    """``target[:] = source`` through numpy, which releases the GIL for large copies."""
    np.copyto(np.frombuffer(target, dtype=np.uint8), np.frombuffer(source, dtype=np.uint8))


class Scratch(threading.local):
    """Per-thread aligned bounce buffers: one I/O block and one header block."""

    def __init__(self, block_size: int) -> None:
        self.block = aligned_buffer(block_size)
        self.header = aligned_buffer(ALIGN)


@dataclass(frozen=True)
class Transfer:
    """One value's memory: the caller's source (put) or the destination (get).

    length: the value's length; the file holds it padded to ``ALIGN``.
    direct_limit: bytes ``[0, direct_limit)`` of ``buffer`` may be handed to the
        kernel as they are; the rest of the padded range goes through a bounce
        buffer (one copy). Under O_DIRECT that is the aligned whole blocks of an
        aligned buffer; under buffered I/O it is the whole value.
    """

    buffer: memoryview
    length: int
    direct_limit: int

    @classmethod
    def source(cls, value: memoryview, direct: bool) -> Transfer:
        """A value to write."""
        length = len(value)
        if not direct:
            return cls(value, length, length)
        return cls(value, length, length // ALIGN * ALIGN if is_aligned(value) else 0)

    @classmethod
    def destination(cls, buffer: memoryview, length: int, direct: bool) -> Transfer:
        """Where to read a value of ``length`` bytes; ``len(buffer) >= length``."""
        if not direct:
            return cls(buffer, length, length)
        limit = min(len(buffer) // ALIGN * ALIGN, padded(length)) if is_aligned(buffer) else 0
        return cls(buffer, length, limit)


def pieces(length: int, block: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of the padded value, ``block`` bytes each, that are
    transferred in parallel; one empty piece for an empty value (its header still moves)."""
    total = padded(length)
    return [(start, min(start + block, total)) for start in range(0, total, block)] or [(0, 0)]


def write_piece(
    fd: int, transfer: Transfer, piece: tuple[int, int], header: bytes | None, scratch: Scratch
) -> None:
    """Write one piece of a value (and the header block first, when given)."""
    start, end = piece
    parts: list[memoryview] = []
    offset = HEADER_SIZE + start
    if header is not None:
        scratch.header[: len(header)] = header
        scratch.header[len(header) :] = ZERO_BLOCK[len(header) :]
        parts.append(scratch.header)
        offset = 0
    split = min(max(transfer.direct_limit, start), end)
    if split > start:
        parts.append(transfer.buffer[start:split])
    if end > split:
        bounce = scratch.block[: end - split]
        data_end = min(end, transfer.length)
        filled = data_end - split
        if filled:
            copy_bytes(bounce[:filled], transfer.buffer[split:data_end])
        bounce[filled:] = ZERO_BLOCK[: end - data_end]
        parts.append(bounce)
    write_fully(fd, parts, offset)


def read_piece(
    fd: int,
    transfer: Transfer,
    piece: tuple[int, int],
    direct: bool,
    scratch: Scratch,
    with_header: bool,
) -> tuple[tuple[bytes, int] | None, bool]:
    """Read one piece of a value into its destination (and the header block first, when
    asked): the (key, value length) the header names (``None`` when not asked or not a
    valid header) and whether the piece was complete (``False``: the file ended first)."""
    start, end = piece
    parts: list[memoryview] = []
    offset = HEADER_SIZE + start
    if with_header:
        scratch.header[:] = ZERO_BLOCK
        parts.append(scratch.header)
        offset = 0
    read_end = end if direct else min(end, transfer.length)
    split = min(max(transfer.direct_limit, start), read_end)
    if split > start:
        parts.append(transfer.buffer[start:split])
    bounce = scratch.block[: read_end - split]
    if len(bounce):
        parts.append(bounce)
    complete = True
    try:
        read_fully(fd, parts, offset)
    except ShortReadError:
        complete = False
    data_end = min(end, transfer.length)
    if complete and data_end > split:
        copy_bytes(transfer.buffer[split:data_end], bounce[: data_end - split])
    header = None
    if with_header:
        try:
            header = decode_header(scratch.header)
        except HeaderError:
            header = None
    return header, complete


def write_fully(fd: int, parts: Sequence[Buffer], offset: int) -> None:
    """Write ``parts`` back to back at ``offset``, retrying short writes."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        written = os.pwritev(fd, views, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        offset += written
        views = _advance(views, written)


def read_fully(fd: int, parts: Sequence[memoryview], offset: int) -> None:
    """Fill ``parts`` back to back from ``offset``; ShortReadError if the file ends first."""
    views = list(parts)
    while views:
        got = os.preadv(fd, views, offset)
        if got == 0:
            raise ShortReadError(f"file ends at {offset}")
        offset += got
        views = _advance(views, got)


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    while views and done >= len(views[0]):
        done -= len(views[0])
        views = views[1:]
    if views and done:
        views[0] = views[0][done:]
    return [view for view in views if len(view)]


def probe_direct_io(directory: str) -> str | None:
    """``None`` when O_DIRECT works in ``directory``, else why not (for people).

    Opens, writes and reads back one aligned block: some filesystems refuse
    O_DIRECT at open (EINVAL), others only at the first transfer.
    """
    if not O_DIRECT:
        return "O_DIRECT is not available on this platform"
    path = os.path.join(directory, ".direct-io-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_DIRECT | O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return "O_DIRECT refused by the filesystem"
        raise
    try:
        block = aligned_buffer(ALIGN)
        block[:] = ZERO_BLOCK
        write_fully(fd, [block], 0)
        read_fully(fd, [block], 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return "O_DIRECT refused by the filesystem"
        raise
    finally:
        os.close(fd)
        os.unlink(path)
    return None
