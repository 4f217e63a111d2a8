"""A chunk's encoded bytes, shared by the writes still using them."""

from __future__ import annotations

import asyncio
import contextlib

import torch

from kvstore.buffers import BufferPool
from kvstore.codecs import Codec

_closing: set[asyncio.Task[None]] = set()
"""Loans being ended by a last release, kept referenced until they have ended."""


class EncodedChunk:
    """A chunk's encoded bytes, shared by the writes still using them.

    The bytes live in a pooled ``buffer`` (returned to the pool by the last
    release), in memory of their own, or in a tier's memory lent for as long as
    ``loan`` is open (ended by the last release). ``trusted``: this process
    encoded or verified the bytes, so recoding them for another tier need not
    check their digest again.
    """

    def __init__(
        self,
        key: bytes,
        view: memoryview,
        codecs: tuple[Codec, ...],
        buffer: torch.Tensor | None,
        pool: BufferPool,
        *,
        trusted: bool = True,
        loan: contextlib.AsyncExitStack | None = None,
    ) -> None:
        self.key = key
        self.view = view
        self.codecs = codecs
        self.trusted = trusted
        self._buffer = buffer
        self._pool = pool
        self._loan = loan
        self._users = 1

    def retain(self) -> EncodedChunk:
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users:
            return
        if self._buffer is not None:
            self._pool.release(self._buffer)
            self._buffer = None
        if self._loan is not None:
            ending = asyncio.get_running_loop().create_task(self._loan.aclose())
            _closing.add(ending)
            ending.add_done_callback(_closing.discard)
            self._loan = None
