"""A chunk's encoded bytes, shared by the writes still using them."""

from __future__ import annotations

import torch

from kvstore.buffers import BufferPool
from kvstore.codecs import Codec


class EncodedChunk:
    """A chunk's encoded bytes, shared by the writes still using them."""

    def __init__(
        self,
        key: bytes,
        view: memoryview,
        codecs: tuple[Codec, ...],
        buffer: torch.Tensor | None,
        pool: BufferPool,
    ) -> None:
        self.key = key
        self.view = view
        self.codecs = codecs
        self._buffer = buffer
        self._pool = pool
        self._users = 1

    def retain(self) -> EncodedChunk:
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._buffer is not None:
            self._pool.release(self._buffer)
            self._buffer = None
