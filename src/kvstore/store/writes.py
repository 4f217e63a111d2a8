"""The write pipeline: store, write-through queues and background writers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

import torch

from kvstore.buffers import byte_view
from kvstore.chunk import encode_chunk
from kvstore.errors import (
    CapacityError,
    InvalidArgumentError,
    KVStoreError,
)
from kvstore.keys import (
    TokenIds,
    chunk_key_of,
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

WRITE_LOAN_SHARE = 0.25
"""The most of a tier's room that chunks lent to the writes below it may hold."""

WRITES_IN_FLIGHT = 3
"""Batch writes ``store`` keeps under way on the first tier at most: enough that
a driver ending each batch with syncs (nvme: fsync, rename, directory fsync)
has the next batches' bytes queued meanwhile, so its device queue never drains."""


class BatchWrites:
    """The batch writes of one ``store`` under way on the first tier, at most
    ``depth`` at once; ``written`` sums the chunks of those that have ended.
    Each write releases its chunks when it ends, however it ends."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.written = 0
        self._under_way: deque[asyncio.Task[int]] = deque()

    async def start(self, write: Coroutine[Any, Any, int], chunks: list[EncodedChunk]) -> None:
        """Start ``write`` of ``chunks`` once fewer than ``depth`` are under way
        (waiting for the oldest to end first)."""
        try:
            while len(self._under_way) >= self.depth:
                oldest = self._under_way[0]
                try:
                    self.written += await oldest
                finally:
                    if oldest.done():
                        self._under_way.popleft()
        except BaseException:
            write.close()
            _release(chunks)
            raise
        task = asyncio.ensure_future(write)
        task.add_done_callback(lambda _: _release(chunks))
        self._under_way.append(task)

    async def finish(self) -> None:
        """Wait until every write under way has ended; then raise the first failure."""
        outcomes = await asyncio.gather(*self._under_way, return_exceptions=True)
        self._under_way.clear()
        self.written += sum(outcome for outcome in outcomes if isinstance(outcome, int))
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            raise failure

    async def cancel(self) -> None:
        """Cancel every write under way and wait until each has ended (the tier
        still counts what a cancelled put stored: ``Tier.call``)."""
        for task in self._under_way:
            task.cancel()
        await asyncio.gather(*self._under_way, return_exceptions=True)
        self._under_way.clear()


def _release(chunks: list[EncodedChunk]) -> None:
    for chunk in chunks:
        chunk.release()


def _encoded(outcomes: list[EncodedChunk | BaseException]) -> list[EncodedChunk]:
    """The chunks of a batch's encode; if one failed, the others are released
    and the first failure is raised."""
    chunks = [outcome for outcome in outcomes if isinstance(outcome, EncodedChunk)]
    failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if failure is not None:
        _release(chunks)
        raise failure
    return chunks


async def _discard(pending: asyncio.Future[list[EncodedChunk | BaseException]]) -> None:
    """Wait for an encode no longer wanted to end (its threads cannot be
    stopped), then release what it encoded."""
    await asyncio.wait([pending])
    if not pending.cancelled() and pending.exception() is None:
        _release([o for o in pending.result() if isinstance(o, EncodedChunk)])


class WritePipeline(Placement):
    """store, store_chunks and the queues to lower tiers."""

    @timed("store")
    async def store(self, tokens: TokenIds, kv: torch.Tensor) -> StoreResult:
        """Cache the KV of every whole chunk of ``tokens`` not cached yet.

        ``kv`` is ``[layers, 2, n, kv_heads, head_dim]`` with ``n >= len(tokens)``
        rounded down to whole chunks, on any device; it is copied, never kept
        (device KV crosses to the host once, see ``_encode``).
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
        return await self._store_chunks(keys, list(chunks))

    async def _store_chunks(self, keys: list[bytes], chunks: list[torch.Tensor]) -> StoreResult:
        """Encode the chunks the first tier lacks, write them there and queue them below.

        Batches are written while the next is encoded, with up to
        ``_writes_in_flight()`` writes under way at once, so a driver that ends
        each batch with a sync (nvme) keeps its queue full meanwhile."""
        first = self.tiers[0]
        fresh = []
        for i, key in enumerate(keys):
            if key in first.index:
                first.index.touch(key)
            else:
                fresh.append(i)
        lending = first.lends_room and not first.codecs and first.down is None
        # Room lent in this process's memory needs no I/O batches, and each batch
        # waits for its slowest copy before the next starts (see ``_batches``):
        # one batch, unless the chunks also go down to tiers that take batches.
        per_batch = (
            max(1, len(fresh))
            if lending and not self._writes_through(first)
            else self._chunks_per_batch()
        )
        batches = [fresh[start : start + per_batch] for start in range(0, len(fresh), per_batch)]

        def encode(batch: list[int]) -> asyncio.Future[list[EncodedChunk | BaseException]]:
            items = [(keys[i], chunks[i]) for i in batch]
            return asyncio.ensure_future(self._encode_each(items, first.codecs))

        writes = BatchWrites(self._writes_in_flight())
        pending = encode(batches[0]) if batches and not lending else None
        try:
            for number, batch in enumerate(batches):
                if lending:
                    items = [(keys[i], chunks[i]) for i in batch]
                    lent, rest, dropped = await self._write_lent(first, items)
                    writes.written += len(lent)
                    if self._writes_through(first):
                        below = await self._lent_chunks(first, [items[i] for i in lent])
                        try:
                            pending = encode([batch[i] for i in dropped])
                            outcomes = await asyncio.shield(pending)
                            pending = None
                            below.extend(_encoded(outcomes))
                            await self._write_through(below)
                        finally:
                            _release(below)
                    if not rest:
                        continue
                    pending = encode([batch[i] for i in rest])
                assert pending is not None
                outcomes = await asyncio.shield(pending)
                pending = None
                encoded = _encoded(outcomes)
                if number + 1 < len(batches) and not lending:
                    pending = encode(batches[number + 1])
                await writes.start(self._write_batch(first, encoded), encoded)
        except asyncio.CancelledError:
            await writes.cancel()
            raise
        finally:
            if pending is not None:
                await _discard(pending)
            await writes.finish()
        return StoreResult(
            chunks=len(keys),
            written=writes.written,
            already_cached=len(keys) - len(fresh),
            failed=len(fresh) - writes.written,
            chunk_tokens=self.chunk_tokens,
        )

    def _writes_in_flight(self) -> int:
        """How many batch writes ``store`` keeps under way on the first tier: up to
        ``WRITES_IN_FLIGHT``, and no more than ``read_ahead``, so that with the
        batch being encoded a store holds no more pooled buffers than the pool
        keeps for a retrieve."""
        return min(WRITES_IN_FLIGHT, self.config.read_ahead)

    async def _write_batch(self, tier: Tier, encoded: list[EncodedChunk]) -> int:
        """Write one encoded batch to ``tier`` and queue it below; the chunks written."""
        written = await self._write(tier, encoded)
        await self._write_through(encoded)
        return written

    async def _write_lent(
        self, tier: Tier, items: list[tuple[bytes, torch.Tensor]]
    ) -> tuple[list[int], list[int], list[int]]:
        """Encode chunks straight into room ``tier``'s driver lends (one pass over
        the KV, the digest with it where ``_hashes_on_store``) and commit them.
        Returns the positions in ``items`` written, those to write the usual
        way (no room lent, or the loan failed), and those that do not fit in
        ``tier`` (dropped and counted: they still go to the tiers below)."""
        size = self._chunk_size
        largest = tier.driver.capabilities.max_value_bytes
        footprint = tier.footprint(size)
        fitting: list[int] = []
        dropped: list[int] = []
        for i in range(len(items)):
            if (largest is None or size <= largest) and await self.reserve(tier, footprint):
                fitting.append(i)
            else:
                tier.stats.dropped_writes += 1
                dropped.append(i)
        if not fitting:
            return [], [], dropped
        start = time.perf_counter()
        try:
            async with tier.driver.lend_many([(items[i][0], size) for i in fitting]) as rooms:
                lent = [i for i, room in zip(fitting, rooms) if room is not None]
                mla, digest = self.layout.mla, self._hashes_on_store(tier)

                def encode(job: tuple[int, memoryview]) -> None:
                    i, room = job
                    out = torch.frombuffer(room, dtype=torch.uint8)
                    encode_chunk(
                        chunk_key_of(items[i][0]), items[i][1], mla=mla, out=out, digest=digest
                    )

                # The loan may end (and free its room) only once no thread writes
                # there: _run_each returns only then, cancelled or not.
                await self._run_each(
                    encode, [(i, room) for i, room in zip(fitting, rooms) if room is not None]
                )
        except KVStoreError as exc:
            tier.note_error("lend_many", exc)
            if isinstance(exc, CapacityError):
                tier.note_full()
            return [], fitting, dropped
        finally:
            tier.reserved -= footprint * len(fitting)
            tier.timings.observe("lend_many", time.perf_counter() - start)
        self._record_written(tier, [(items[i][0], size) for i in lent])
        done = set(lent)
        return lent, [i for i in fitting if i not in done], dropped

    async def _lent_chunks(
        self, tier: Tier, items: list[tuple[bytes, torch.Tensor]]
    ) -> list[EncodedChunk]:
        """Chunks just written into ``tier``'s lent room, as views the driver lends
        until the writes below are done with them: lower tiers get the same bytes
        with no copy. A chunk the driver does not lend back (deleted meanwhile,
        or a driver that lends no views) is encoded again from its KV."""
        chunks: list[EncodedChunk] = []
        for key, kv in items:
            chunk = await self._borrowed_chunk(tier, key, trusted=True)
            chunks.append(chunk if chunk is not None else await self._encode(key, kv, tier.codecs))
        return chunks

    async def _borrowed_chunk(
        self, tier: Tier, key: bytes, *, trusted: bool
    ) -> EncodedChunk | None:
        """The chunk ``tier`` holds under ``key``, as a view its driver lends until
        the chunk's last release; ``None`` where the driver lends none.

        A loan keeps the chunk's room taken until the writes below are done, and
        those wait in the queue behind a slow tier: past ``WRITE_LOAN_SHARE`` of
        the tier's room on loan, the chunk is copied into a pooled buffer and its
        loan ends at once, so a full tier can still evict to take new chunks."""
        loan = contextlib.AsyncExitStack()
        try:
            (view,) = await loan.enter_async_context(tier.borrow([key]))
        except KVStoreError as exc:
            tier.note_error("borrow_many", exc)
            view = None
        if view is None:
            await loan.aclose()
            return None
        room = min(tier.limit, tier.driver.capabilities.max_value_bytes or tier.limit)
        size = tier.footprint(len(view))
        if tier.write_loan_bytes + size > room * WRITE_LOAN_SHARE:
            buffer = self._pool.acquire(len(view))
            buffer[: len(view)].numpy()[:] = view
            await loan.aclose()
            copied = byte_view(buffer)[: len(view)]
            return EncodedChunk(key, copied, tier.codecs, buffer, self._pool, trusted=trusted)
        tier.write_loan_bytes += size
        loan.callback(tier.end_write_loan, size)
        return EncodedChunk(key, view, tier.codecs, None, self._pool, trusted=trusted, loan=loan)

    def _hashes_on_store(self, tier: Tier) -> bool:
        """Whether chunks written into room ``tier`` lends carry their digest from
        the start. Not on a tier that does not verify (memory only this process
        writes) and writes nothing through: the digest would be computed for
        nobody; a chunk that leaves it later (write-back, move) is hashed then."""
        return tier.verify or self._writes_through(tier)

    def _writes_through(self, tier: Tier) -> bool:
        """Whether writes to ``tier`` are queued for the tier below it."""
        return tier.position + 1 < len(self.tiers) and tier.config.write_policy == "write-through"

    async def _write_through(self, chunks: list[EncodedChunk]) -> None:
        """Queue chunks for every lower tier reached through write-through tiers."""
        for tier in self.tiers[1:]:
            if not self._writes_through(self.tiers[tier.position - 1]):
                break
            for chunk in chunks:
                await self._enqueue(tier, chunk.retain())

    async def write_through_held(self, keys: Sequence[bytes]) -> None:
        """Queue chunks the first tier already holds for the tiers below it, as its
        write-through policy says, when another process wrote them there (the
        node service's clients commit into its arena). The store's own queues
        take them, reading views the first tier lends, with no copy; a chunk it
        no longer holds is skipped."""
        first = self.tiers[0]
        if not self._writes_through(first):
            return
        chunks: list[EncodedChunk] = []
        for key in keys:
            chunk = await self._borrowed_chunk(first, key, trusted=not first.verify)
            if chunk is not None:
                chunks.append(chunk)
        try:
            await self._write_through(chunks)
        finally:
            for chunk in chunks:
                chunk.release()

    async def _enqueue(self, tier: Tier, chunk: EncodedChunk, *, wait: bool = True) -> None:
        """Queue ``chunk`` for ``tier`` within the write budget. ``wait=False`` (a
        promotion) never waits for room in the budget: it is dropped instead."""
        cost = len(chunk.view)
        wait = wait and self.config.on_queue_full == "block"
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
