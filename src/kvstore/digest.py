"""The chunk payload digest, computed over blocks on several threads, fused with copies.

A chunk's digest (docs/chunk-format.md) is the xxh3-128 of the xxh3-128
digests of its payload's ``DIGEST_BLOCK``-byte blocks, in order. Blocks are
independent, so the digest of a big payload is computed on several threads
(xxhash and numpy copies release the GIL); and a block is hashed while it is
in cache from being copied, so a copy and its digest cost one pass over
memory, not two.

A payload is one contiguous byte array; the other side of a copy is a list of
``pieces``, contiguous byte arrays whose concatenation is the payload (the
per-layer, per-plane slabs of a strided KV tensor).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import xxhash
from typing_extensions import Buffer

DIGEST_BLOCK = 1 << 20
"""Bytes of payload per digest block; part of the chunk format."""

MIN_SHARE_BYTES = 4 << 20
"""The least one thread is given: smaller payloads are hashed on the calling thread."""

MAX_THREADS = 8

SEGMENT_BYTES = 512 << 10
"""Bytes copied and hashed in one step: the copy's source and destination fit in
a core's L2 cache together, so the hash reads what the copy just touched
(hashing each 1 MiB block after copying all of it read half of it back from
L3 or memory: 0.60 of a raw copy against 0.80 on llama3-8b chunks)."""

MIN_PIECE_BYTES = 256 << 10
"""Tensors cut into smaller contiguous pieces are not copied piece by piece: the
Python work and GIL hand-offs of many small copies cost more than the second
pass of copying the tensor in one call and hashing the result (measured in
docs/benchmarks.md: 3 MiB chunks of 64 KiB slabs ran at 0.16 of a raw copy
fused and 0.59 in two passes; 256 KiB slabs at 0.75 fused)."""

ByteArray = npt.NDArray[np.uint8]
Direction = Literal["into_payload", "from_payload", "none"]


THREADS = max(1, min(MAX_THREADS, os.cpu_count() or 1))
"""Threads a big copy or digest is spread over, the calling one included."""

_parts = threading.local()


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="kvstore-digest")


@contextlib.contextmanager
def side_by_side(count: int) -> Iterator[None]:
    """Copies and digests on this thread are one of ``count`` parts of some work
    run at once: each spreads over ``THREADS // count`` threads, not all.

    Splitting each part again only queued the halves of two chunks on the
    same threads: fused copies of llama3-8b chunks on 2 cores ran at 0.68-0.70
    of a raw copy that way and at 0.77-0.78 a chunk per thread."""
    previous = getattr(_parts, "count", 1)
    _parts.count = max(1, count)
    try:
        yield
    finally:
        _parts.count = previous


def payload_digest(payload: Buffer | ByteArray) -> bytes:
    """The payload digest of ``payload``, on several threads when it is big."""
    return copy_with_digest(_as_array(payload), [], "none")


def tensor_pieces(tensor: torch.Tensor) -> list[ByteArray] | None:
    """``tensor``'s bytes as contiguous pieces in row-major order (no copy), or
    ``None`` when they are not on the CPU or are cut into pieces too small to
    copy one by one."""
    if tensor.device.type != "cpu":
        return None
    if tensor.is_contiguous():
        return [_tensor_bytes(tensor)] if tensor.numel() else []
    leading = 1
    while leading < tensor.dim() and not tensor[(0,) * leading].is_contiguous():
        leading += 1
    if leading == tensor.dim():
        return None
    if tensor[(0,) * leading].numel() * tensor.element_size() < MIN_PIECE_BYTES:
        return None
    # Indexing a numpy view costs a tenth of indexing the tensor: on a 32 MiB
    # chunk of 64 slabs, torch indexing took 0.4 ms, a sixth of the copy itself.
    array = tensor.view(torch.uint8).numpy()
    indices = itertools.product(*(range(size) for size in tensor.shape[:leading]))
    return [array[index].reshape(-1) for index in indices]


def copy_with_digest(
    payload: ByteArray,
    pieces: Sequence[ByteArray],
    direction: Direction,
    *,
    threads: int | None = None,
    digest: bool = True,
) -> bytes:
    """Copy between ``payload`` and ``pieces`` (``into_payload``, ``from_payload``,
    or ``none``: hash only) and return ``payload``'s digest (``b""`` with
    ``digest=False``), a block at a time on up to ``threads`` threads (by
    default ``THREADS``, shared with the parts run ``side_by_side``)."""
    size = len(payload)
    if direction != "none" and sum(len(piece) for piece in pieces) != size:
        raise ValueError("the pieces and the payload differ in length")
    blocks = max(1, -(-size // DIGEST_BLOCK))
    threads = threads or THREADS // getattr(_parts, "count", 1)
    shares = max(1, min(threads, size // MIN_SHARE_BYTES, blocks))
    starts = _offsets(pieces) if direction != "none" else []
    per_share = -(-blocks // shares)
    work = [(first, min(blocks, first + per_share)) for first in range(0, blocks, per_share)]

    def run(first: int, end: int) -> list[bytes]:
        return _blocks(payload, pieces, starts, direction, first, end, digest)

    if len(work) == 1:
        digests = run(*work[0])
    else:
        futures = [_pool().submit(run, *share) for share in work]
        concurrent.futures.wait(futures)
        digests = []
        for future in futures:
            digests.extend(future.result())
    return xxhash.xxh3_128_digest(b"".join(digests)) if digest else b""


def _blocks(
    payload: ByteArray,
    pieces: Sequence[ByteArray],
    starts: list[int],
    direction: Direction,
    first: int,
    end: int,
    digest: bool,
) -> list[bytes]:
    digests: list[bytes] = []
    piece = max(0, _piece_at(starts, first * DIGEST_BLOCK)) if pieces else 0
    for index in range(first, end):
        low = index * DIGEST_BLOCK
        high = min(len(payload), low + DIGEST_BLOCK)
        if direction == "none" or not pieces:
            if digest:
                digests.append(xxhash.xxh3_128_digest(payload[low:high].data))
            continue
        hasher = xxhash.xxh3_128() if digest else None
        while piece < len(pieces) and starts[piece] < high:
            begin = max(low, starts[piece])
            stop = min(high, starts[piece] + len(pieces[piece]))
            for segment in range(begin, stop, SEGMENT_BYTES):
                _copy_segment(
                    payload,
                    pieces[piece],
                    starts[piece],
                    segment,
                    min(stop, segment + SEGMENT_BYTES),
                    direction,
                    hasher,
                )
            if stop < starts[piece] + len(pieces[piece]):
                break
            piece += 1
        if hasher is not None:
            digests.append(hasher.digest())
    return digests


def _copy_segment(
    payload: ByteArray,
    piece: ByteArray,
    piece_start: int,
    begin: int,
    stop: int,
    direction: Direction,
    hasher: xxhash.xxh3_128 | None,
) -> None:
    """Copy payload bytes ``begin:stop`` to or from ``piece`` and hash them while
    they are in cache: before copying them out, or after copying them in."""
    here = payload[begin:stop]
    there = piece[begin - piece_start : stop - piece_start]
    if direction == "into_payload":
        np.copyto(here, there)
        if hasher is not None:
            hasher.update(here.data)
    else:
        if hasher is not None:
            hasher.update(here.data)
        np.copyto(there, here)


def _offsets(pieces: Sequence[ByteArray]) -> list[int]:
    offsets: list[int] = []
    position = 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    return offsets


def _piece_at(starts: list[int], offset: int) -> int:
    """The index of the piece holding byte ``offset`` of the payload."""
    return int(np.searchsorted(np.asarray(starts), offset, side="right")) - 1


def _tensor_bytes(tensor: torch.Tensor) -> ByteArray:
    array: ByteArray = tensor.reshape(-1).view(torch.uint8).numpy()
    return array


def _as_array(payload: Buffer | ByteArray) -> ByteArray:
    if isinstance(payload, np.ndarray):
        return payload
    array: ByteArray = np.frombuffer(memoryview(payload), dtype=np.uint8)
    return array
