"""The node tier's yardstick for ``kvstore bench``: a raw shared-memory copy between two processes.

``RawClientBaseline(url, values)`` makes a memfd as large as the values, has a
second process map it (the service's part: it owns the memory and answers),
and moves the values the bare way: ``write`` copies every value into the
shared mapping, then one round trip to the other process (the commit);
``read`` is one round trip (the request), then a copy of every value out of
the mapping into preallocated buffers. That is the least any shared-memory
transport between two processes does, so the difference to the driver is
what kvstore adds: its messages, room, loans, chunk headers and digests.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

import numpy as np

_PEER = """
import mmap, os, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
while sys.stdin.buffer.read(1):
    sys.stdout.buffer.write(b"k")
    sys.stdout.buffer.flush()
"""


class RawClientBaseline:
    """Copies into and out of a memfd another process maps, one round trip per batch."""

    def __init__(self, url: str, values: list[tuple[bytes, memoryview]]) -> None:
        self._values = [np.frombuffer(value, dtype=np.uint8) for _, value in values]
        sizes = [len(value) for value in self._values]
        self._offsets = [sum(sizes[:index]) for index in range(len(sizes))]
        total = max(1, sum(sizes))
        self._fd = os.memfd_create("kvstore-bench-baseline", 0)
        os.ftruncate(self._fd, total)
        self._mapping = mmap.mmap(self._fd, total, flags=mmap.MAP_SHARED)
        self._arena = np.frombuffer(self._mapping, dtype=np.uint8)
        self._arena[:] = 0  # fault every page in, as the service's arena is
        self._buffers = [np.zeros(size, dtype=np.uint8) for size in sizes]
        self._peer = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(self._fd), str(total)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self._fd,),
        )
        self.description = (
            "memcpy into/out of a memfd a second process maps, one pipe round trip a batch"
        )

    def _round_trip(self) -> None:
        assert self._peer.stdin is not None and self._peer.stdout is not None
        self._peer.stdin.write(b"x")
        self._peer.stdin.flush()
        if self._peer.stdout.read(1) != b"k":
            raise RuntimeError("the baseline's second process went away")

    def write(self) -> float:
        start = time.perf_counter()
        for offset, value in zip(self._offsets, self._values):
            np.copyto(self._arena[offset : offset + len(value)], value)
        self._round_trip()
        return time.perf_counter() - start

    def read(self) -> float:
        start = time.perf_counter()
        self._round_trip()
        for offset, buffer in zip(self._offsets, self._buffers):
            np.copyto(buffer, self._arena[offset : offset + len(buffer)])
        return time.perf_counter() - start

    def buffers_match(self) -> bool:
        """Whether the last ``read`` brought back exactly the values written."""
        return all(np.array_equal(b, v) for b, v in zip(self._buffers, self._values))

    def reset(self) -> None:
        """Nothing to delete: the next write overwrites the same memory."""

    def close(self) -> None:
        if self._peer.stdin is not None:
            self._peer.stdin.close()
        self._peer.wait(timeout=10)
        if self._peer.stdout is not None:
            self._peer.stdout.close()
        self._arena = np.empty(0, dtype=np.uint8)
        self._mapping.close()
        os.close(self._fd)
