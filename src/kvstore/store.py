"""The hierarchical store: chunked KV in ordered tiers, fastest first.

``store`` encodes each new whole chunk once, writes it to the first tier and
queues it for the lower tiers (write-through) or hands it down when the upper
tier evicts it (write-back). ``retrieve`` finds the longest cached prefix,
loads each chunk from the fastest tier holding it, with the I/O of the next
batch overlapping the decode of this one, verifies every chunk and promotes
chunks found lower down into the first tier. A failing or lying tier is a
miss, logged and counted; the store keeps serving from the others and never
returns KV it could not verify.

All state lives on one event loop: use ``AsyncKVStore`` from async code, or
``KVStore`` (the same API, blocking) from anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kvstore.buffers import BufferPool, byte_view
from kvstore.chunk import decode_chunk, encode_chunk, raw_chunk_size
from kvstore.codecs import Codec
from kvstore.config import StoreConfig
from kvstore.driver import Driver
from kvstore.errors import (
    ConfigError,
    DriverUnavailableError,
    IntegrityError,
    InvalidArgumentError,
    KVStoreError,
    NotFoundError,
)
from kvstore.keys import Namespace, TokenIds, chunk_keys
from kvstore.layout import TOKEN_DIM
from kvstore.registry import open_driver
from kvstore.sync import LoopThread, shared_loop
from kvstore.tier import Tier, TierSnapshot

T = TypeVar("T")
log = logging.getLogger("kvstore.store")


@dataclass(frozen=True)
class LookupResult:
    """The longest cached prefix: its length in tokens and the tier of each chunk."""

    tokens: int
    chunk_tiers: tuple[str, ...]


@dataclass(frozen=True)
class RetrieveResult:
    """KV of the longest prefix that could be loaded and verified.

    ``kv`` is ``[layers, 2, tokens, kv_heads, head_dim]`` (``None`` when
    nothing was cached); ``chunk_tiers`` names where each chunk came from.
    """

    tokens: int
    kv: torch.Tensor | None
    chunk_tiers: tuple[str, ...]


@dataclass(frozen=True)
class StoreResult:
    """What ``store`` did: whole chunks seen, newly written, already cached, not stored."""

    chunks: int
    written: int
    already_cached: int
    failed: int


@dataclass(frozen=True)
class StoreStats:
    tiers: tuple[TierSnapshot, ...]
    queued_bytes: int
    pinned_chunks: int


class _Encoded:
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

    def retain(self) -> _Encoded:
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._buffer is not None:
            self._pool.release(self._buffer)
            self._buffer = None


class _Reads:
    """Where the values read for one batch live: pooled buffers and borrowed
    views, released together once the batch is decoded."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self.buffers: list[torch.Tensor] = []
        self.loans = contextlib.AsyncExitStack()

    async def release(self) -> None:
        await self.loans.aclose()
        for buffer in self.buffers:
            self._pool.release(buffer)
        self.buffers.clear()


@dataclass
class _Job:
    chunk: _Encoded
    cost: int


class _QueueBudget:
    """Bytes of background writes in flight, bounded; ``block`` waits, ``drop`` refuses."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, cost: int, *, wait: bool) -> bool:
        async with self._changed:
            while self.used and self.used + cost > self.limit:
                if not wait:
                    return False
                await self._changed.wait()
            self.used += cost
            return True

    async def release(self, cost: int) -> None:
        async with self._changed:
            self.used -= cost
            self._changed.notify_all()

    async def drained(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0)


class AsyncKVStore:
    """A hierarchical KV store; every method runs on the event loop that opened it."""

    def __init__(self, config: StoreConfig, namespace: Namespace, tiers: list[Tier]) -> None:
        if namespace.chunk_tokens != config.chunk_tokens or namespace.tenant != config.tenant:
            raise ConfigError("the namespace's chunk_tokens and tenant must match the store config")
        self.config = config
        self.namespace = namespace
        self.layout = namespace.layout
        self.chunk_tokens = namespace.chunk_tokens
        self.tiers = tiers
        self._digest = namespace.digest()
        self._chunk_size = raw_chunk_size(
            torch.empty(
                self.layout.shape(self.chunk_tokens), dtype=self.layout.torch_dtype, device="meta"
            )
        )
        self._pinned: set[bytes] = set()
        self._pool = BufferPool(
            max_bytes=config.queue_bytes + (config.read_ahead + 1) * config.io_batch_bytes
        )
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstore-codec")
        self._budget = _QueueBudget(config.queue_bytes)
        self._queues: list[asyncio.Queue[_Job]] = [asyncio.Queue() for _ in tiers]
        self._writers = [
            asyncio.create_task(self._writer(tier, queue), name=f"kvstore-writer-{tier.name}")
            for tier, queue in zip(tiers, self._queues)
        ]
        self._closed = False

    @classmethod
    async def open(
        cls,
        config: StoreConfig,
        namespace: Namespace,
        *,
        drivers: Sequence[Driver[Any]] | None = None,
    ) -> AsyncKVStore:
        """Open every tier's driver and load the indexes of persistent tiers.

        ``drivers``, one per tier, are used instead of opening the tier URLs
        (for drivers built in code, such as fault-injection wrappers); the
        store closes them when it closes.
        """
        if drivers is not None and len(drivers) != len(config.tiers):
            raise ConfigError(f"{len(drivers)} drivers given for {len(config.tiers)} tiers")
        tiers: list[Tier] = []
        try:
            for position, tier_config in enumerate(config.tiers):
                driver = (
                    drivers[position] if drivers is not None else await open_driver(tier_config.url)
                )
                try:
                    tier = Tier(position, tier_config, driver)
                except KVStoreError:
                    await driver.close()
                    raise
                tiers.append(tier)
                await tier.load_index()
        except BaseException:
            for tier in tiers:
                await tier.driver.close()
            raise
        return cls(config, namespace, tiers)

    # ----------------------------------------------------------------- queries

    def keys(self, tokens: TokenIds) -> list[bytes]:
        """The chunk keys of every whole chunk of ``tokens``."""
        return chunk_keys(self._digest, tokens, self.chunk_tokens)

    async def lookup(self, tokens: TokenIds) -> LookupResult:
        """How many leading tokens are cached, and in which tier each chunk is."""
        located = await self._locate(self.keys(tokens))
        return LookupResult(
            tokens=len(located) * self.chunk_tokens,
            chunk_tiers=tuple(self.tiers[t].name for t in located),
        )

    async def contains(self, tokens: TokenIds) -> list[bool]:
        """For each whole chunk of ``tokens``: is it held by any tier?"""
        keys = self.keys(tokens)
        found = [any(key in tier.index for tier in self.tiers) for key in keys]
        for tier in self.tiers:
            missing = [i for i, hit in enumerate(found) if not hit]
            if tier.shared and missing:
                answers = await self._contains(tier, [keys[i] for i in missing])
                for i, hit in zip(missing, answers):
                    found[i] = hit
        return found

    async def _contains(self, tier: Tier, keys: list[bytes]) -> list[bool]:
        try:
            return await tier.call("contains_many", tier.driver.contains_many(keys))
        except Exception:
            return [False] * len(keys)

    async def _locate(self, keys: list[bytes]) -> list[int]:
        """The fastest tier holding each chunk of the cached prefix."""
        where: list[int | None] = [None] * len(keys)
        for tier in self.tiers:
            for i, key in enumerate(keys):
                if where[i] is None and key in tier.index:
                    where[i] = tier.position
        for tier in self.tiers:
            missing = [i for i, t in enumerate(where) if t is None]
            if tier.shared and missing:
                answers = await self._contains(tier, [keys[i] for i in missing])
                for i, hit in zip(missing, answers):
                    if hit:
                        where[i] = tier.position
        prefix: list[int] = []
        for position in where:
            if position is None:
                break
            prefix.append(position)
        return prefix

    # ------------------------------------------------------------------- store

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
        first = self.tiers[0]
        fresh = []
        for i, key in enumerate(keys):
            if key in first.index:
                first.index.touch(key)
            else:
                fresh.append(i)
        ct = self.chunk_tokens
        per_batch = max(1, self.config.io_batch_bytes // self.layout.nbytes(ct))
        batches = [fresh[start : start + per_batch] for start in range(0, len(fresh), per_batch)]

        def encode(batch: list[int]) -> asyncio.Future[list[_Encoded]]:
            return asyncio.gather(
                *(
                    self._encode(keys[i], kv[:, :, i * ct : (i + 1) * ct], first.codecs)
                    for i in batch
                )
            )

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
        )

    async def _write_through(self, chunks: list[_Encoded]) -> None:
        """Queue chunks for every lower tier reached through write-through tiers."""
        for tier in self.tiers[1:]:
            if self.tiers[tier.position - 1].config.write_policy != "write-through":
                break
            for chunk in chunks:
                await self._enqueue(tier, chunk.retain())

    async def _encode(self, key: bytes, kv: torch.Tensor, codecs: tuple[Codec, ...]) -> _Encoded:
        if codecs:
            view = await self._run(encode_chunk, key, kv, mla=self.layout.mla, codecs=codecs)
            return _Encoded(key, view, codecs, None, self._pool)
        buffer = self._pool.acquire(raw_chunk_size(kv))
        view = await self._run(encode_chunk, key, kv, mla=self.layout.mla, out=buffer)
        return _Encoded(key, view, codecs, buffer, self._pool)

    async def _recode(self, chunk: _Encoded, codecs: tuple[Codec, ...]) -> _Encoded:
        """The same chunk encoded with another tier's codec stack."""
        if chunk.codecs == codecs or [c.spec() for c in chunk.codecs] == [c.spec() for c in codecs]:
            return chunk.retain()
        kv = await self._run(
            decode_chunk, chunk.view, key=chunk.key, layout=self.layout, tokens=self.chunk_tokens
        )
        return await self._encode(chunk.key, kv, codecs)

    async def _write(self, tier: Tier, chunks: list[_Encoded]) -> int:
        """Put chunks into ``tier``, evicting to make room; the number written."""
        if not chunks:
            return 0
        fitting: list[_Encoded] = []
        for chunk in chunks:
            if await self._reserve(tier, len(chunk.view)):
                fitting.append(chunk)
            else:
                tier.stats.dropped_writes += 1
        if not fitting:
            return 0
        cost = sum(len(c.view) for c in fitting)
        try:
            await tier.call("put_many", tier.driver.put_many([(c.key, c.view) for c in fitting]))
        except Exception:
            return 0
        finally:
            tier.reserved -= cost
        for chunk in fitting:
            tier.index.add(chunk.key, len(chunk.view))
        tier.stats.chunks_written += len(fitting)
        tier.stats.bytes_written += cost
        return len(fitting)

    async def _reserve(self, tier: Tier, size: int) -> bool:
        """Make room for ``size`` more bytes in ``tier`` and reserve them."""
        async with tier.room_lock:
            need = tier.index.used_bytes + tier.reserved + size - tier.capacity
            if need > 0:
                victims = tier.index.victims(need, self._pinned.__contains__)
                if victims is None:
                    return False
                await self._evict_from(tier, [key for key, _ in victims])
            tier.reserved += size
            return True

    async def _evict_from(self, tier: Tier, keys: list[bytes]) -> None:
        """Remove ``keys`` from ``tier``; write-back tiers first hand them down."""
        below = self.tiers[tier.position + 1] if tier.position + 1 < len(self.tiers) else None
        if below is not None and tier.config.write_policy == "write-back":
            await self._hand_down(tier, below, [k for k in keys if k not in below.index])
        for key in keys:
            tier.index.remove(key)
        tier.stats.evictions += len(keys)
        try:
            await tier.call("delete_many", tier.driver.delete_many(keys))
        except Exception:
            log.warning("tier %s: evicted chunks could not be deleted", tier.name)

    async def _hand_down(self, tier: Tier, below: Tier, keys: list[bytes]) -> None:
        if not keys:
            return
        try:
            values = await tier.call("get_many", tier.driver.get_many(keys))
        except Exception:
            return
        chunks = [
            _Encoded(key, memoryview(value), tier.codecs, None, self._pool)
            for key, value in zip(keys, values)
            if value is not None
        ]
        recoded = [await self._recode(chunk, below.codecs) for chunk in chunks]
        await self._write(below, recoded)
        for chunk in (*chunks, *recoded):
            chunk.release()

    async def _enqueue(self, tier: Tier, chunk: _Encoded) -> None:
        cost = len(chunk.view)
        wait = self.config.on_queue_full == "block"
        if await self._budget.acquire(cost, wait=wait):
            self._queues[tier.position].put_nowait(_Job(chunk, cost))
        else:
            tier.stats.dropped_writes += 1
            chunk.release()

    async def _writer(self, tier: Tier, queue: asyncio.Queue[_Job]) -> None:
        """Drain background writes to ``tier`` in batches."""
        while True:
            jobs = [await queue.get()]
            size = jobs[0].cost
            while not queue.empty() and size < self.config.io_batch_bytes:
                jobs.append(queue.get_nowait())
                size += jobs[-1].cost
            try:
                wanted = [job.chunk for job in jobs if job.chunk.key not in tier.index]
                recoded = [await self._recode(chunk, tier.codecs) for chunk in wanted]
                await self._write(tier, recoded)
                for chunk in recoded:
                    chunk.release()
            except Exception as exc:
                tier.note_error("background write", exc)
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

    # ---------------------------------------------------------------- retrieve

    async def retrieve(self, tokens: TokenIds, out: torch.Tensor | None = None) -> RetrieveResult:
        """Load the KV of the longest cached prefix of ``tokens``.

        ``out``, if given, is a ``[layers, 2, >= n, heads, dim]`` tensor of the
        store's dtype to load into; the result's ``kv`` is then a view of it.
        """
        self._check_open()
        keys = self.keys(tokens)
        located = await self._locate(keys)
        if not located:
            return RetrieveResult(0, None, ())
        ct = self.chunk_tokens
        if out is None:
            out = torch.empty(self.layout.shape(len(located) * ct), dtype=self.layout.torch_dtype)
        elif out.dim() != 5 or out.shape[TOKEN_DIM] < len(located) * ct:
            raise InvalidArgumentError(f"out has shape {tuple(out.shape)}, too small")
        else:
            self.layout.check(out)
        sources: list[str] = []
        batches = self._batches(located)
        fetches: list[asyncio.Task[list[memoryview | None]]] = []
        reads: list[_Reads] = []
        try:
            for batch_no, (position, indices) in enumerate(batches):
                while len(fetches) < min(batch_no + 1 + self.config.read_ahead, len(batches)):
                    tier_at, next_indices = batches[len(fetches)]
                    reads.append(_Reads(self._pool))
                    fetches.append(
                        asyncio.ensure_future(
                            self._fetch(
                                self.tiers[tier_at], [keys[i] for i in next_indices], reads[-1]
                            )
                        )
                    )
                values = await fetches[batch_no]
                tier = self.tiers[position]
                results = await asyncio.gather(
                    *(
                        self._decode_into(tier, keys[i], value, out[:, :, i * ct : (i + 1) * ct])
                        for i, value in zip(indices, values)
                    )
                )
                for i, value, ok in zip(indices, values, results):
                    if ok and value is not None:
                        tier.index.touch(keys[i])
                        tier.stats.hits += 1
                        tier.stats.bytes_read += len(value)
                        if position > 0:
                            await self._promote(keys[i], value, tier.codecs)
                        sources.append(tier.name)
                    else:
                        source = await self._recover(
                            keys[i], out[:, :, i * ct : (i + 1) * ct], position
                        )
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
        loaded = len(sources) * ct
        return RetrieveResult(loaded, out[:, :, :loaded] if loaded else None, tuple(sources))

    def _batches(self, located: list[int]) -> list[tuple[int, list[int]]]:
        """Consecutive chunks from the same tier, at most ``io_batch_bytes`` a batch."""
        per_batch = max(1, self.config.io_batch_bytes // self.layout.nbytes(self.chunk_tokens))
        batches: list[tuple[int, list[int]]] = []
        for i, position in enumerate(located):
            if batches and batches[-1][0] == position and len(batches[-1][1]) < per_batch:
                batches[-1][1].append(i)
            else:
                batches.append((position, [i]))
        return batches

    async def _fetch(self, tier: Tier, keys: list[bytes], reads: _Reads) -> list[memoryview | None]:
        """Read ``keys`` from ``tier``: borrowed views where the driver lends them,
        else ``get_many`` into pooled buffers; ``None`` for misses and failures."""
        values: list[memoryview | None] = [None] * len(keys)
        if tier.driver.capabilities.lends_views:
            try:
                values = list(await reads.loans.enter_async_context(tier.driver.borrow_many(keys)))
            except DriverUnavailableError as exc:
                tier.note_error("borrow_many", exc)
                return values
            except Exception as exc:
                tier.note_error("borrow_many", exc)
        missing = [i for i, value in enumerate(values) if value is None]
        if not missing:
            return values
        buffers = [self._pool.acquire(self._chunk_size) for _ in missing]
        reads.buffers.extend(buffers)
        try:
            found = await tier.call(
                "get_many",
                tier.driver.get_many(
                    [keys[i] for i in missing], into=[byte_view(b) for b in buffers]
                ),
            )
        except Exception:
            return values
        for i, value in zip(missing, found):
            values[i] = value
        return values

    async def _decode_into(
        self, tier: Tier, key: bytes, value: memoryview | None, out: torch.Tensor
    ) -> bool:
        """Verify and copy one chunk into ``out``; drop a bad copy from its tier."""
        if value is None:
            tier.stats.misses += 1
            if key in tier.index:
                tier.index.remove(key)
            return False
        try:
            await self._run(
                decode_chunk,
                value,
                key=key,
                layout=self.layout,
                tokens=self.chunk_tokens,
                out=out,
                verify=tier.config.verify,
            )
            return True
        except IntegrityError as exc:
            tier.stats.integrity_failures += 1
            tier.note_error("decode", exc)
            tier.index.remove(key)
            try:
                await tier.call("delete_many", tier.driver.delete_many([key]))
            except Exception:
                log.warning("tier %s: a corrupt chunk could not be deleted", tier.name)
            return False

    async def _recover(self, key: bytes, out: torch.Tensor, failed: int) -> str | None:
        """Try every other tier for a chunk whose first copy failed; the tier's name."""
        for tier in self.tiers:
            if tier.position == failed:
                continue
            if key not in tier.index and not (
                tier.shared and (await self._contains(tier, [key]))[0]
            ):
                continue
            reads = _Reads(self._pool)
            try:
                (value,) = await self._fetch(tier, [key], reads)
                if value is not None and await self._decode_into(tier, key, value, out):
                    tier.stats.hits += 1
                    tier.stats.bytes_read += len(value)
                    if tier.position > 0:
                        await self._promote(key, value, tier.codecs)
                    return tier.name
            finally:
                await reads.release()
        return None

    async def _promote(self, key: bytes, value: memoryview, codecs: tuple[Codec, ...]) -> None:
        """Queue a copy of a chunk found in a lower tier for the first tier."""
        if key in self.tiers[0].index:
            return
        buffer = self._pool.acquire(len(value))
        buffer[: len(value)].numpy()[:] = value
        chunk = _Encoded(key, byte_view(buffer)[: len(value)], codecs, buffer, self._pool)
        await self._enqueue(self.tiers[0], chunk)

    # ----------------------------------------------------------------- control

    async def pin(self, tokens: TokenIds) -> int:
        """Pin the cached prefix of ``tokens`` so no tier evicts it; chunks pinned."""
        keys = self.keys(tokens)[: len(await self._locate(self.keys(tokens)))]
        self._pinned.update(keys)
        return len(keys)

    async def unpin(self, tokens: TokenIds) -> int:
        """Unpin every chunk of ``tokens``; chunks that were pinned."""
        keys = [key for key in self.keys(tokens) if key in self._pinned]
        self._pinned.difference_update(keys)
        return len(keys)

    async def evict(self, tokens: TokenIds) -> int:
        """Drop the unpinned chunks of ``tokens`` from every tier; chunks dropped."""
        keys = [key for key in self.keys(tokens) if key not in self._pinned]
        dropped: set[bytes] = set()
        for tier in self.tiers:
            held = [key for key in keys if key in tier.index or tier.shared]
            if not held:
                continue
            for key in held:
                tier.index.remove(key)
            try:
                existed = await tier.call("delete_many", tier.driver.delete_many(held))
            except Exception:
                continue
            dropped.update(key for key, was in zip(held, existed) if was)
        return len(dropped)

    async def clear(self, tier: str | None = None) -> int:
        """Delete every chunk in one tier (by name) or in all; entries deleted."""
        targets = [self._tier(tier)] if tier is not None else self.tiers
        await self.flush()
        deleted = 0
        for target in targets:
            keys = [key for key, _ in target.index.eviction_order()]
            if target.driver.capabilities.listable:
                keys = list({*keys, *[entry.key async for entry in target.driver.list()]})
            for start in range(0, len(keys), 1024):
                batch = keys[start : start + 1024]
                existed = await target.call("delete_many", target.driver.delete_many(batch))
                deleted += sum(existed)
            for key in keys:
                target.index.remove(key)
        if tier is None:
            self._pinned.clear()
        return deleted

    def stats(self) -> StoreStats:
        return StoreStats(
            tiers=tuple(tier.snapshot(self._pinned) for tier in self.tiers),
            queued_bytes=self._budget.used,
            pinned_chunks=len(self._pinned),
        )

    def _tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise NotFoundError(f"no tier named {name!r} (tiers: {[t.name for t in self.tiers]})")

    async def close(self) -> None:
        """Finish background writes, then close every driver."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        for writer in self._writers:
            writer.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)
        for tier in self.tiers:
            await tier.driver.close()
        self._executor.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("the store is closed")

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: func(*args, **kwargs))

    async def __aenter__(self) -> AsyncKVStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _PrefixEnds(Exception):
    """Raised inside retrieve when a chunk cannot be loaded from any tier."""


class KVStore:
    """The hierarchical store as blocking calls (one loop thread behind it)."""

    def __init__(self, store: AsyncKVStore, loop: LoopThread) -> None:
        self._store = store
        self._loop = loop

    @classmethod
    def open(
        cls,
        config: StoreConfig,
        namespace: Namespace,
        *,
        drivers: Sequence[Driver[Any]] | None = None,
    ) -> KVStore:
        """Open a store on the shared loop thread (see ``AsyncKVStore.open``)."""
        loop = shared_loop()
        return cls(loop.run(AsyncKVStore.open(config, namespace, drivers=drivers)), loop)

    @property
    def async_store(self) -> AsyncKVStore:
        return self._store

    @property
    def tiers(self) -> list[Tier]:
        return self._store.tiers

    def keys(self, tokens: TokenIds) -> list[bytes]:
        return self._store.keys(tokens)

    def lookup(self, tokens: TokenIds) -> LookupResult:
        return self._loop.run(self._store.lookup(tokens))

    def contains(self, tokens: TokenIds) -> list[bool]:
        return self._loop.run(self._store.contains(tokens))

    def store(self, tokens: TokenIds, kv: torch.Tensor) -> StoreResult:
        return self._loop.run(self._store.store(tokens, kv))

    def retrieve(self, tokens: TokenIds, out: torch.Tensor | None = None) -> RetrieveResult:
        return self._loop.run(self._store.retrieve(tokens, out))

    def pin(self, tokens: TokenIds) -> int:
        return self._loop.run(self._store.pin(tokens))

    def unpin(self, tokens: TokenIds) -> int:
        return self._loop.run(self._store.unpin(tokens))

    def evict(self, tokens: TokenIds) -> int:
        return self._loop.run(self._store.evict(tokens))

    def clear(self, tier: str | None = None) -> int:
        return self._loop.run(self._store.clear(tier))

    def flush(self) -> None:
        self._loop.run(self._store.flush())

    def stats(self) -> StoreStats:
        return self._store.stats()

    def close(self) -> None:
        self._loop.run(self._store.close())

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(config: StoreConfig | str | Sequence[str], namespace: Namespace) -> KVStore:
    """A blocking store from a config, a YAML path, or a list of tier URLs."""
    if isinstance(config, str):
        config = (
            StoreConfig.from_yaml(config) if "://" not in config else StoreConfig.from_urls(config)
        )
    elif not isinstance(config, StoreConfig):
        config = StoreConfig.from_urls(*config)
    return KVStore.open(config, namespace)


__all__ = [
    "AsyncKVStore",
    "KVStore",
    "LookupResult",
    "RetrieveResult",
    "StoreResult",
    "StoreStats",
    "open_store",
]
