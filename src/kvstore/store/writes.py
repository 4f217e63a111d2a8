"""The write pipeline: store, write-through queues and background writers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from kvstore.errors import (
    InvalidArgumentError,
    KVStoreError,
)
from kvstore.keys import (
    TokenIds,
)
from kvstore.layout import TOKEN_DIM
from kvstore.metrics import timed
from kvstore.results import (
    StoreResult,
)
from kvstore.store.encoded import EncodedChunk
from kvstore.store.placement import Placement
from kvstore.store.queue import WriteJob
from kvstore.tier import Tier


class WritePipeline(Placement):
    """store, store_chunks and the queues to lower tiers."""

    @timed("store")
    async def store(self, tokens: TokenIds, kv: torch.Tensor) -> StoreResult:
        """Cache the KV of every whole chunk of ``tokens`` not cached yet.

        ``kv`` is ``[layers, 2, n, kv_heads, head_dim]`` with ``n >= len(tokens)``
        rounded down to whole chunks; it is copied, never kept.
        """
        self._check_open()
        keys = self.keys(tokens)
        needed = len(keys) * self.chunk_tokens
        if kv.dim() != 5 or kv.shape[TOKEN_DIM] < needed:
            raise InvalidArgumentError(
                f"kv must be [layers, {self.layout.kv_planes}, tokens, heads, dim] with at least "
                f"{needed} tokens, got {tuple(kv.shape)}"
            )
        self.layout.check(kv[:, :, :needed], needed)
        if kv.device.type != "cpu":
            kv = kv[:, :, :needed].cpu()
        ct = self.chunk_tokens
        return await self._store_chunks(
            keys, [kv[:, :, i * ct : (i + 1) * ct] for i in range(len(keys))]
        )

    @timed("store_chunks")
    async def store_chunks(
        self, keys: Sequence[bytes], chunks: Sequence[torch.Tensor]
    ) -> StoreResult:
        """Cache chunks under keys from ``named_keys``, skipping those already cached.

        ``chunks[i]`` is one chunk of KV, ``[layers, 2, chunk_tokens, kv_heads,
        head_dim]`` in the store's layout, any strides, on any device (e.g. a
        view of an engine's host memory); it is copied, never kept.
        """
        self._check_open()
        keys = self._own_keys(keys)
        if len(chunks) != len(keys):
            raise InvalidArgumentError(f"{len(chunks)} chunks given for {len(keys)} keys")
        for chunk in chunks:
            self.layout.check(chunk, self.chunk_tokens)
        return await self._store_chunks(
            keys, [chunk if chunk.device.type == "cpu" else chunk.cpu() for chunk in chunks]
        )

    async def _store_chunks(self, keys: list[bytes], chunks: list[torch.Tensor]) -> StoreResult:
        """Encode the chunks the first tier lacks, write them there and queue them below."""
        first = self.tiers[0]
        fresh = []
        for i, key in enumerate(keys):
            if key in first.index:
                first.index.touch(key)
            else:
                fresh.append(i)
        per_batch = self._chunks_per_batch()
        batches = [fresh[start : start + per_batch] for start in range(0, len(fresh), per_batch)]

        def encode(batch: list[int]) -> asyncio.Future[list[EncodedChunk]]:
            return asyncio.gather(*(self._encode(keys[i], chunks[i], first.codecs) for i in batch))

        written = 0
        pending = encode(batches[0]) if batches else None
        for number in range(len(batches)):
            assert pending is not None
            encoded = list(await pending)
            pending = encode(batches[number + 1]) if number + 1 < len(batches) else None
            try:
                written += await self._write(first, encoded)
                await self._write_through(encoded)
            finally:
                for chunk in encoded:
                    chunk.release()
        return StoreResult(
            chunks=len(keys),
            written=written,
            already_cached=len(keys) - len(fresh),
            failed=len(fresh) - written,
            chunk_tokens=self.chunk_tokens,
        )

    async def _write_through(self, chunks: list[EncodedChunk]) -> None:
        """Queue chunks for every lower tier reached through write-through tiers."""
        for tier in self.tiers[1:]:
            if self.tiers[tier.position - 1].config.write_policy != "write-through":
                break
            for chunk in chunks:
                await self._enqueue(tier, chunk.retain())

    async def _enqueue(self, tier: Tier, chunk: EncodedChunk) -> None:
        cost = len(chunk.view)
        wait = self.config.on_queue_full == "block"
        if tier.down is None and await self._budget.acquire(cost, wait=wait):
            self._queues[tier.position].put_nowait(WriteJob(chunk, cost))
        else:
            tier.stats.dropped_writes += 1
            chunk.release()

    async def _writer(self, tier: Tier, queue: asyncio.Queue[WriteJob]) -> None:
        """Drain background writes to ``tier`` in batches."""
        while True:
            jobs = [await queue.get()]
            size = jobs[0].cost
            while not queue.empty() and size < self.config.io_batch_bytes:
                jobs.append(queue.get_nowait())
                size += jobs[-1].cost
            try:
                absent = set(await self._absent(tier, [job.chunk.key for job in jobs]))
                wanted = [job.chunk for job in jobs if job.chunk.key in absent]
                recoded = [await self._recode(chunk, tier.codecs) for chunk in wanted]
                await self._write(tier, recoded)
                for chunk in recoded:
                    chunk.release()
            except KVStoreError as exc:
                tier.note_error("background write", exc)
            except Exception as exc:
                tier.note_bug("background write", exc)
            finally:
                for job in jobs:
                    job.chunk.release()
                    queue.task_done()
                await self._budget.release(size)

    async def flush(self) -> None:
        """Wait until every queued background write has finished."""
        for queue in self._queues:
            await queue.join()
        await self._budget.drained()
