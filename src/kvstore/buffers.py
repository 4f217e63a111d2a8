"""A pool of reusable, page-aligned host buffers for chunk I/O.

Fresh large allocations are slow on the hot path: the kernel faults in every
page on first touch, which costs more than copying the bytes. The store
therefore encodes into and reads into pooled buffers and hands them back when
the bytes have reached every tier. Buffers are 4 KiB aligned and sized in
4 KiB multiples, so O_DIRECT drivers can read straight into them; where CUDA
is available they are pinned, so host-to-device copies run at full speed.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import torch

ALIGN = 4096


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor's memory (no copy)."""
    array: Any = tensor.view(torch.uint8).reshape(-1).numpy()
    return memoryview(array)


def _round_up(nbytes: int) -> int:
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


class BufferPool:
    """Hands out uint8 tensors of at least the asked size and takes them back.

    ``max_bytes`` bounds what the pool keeps while buffers are idle; buffers in
    use are the caller's to bound.
    """

    def __init__(self, max_bytes: int = 1 << 30, *, pin: bool | None = None) -> None:
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A 4 KiB-aligned uint8 tensor of exactly ``round_up(nbytes)`` bytes."""
        size = _round_up(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                self._idle_bytes -= size
                return free.pop()
        raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=self.pin)
        offset = (-raw.data_ptr()) % ALIGN
        return raw[offset : offset + size]

    def release(self, buffer: torch.Tensor) -> None:
        """Return a buffer from ``acquire``; it is dropped if the pool is full."""
        size = buffer.numel()
        with self._lock:
            if self._idle_bytes + size <= self.max_bytes:
                self._free[size].append(buffer)
                self._idle_bytes += size

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes
