"""The read pipeline: retrieve with read-ahead, verification, recovery and promotion."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from kvstore.buffers import BufferPool, byte_view
from kvstore.chunk import chunk_view, decode_chunk
from kvstore.errors import (
    DriverUnavailableError,
    IntegrityError,
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
    ChunkTiers,
    RetrieveResult,
)
from kvstore.store.encoded import EncodedChunk
from kvstore.store.loans import ChunkLoan
from kvstore.store.writes import WritePipeline
from kvstore.tier import Tier

log = logging.getLogger("kvstore.store")


class BatchReads:
    """Where the values read for one batch live: pooled buffers and borrowed
    views, released together once the batch is decoded. ``failed``: the read
    call failed, so its misses say nothing of what the tier holds."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self.buffers: list[torch.Tensor] = []
        self.loans = contextlib.AsyncExitStack()
        self.failed = False
        self._read_into: dict[bytes, torch.Tensor] = {}

    def hold(self, keys: list[bytes], buffers: list[torch.Tensor]) -> None:
        """Own the pooled ``buffers`` the values of ``keys`` were read into."""
        self.buffers.extend(buffers)
        self._read_into.update(zip(keys, buffers))

    def take(self, key: bytes, value: memoryview) -> torch.Tensor | None:
        """The pooled buffer holding ``value`` (read for ``key``), handed over to the
        caller, who releases it to the pool; ``None`` when ``value`` is elsewhere
        (a borrowed view, or a value that did not fit its buffer)."""
        buffer = self._read_into.get(key)
        if buffer is None or np.frombuffer(value, dtype=np.uint8).ctypes.data != buffer.data_ptr():
            return None
        del self._read_into[key]
        self.buffers = [held for held in self.buffers if held is not buffer]
        return buffer

    async def release(self) -> None:
        await self.loans.aclose()
        for buffer in self.buffers:
            self._pool.release(buffer)
        self.buffers.clear()


class _PrefixEnds(Exception):
    """Raised inside retrieve when a chunk cannot be loaded from any tier."""


