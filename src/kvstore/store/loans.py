"""Chunks lent straight out of a tier's memory: read with no copy, released by the reader."""

from __future__ import annotations

import contextlib
from types import TracebackType

import torch

from kvstore.results import ChunkTiers


class ChunkLoan:
    """KV chunks that are views of a tier's own memory (``borrow_chunks``).

    ``chunks[i]`` is chunk ``i``'s ``[layers, planes, chunk_tokens, heads, dim]``
    KV, read-only, valid until ``release`` (or the end of an ``async with``);
    until then the tier keeps the chunks (it neither evicts nor reuses their
    memory). ``tiers`` names the tier of each, as ``retrieve_chunks`` does.
    """

    def __init__(
        self, chunks: list[torch.Tensor], tiers: ChunkTiers, loan: contextlib.AsyncExitStack
    ) -> None:
        self.chunks = chunks
        self.tiers = tiers
        self._loan = loan

    async def release(self) -> None:
        """End the loan: the chunks' tensors must no longer be read."""
        self.chunks = []
        await self._loan.aclose()

    async def __aenter__(self) -> ChunkLoan:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.release()