class ReadPipeline(WritePipeline):
    """retrieve, retrieve_chunks and borrow_chunks."""

    @timed("retrieve")
    async def retrieve(self, tokens: TokenIds, out: torch.Tensor | None = None) -> RetrieveResult:
        """Load the KV of the longest cached prefix of ``tokens``.

        ``out``, if given, is a ``[layers, 2, >= n, heads, dim]`` tensor of the
        store's dtype to load into; the result's ``kv`` is then a view of it.
        """
        self._check_open()
        keys = self.keys(tokens)
        located = self._locate_to_read(keys)
        if not located:
            self.metrics.count_prefix("retrieve", len(keys) * self.chunk_tokens, 0)
            self._counters.note_retrieve(0)
            return RetrieveResult(0, None, ())
        ct = self.chunk_tokens
        if out is None:
            out = torch.empty(self.layout.shape(len(located) * ct), dtype=self.layout.torch_dtype)
        elif out.dim() != 5 or out.shape[TOKEN_DIM] < len(located) * ct:
            raise InvalidArgumentError(f"out has shape {tuple(out.shape)}, too small")
        else:
            self.layout.check(out)
        sources = await self._load(
            keys, located, [out[:, :, i * ct : (i + 1) * ct] for i in range(len(located))]
        )
        loaded = len(sources) * ct
        self.metrics.count_prefix("retrieve", len(keys) * ct, loaded)
        self._counters.note_retrieve(loaded)
        return RetrieveResult(loaded, out[:, :, :loaded] if loaded else None, tuple(sources))

    async def _load(
        self, keys: list[bytes], located: list[int], outs: list[torch.Tensor]
    ) -> list[str]:
        """Load the chunks ``located`` found into ``outs``, fastest tier first, with
        ``read_ahead`` batches in flight; the tier of each chunk loaded, up to the
        first that no tier could give back verified."""
        sources: list[str] = []
        batches = self._batches(located)
        fetches: list[asyncio.Task[list[memoryview | None]]] = []
        reads: list[BatchReads] = []
        try:
            for batch_no, (position, indices) in enumerate(batches):
                while len(fetches) < min(batch_no + 1 + self.config.read_ahead, len(batches)):
                    tier_at, next_indices = batches[len(fetches)]
                    reads.append(BatchReads(self._pool))
                    fetches.append(
                        asyncio.ensure_future(
                            self._fetch(
                                self.tiers[tier_at], [keys[i] for i in next_indices], reads[-1]
                            )
                        )
                    )
                values = await fetches[batch_no]
                tier = self.tiers[position]
                results = await self._decode_batch(
                    tier,
                    [keys[i] for i in indices],
                    values,
                    [outs[i] for i in indices],
                    failed=reads[batch_no].failed,
                )
                for i, value, ok in zip(indices, values, results):
                    if ok and value is not None:
                        tier.index.touch(keys[i])
                        tier.stats.hits += 1
                        tier.stats.bytes_read += len(value)
                        if position > 0:
                            await self._promote(tier, keys[i], value, outs[i], reads[batch_no])
                        sources.append(tier.name)
                    else:
                        source = await self._recover(keys[i], outs[i], position)
                        if source is None:
                            raise _PrefixEnds
                        sources.append(source)
                await reads[batch_no].release()
        except _PrefixEnds:
            pass
        finally:
            for task in fetches:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*fetches, return_exceptions=True)
            for held in reads:
                await held.release()
        return sources

    @timed("retrieve_chunks")
    async def retrieve_chunks(
        self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]
    ) -> ChunkTiers:
        """Load the longest cached prefix of ``keys`` (from ``named_keys``) into ``outs``.

        ``outs[i]`` is a ``[layers, 2, chunk_tokens, kv_heads, head_dim]`` tensor
        of the store's layout, any strides (e.g. a view of an engine's host
        memory); chunk ``i`` is copied into it once verified. Returns the tier
        each loaded chunk came from. An ``out`` past the loaded prefix may have
        been partly written: treat it as garbage.
        """
        self._check_open()
        keys = self._own_keys(keys)
        if len(outs) != len(keys):
            raise InvalidArgumentError(f"{len(outs)} outs given for {len(keys)} keys")
        for out in outs:
            self.layout.check(out, self.chunk_tokens)
        located = self._locate_to_read(keys)
        sources = ChunkTiers(
            await self._load(keys, located, list(outs)) if located else (), self.chunk_tokens
        )
        self.metrics.count_prefix("retrieve_chunks", len(keys) * self.chunk_tokens, sources.tokens)
        self._counters.note_retrieve(sources.tokens)
        return sources

    @timed("borrow_chunks")
    async def borrow_chunks(self, keys: Sequence[bytes]) -> ChunkLoan:
        """The longest prefix of ``keys`` (from ``named_keys``) that the first tier
        holds and lends as views, each chunk's KV a read-only tensor of the tier's
        own memory: no copy (an engine scatters from it straight into its
        cache). Chunks are checked as a read from that tier is (header, key,
        shape, length; the digest where the tier verifies); a bad one ends the
        prefix and is deleted. The loan keeps the chunks until released (``async
        with`` or ``release``); chunks past it are for ``retrieve_chunks``. A
        first tier that lends no views, or encodes with codecs, lends nothing.
        """
        self._check_open()
        keys = self._own_keys(keys)
        first = self.tiers[0]
        loan = contextlib.AsyncExitStack()
        chunks: list[torch.Tensor] = []
        lends = first.driver.capabilities.lends_views and not first.codecs and first.down is None
        held = list(itertools.takewhile(lambda key: key in first.index, keys)) if lends else []
        if held:
            try:
                views = await loan.enter_async_context(first.borrow(held))
            except KVStoreError as exc:
                first.note_error("borrow_many", exc)
                views = []
            for key, view in zip(held, views):
                kv = await self._lent_kv(first, key, view)
                if kv is None:
                    break
                chunks.append(kv)
        tokens = len(chunks) * self.chunk_tokens
        self.metrics.count_prefix("borrow_chunks", len(keys) * self.chunk_tokens, tokens)
        self._counters.note_retrieve(tokens)
        return ChunkLoan(chunks, ChunkTiers((first.name,) * len(chunks), self.chunk_tokens), loan)

    async def _lent_kv(
        self, tier: Tier, key: bytes, view: memoryview | None
    ) -> torch.Tensor | None:
        """The checked KV of a chunk ``tier`` lent as ``view``, counted as a hit;
        ``None`` for a chunk not lent (a driver may lend only some) or a bad one
        (counted, and deleted)."""
        if view is None:
            return None
        check = functools.partial(
            chunk_view,
            view,
            key=chunk_key_of(key),
            layout=self.layout,
            tokens=self.chunk_tokens,
            verify=tier.verify,
        )
        try:
            kv = await self._run(check) if tier.verify else check()
        except IntegrityError as exc:
            tier.stats.integrity_failures += 1
            tier.note_error("decode", exc)
            with contextlib.suppress(KVStoreError):
                await tier.delete([key])
            return None
        if kv is not None:
            tier.index.touch(key)
            tier.stats.hits += 1
            tier.stats.bytes_read += len(view)
        return kv

    def _locate_to_read(self, keys: list[bytes]) -> list[int]:
        """The tier to read each chunk of the cached prefix from: the fastest whose
        index holds it, else the fastest shared tier that is up, read without
        asking first (``get_many`` answers a miss with ``None``, so asking
        ``contains_many`` would only add a round trip); the prefix ends at the
        first chunk no tier can hold."""
        shared = next((t.position for t in self.tiers if t.shared and t.down is None), None)
        located: list[int] = []
        for key in keys:
            position = next((t.position for t in self.tiers if key in t.index), shared)
            if position is None:
                break
            located.append(position)
        return located

    def _batches(self, located: list[int]) -> list[tuple[int, list[int]]]:
        """Consecutive chunks from the same tier, at most ``io_batch_bytes`` a batch,
        except from a tier that lends views of its memory: a batch there is no
        I/O call and takes no pooled buffer, and each batch waits for its slowest
        copy before the next starts (measured on the cpu tier: 0.85 of a raw copy
        in 64 MiB batches, 1.0 in one), so all its consecutive chunks are one."""
        per_batch = self._chunks_per_batch()
        limits = [
            len(located) if tier.driver.capabilities.lends_views else per_batch
            for tier in self.tiers
        ]
        batches: list[tuple[int, list[int]]] = []
        for i, position in enumerate(located):
            if batches and batches[-1][0] == position and len(batches[-1][1]) < limits[position]:
                batches[-1][1].append(i)
            else:
                batches.append((position, [i]))
        return batches

    async def _fetch(
        self, tier: Tier, keys: list[bytes], reads: BatchReads
    ) -> list[memoryview | None]:
        """Read ``keys`` from ``tier``: borrowed views where the driver lends them,
        else ``get_many`` into pooled buffers; ``None`` for misses and failures."""
        values: list[memoryview | None] = [None] * len(keys)
        if tier.driver.capabilities.lends_views:
            start = time.perf_counter()
            try:
                values = list(await reads.loans.enter_async_context(tier.borrow(keys)))
            except DriverUnavailableError as exc:
                tier.note_error("borrow_many", exc)
                return values
            except KVStoreError as exc:
                tier.note_error("borrow_many", exc)
            except Exception as exc:
                tier.note_bug("borrow_many", exc)
                return values
            finally:
                tier.timings.observe("borrow_many", time.perf_counter() - start)
        missing = [i for i, value in enumerate(values) if value is None]
        if not missing:
            return values
        buffers = [self._pool.acquire(self._chunk_size) for _ in missing]
        wanted = [keys[i] for i in missing]

        def settled(_succeeded: bool, late: bool) -> None:
            """The driver is done with the buffers: the batch's reads own them, or,
            after an abandoned call, nobody does any more."""
            if late:
                for buffer in buffers:
                    self._pool.release(buffer)
            else:
                reads.hold(wanted, buffers)

        try:
            found = await tier.call(
                "get_many",
                tier.driver.get_many(wanted, into=[byte_view(b) for b in buffers]),
                reading=wanted,
                settled=settled,
            )
        except KVStoreError:
            reads.failed = True
            return values
        for i, value in zip(missing, found):
            values[i] = value
        return values

    async def _decode_into(
        self, tier: Tier, key: bytes, value: memoryview | None, out: torch.Tensor
    ) -> bool:
        """``_decode_batch`` of one chunk."""
        (ok,) = await self._decode_batch(tier, [key], [value], [out], failed=False)
        return ok

    async def _decode_batch(
        self,
        tier: Tier,
        keys: list[bytes],
        values: Sequence[memoryview | None],
        outs: list[torch.Tensor],
        *,
        failed: bool,
    ) -> list[bool]:
        """Verify and copy each chunk of a batch into its ``out`` (on a few codec
        threads, see ``_run_each``); whether each arrived. A bad copy is dropped
        from its tier. A miss (``None``) drops the chunk from the tier's index
        unless the read ``failed`` (timed out, tier unreachable): then the chunk
        is most likely still there."""
        decode = functools.partial(
            decode_chunk,
            layout=self.layout,
            tokens=self.chunk_tokens,
            verify=tier.verify,
            keys=self._keys,
        )

        def check(n: int) -> IntegrityError | None:
            value = values[n]
            assert value is not None
            try:
                decode(value, key=chunk_key_of(keys[n]), out=outs[n])
            except IntegrityError as exc:
                return exc
            return None

        present = [n for n, value in enumerate(values) if value is not None]
        errors = dict(zip(present, await self._run_each(check, present)))
        arrived: list[bool] = []
        for n, key in enumerate(keys):
            if n not in errors:
                tier.stats.misses += 1
                if not failed:
                    tier.forget(key)
            elif (error := errors[n]) is not None:
                tier.stats.integrity_failures += 1
                tier.note_error("decode", error)
                try:
                    await tier.delete([key])
                except KVStoreError:
                    log.warning("tier %s: a corrupt chunk could not be deleted", tier.name)
            arrived.append(n in errors and errors[n] is None)
        return arrived

    async def _recover(self, key: bytes, out: torch.Tensor, failed: int) -> str | None:
        """Try every other tier for a chunk whose first copy failed; the tier's name.
        A shared tier is read without asking first: a miss is ``None`` already."""
        for tier in self.tiers:
            if tier.position == failed:
                continue
            if not tier.shared and key not in tier.index:
                continue
            reads = BatchReads(self._pool)
            try:
                (value,) = await self._fetch(tier, [key], reads)
                if value is None:
                    tier.stats.misses += 1
                elif await self._decode_into(tier, key, value, out):
                    tier.stats.hits += 1
                    tier.stats.bytes_read += len(value)
                    if tier.position > 0:
                        await self._promote(tier, key, value, out, reads)
                    return tier.name
            finally:
                await reads.release()
        return None

    async def _promote(
        self, tier: Tier, key: bytes, value: memoryview, kv: torch.Tensor, reads: BatchReads
    ) -> None:
        """Queue a chunk found in ``tier`` (below the first), verified and decoded
        into ``kv``, for the first tier. With the same codec stack the pooled
        buffer it was read into is handed over (copied only when it was lent);
        else it is encoded from ``kv``, so it is never decoded twice. A promotion
        never waits for the write budget: it is dropped when that is spent."""
        first = self.tiers[0]
        if key in first.index:
            return
        if first.codec_spec != tier.codec_spec:
            await self._enqueue(first, await self._encode(key, kv, first.codecs), wait=False)
            return
        buffer = reads.take(key, value)
        if buffer is None:
            buffer = self._pool.acquire(len(value))
            buffer[: len(value)].numpy()[:] = value
        chunk = EncodedChunk(key, byte_view(buffer)[: len(value)], tier.codecs, buffer, self._pool)
        await self._enqueue(first, chunk, wait=False)
