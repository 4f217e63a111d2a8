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
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import blake3
import torch

from kvstore.buffers import BufferPool, byte_view
from kvstore.chunk import decode_chunk, encode_chunk, raw_chunk_size, read_header
from kvstore.codecs import Codec, KeyRing, codec_stack
from kvstore.config import StoreConfig, TierConfig
from kvstore.driver import Driver
from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverTimeoutError,
    DriverUnavailableError,
    IntegrityError,
    InvalidArgumentError,
    InvalidKeyError,
    KVStoreError,
    NotFoundError,
)
from kvstore.keys import (
    NAMED_CHUNK_TAG,
    STORAGE_KEY_BYTES,
    TAG_BYTES,
    Namespace,
    TokenIds,
    chunk_key_of,
    chunk_keys,
    storage_prefix,
)
from kvstore.layout import TOKEN_DIM, KVLayout
from kvstore.metrics import StoreMetrics, timed
from kvstore.offline import OfflineDriver
from kvstore.registry import open_driver
from kvstore.results import (
    CompressResult,
    LookupResult,
    MoveResult,
    Progress,
    ProgressCallback,
    RetrieveResult,
    Scope,
    ScopeCounters,
    ScopeStats,
    ScopeTierUsage,
    StoreResult,
    StoreStats,
    TierHealth,
)
from kvstore.sync import LoopThread, shared_loop
from kvstore.tier import Tier, check_codecs

T = TypeVar("T")
log = logging.getLogger("kvstore.store")


RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 30.0
"""A tier down at open is retried after RECONNECT_FIRST_S, then at doubling intervals
up to RECONNECT_MAX_S."""

_PROBE_KEY = b"kvstore-health-probe"
"""The key ``health`` asks each tier about; nothing stores it."""


@dataclass
class _Tally:
    """Progress of a long operation, reported through an optional callback."""

    total_chunks: int
    total_bytes: int
    callback: ProgressCallback | None
    done_chunks: int = 0
    done_bytes: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.advance(0, 0)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def advance(self, chunks: int, nbytes: int) -> None:
        self.done_chunks += chunks
        self.done_bytes += nbytes
        if self.callback is not None:
            self.callback(
                Progress(self.done_chunks, self.total_chunks, self.done_bytes, self.total_bytes)
            )


def _verified_recode(
    key: bytes, value: memoryview, codecs: tuple[Codec, ...], keys: KeyRing
) -> memoryview:
    """Verify a stored chunk of any namespace (its header names its layout) and
    return it encoded with ``codecs``: ``value`` itself when it already is.
    ``keys`` decrypt encrypted chunks."""
    header = read_header(value)
    if len(header.shape) != 5:
        raise IntegrityError(f"chunk header has shape {header.shape}, not a KV chunk")
    layers, _planes, tokens, heads, dim = header.shape
    try:
        layout = KVLayout(layers, heads, dim, header.dtype, header.mla)
    except InvalidArgumentError as exc:
        raise IntegrityError(f"chunk header names no valid layout: {exc}") from None
    kv = decode_chunk(value, key=chunk_key_of(key), layout=layout, tokens=tokens, keys=keys)
    if tuple(header.codec_ids) == tuple(codec.id for codec in codecs):
        return value
    return encode_chunk(chunk_key_of(key), kv, mla=header.mla, codecs=codecs)


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
    views, released together once the batch is decoded. ``failed``: the read
    call failed, so its misses say nothing of what the tier holds."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self.buffers: list[torch.Tensor] = []
        self.loans = contextlib.AsyncExitStack()
        self.failed = False

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

    def __init__(
        self,
        config: StoreConfig,
        namespace: Namespace,
        tiers: list[Tier],
        *,
        keys: KeyRing | None = None,
    ) -> None:
        if namespace.chunk_tokens != config.chunk_tokens or namespace.tenant != config.tenant:
            raise ConfigError("the namespace's chunk_tokens and tenant must match the store config")
        self.config = config
        self.tiers = tiers
        self._keys = keys if keys is not None else config.keyring()
        self._root = self
        self._scopes: dict[bytes, ScopeCounters] = {}
        self._bind(namespace)
        self._pinned: set[bytes] = set()
        self._pin_deadlines: dict[bytes, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
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
        self._reconnects = [
            asyncio.create_task(self._reconnect(tier), name=f"kvstore-reconnect-{tier.name}")
            for tier in tiers
            if tier.down is not None
        ]
        self._closed = False
        self.metrics = StoreMetrics(
            config.name,
            tiers,
            chunk_tokens=self.chunk_tokens,
            queue_limit=config.queue_bytes,
            stats=self.stats,
            queue_depths=lambda: [queue.qsize() for queue in self._queues],
        )

    @classmethod
    async def open(
        cls,
        config: StoreConfig,
        namespace: Namespace,
        *,
        drivers: Sequence[Driver[Any]] | None = None,
    ) -> AsyncKVStore:
        """Open every tier's driver and load the indexes of persistent tiers.

        A tier below the first whose driver cannot be reached (a retryable
        error) and is not ``required`` starts down: it serves misses and takes
        no writes while the store retries it in the background.

        ``drivers``, one per tier, are used instead of opening the tier URLs
        (for drivers built in code, such as fault-injection wrappers); the
        store closes them when it closes.
        """
        if drivers is not None and len(drivers) != len(config.tiers):
            raise ConfigError(f"{len(drivers)} drivers given for {len(config.tiers)} tiers")
        tiers: list[Tier] = []
        keys = config.keyring()
        try:
            for position, tier_config in enumerate(config.tiers):
                driver = (
                    drivers[position]
                    if drivers is not None
                    else await _open_tier_driver(position, tier_config)
                )
                try:
                    tier = Tier(position, tier_config, driver, keys=keys)
                except KVStoreError:
                    await driver.close()
                    raise
                tiers.append(tier)
                await tier.load_index()
            return cls(config, namespace, tiers, keys=keys)
        except BaseException:
            for tier in tiers:
                await tier.driver.close()
            raise

    async def _reconnect(self, tier: Tier) -> None:
        """Open the driver of a tier that is down, retrying with exponential backoff,
        and serve from it once it opens."""
        delay = RECONNECT_FIRST_S
        while tier.down is not None:
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX_S)
            try:
                driver = await open_driver(tier.config.url)
            except KVStoreError as exc:
                tier.down = str(exc)
                if not exc.retryable:
                    log.error("tier %s stays down: %s", tier.name, exc)
                    return
                continue
            try:
                tier.attach(driver)
                await tier.load_index()
            except KVStoreError as exc:
                tier.down = str(exc)
                await driver.close()
                log.error("tier %s stays down: %s", tier.name, exc)
                return
            log.warning("tier %s is up again", tier.name)

    def _bind(self, namespace: Namespace) -> None:
        """Point this store at ``namespace``: its layout, digest and storage-key prefix."""
        check_codecs(self.tiers, namespace)
        self.namespace = namespace
        self.layout = namespace.layout
        self.chunk_tokens = namespace.chunk_tokens
        self._digest = namespace.digest()
        self._prefix = storage_prefix(namespace)
        self._counters = self._scopes.setdefault(self._prefix, ScopeCounters())
        self._chunk_size = raw_chunk_size(
            torch.empty(
                self.layout.shape(self.chunk_tokens), dtype=self.layout.torch_dtype, device="meta"
            )
        )

    def scoped(self, namespace: Namespace) -> AsyncKVStore:
        """This store seen through another namespace (another model, TP rank or tenant).

        ``namespace`` must have this store's KV layout and chunk size. The view
        shares this store's tiers, queues, pins and lifetime; its keys, lookups,
        stores, retrieves and scoped operations are ``namespace``'s. Closing a
        view does nothing: close the store it came from.
        """
        if namespace.chunk_tokens != self.chunk_tokens or namespace.layout != self.layout:
            raise ConfigError(
                "a view's namespace must have the store's chunk_tokens and KV layout "
                f"({self.chunk_tokens}, {self.layout})"
            )
        view = copy.copy(self)
        view._bind(namespace)
        return view

    # ----------------------------------------------------------------- queries

    def keys(self, tokens: TokenIds) -> list[bytes]:
        """The storage keys of every whole chunk of ``tokens``: this namespace's
        prefix, then the chunk key (docs/key-spec.md)."""
        prefix = self._prefix
        return [prefix + key for key in chunk_keys(self._digest, tokens, self.chunk_tokens)]

    def named_keys(self, names: Sequence[bytes]) -> list[bytes]:
        """Storage keys of chunks an engine names itself (SGLang's page hashes)
        instead of by tokens: this namespace's prefix, then ``blake3(namespace
        digest || b"kvstore-named-chunk-v1\\n" || name)``. The engine's naming must
        make equal names mean equal KV within the namespace."""
        prefix = self._prefix
        keys = []
        for name in names:
            if type(name) is not bytes or not name:
                raise InvalidKeyError(f"chunk names are non-empty bytes, got {name!r}")
            hasher = blake3.blake3(self._digest)
            hasher.update(NAMED_CHUNK_TAG)
            hasher.update(name)
            keys.append(prefix + hasher.digest())
        return keys

    @timed("locate")
    async def locate(self, keys: Sequence[bytes]) -> tuple[str, ...]:
        """The tier of each chunk of the cached prefix of ``keys`` (from ``named_keys``)."""
        located = await self._locate(self._own_keys(keys))
        self.metrics.count_prefix(
            "locate", len(keys) * self.chunk_tokens, len(located) * self.chunk_tokens
        )
        return tuple(self.tiers[t].name for t in located)

    def _own_keys(self, keys: Sequence[bytes]) -> list[bytes]:
        """``keys`` as a list, each checked to be a storage key of this namespace."""
        own = list(keys)
        for key in own:
            if (
                type(key) is not bytes
                or len(key) != STORAGE_KEY_BYTES
                or key[: 2 * TAG_BYTES] != self._prefix
            ):
                raise InvalidKeyError("not a storage key of this store's namespace")
        return own

    @timed("lookup")
    async def lookup(self, tokens: TokenIds) -> LookupResult:
        """How many leading tokens are cached, and in which tier each chunk is."""
        keys = self.keys(tokens)
        located = await self._locate(keys)
        self.metrics.count_prefix(
            "lookup", len(keys) * self.chunk_tokens, len(located) * self.chunk_tokens
        )
        self._counters.note_lookup(len(keys) * self.chunk_tokens, len(located) * self.chunk_tokens)
        return LookupResult(
            tokens=len(located) * self.chunk_tokens,
            chunk_tiers=tuple(self.tiers[t].name for t in located),
        )

    @timed("contains")
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
        if tier.down is not None:
            tier.stats.misses += len(keys)
            return [False] * len(keys)
        try:
            return await tier.call("contains_many", tier.driver.contains_many(keys))
        except KVStoreError:
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
        per_batch = max(1, self.config.io_batch_bytes // self.layout.nbytes(self.chunk_tokens))
        batches = [fresh[start : start + per_batch] for start in range(0, len(fresh), per_batch)]

        def encode(batch: list[int]) -> asyncio.Future[list[_Encoded]]:
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
            view = await self._run(
                encode_chunk, chunk_key_of(key), kv, mla=self.layout.mla, codecs=codecs
            )
            return _Encoded(key, view, codecs, None, self._pool)
        buffer = self._pool.acquire(raw_chunk_size(kv))
        view = await self._run(encode_chunk, chunk_key_of(key), kv, mla=self.layout.mla, out=buffer)
        return _Encoded(key, view, codecs, buffer, self._pool)

    async def _recode(self, chunk: _Encoded, codecs: tuple[Codec, ...]) -> _Encoded:
        """The same chunk encoded with another tier's codec stack."""
        if chunk.codecs == codecs or [c.spec() for c in chunk.codecs] == [c.spec() for c in codecs]:
            return chunk.retain()
        kv = await self._run(
            decode_chunk,
            chunk.view,
            key=chunk_key_of(chunk.key),
            layout=self.layout,
            tokens=self.chunk_tokens,
            keys=self._keys,
        )
        return await self._encode(chunk.key, kv, codecs)

    async def _write(self, tier: Tier, chunks: list[_Encoded], *, retry_full: bool = True) -> int:
        """Put chunks into ``tier``, evicting to make room; the number written.

        Room is each chunk's footprint in the tier; a chunk over the driver's
        ``max_value_bytes`` is dropped unsent. What a failed put stored
        anyway is counted, so the index holds every chunk the tier holds. A
        driver full below ``tier.limit`` (a disk or quota filled up) lowers the
        limit (``Tier.note_full``), and the chunks it refused are tried once
        more after evicting.
        """
        if not chunks:
            return 0
        largest = tier.driver.capabilities.max_value_bytes
        fitting: list[_Encoded] = []
        for chunk in chunks:
            too_large = largest is not None and len(chunk.view) > largest
            if not too_large and await self._reserve(tier, tier.footprint(len(chunk.view))):
                fitting.append(chunk)
            else:
                tier.stats.dropped_writes += 1
        if not fitting:
            return 0
        cost = sum(tier.footprint(len(c.view)) for c in fitting)
        sizes = [(c.key, len(c.view)) for c in fitting]
        for chunk in fitting:
            chunk.retain()

        def settled(succeeded: bool, late: bool) -> None:
            """The driver is done with the chunks: count what it stored, even after a
            timeout (the bytes are in the tier), and let the chunks' buffers go."""
            tier.reserved -= cost
            if succeeded:
                self._record_written(tier, sizes)
            elif late:
                # A put that failed after its caller left may have stored some chunks:
                # ask the tier, so that the index holds what the tier holds.
                check = asyncio.ensure_future(self._record_landed(tier, sizes))
                tier.abandoned.add(check)
                check.add_done_callback(tier.abandoned.discard)
            for chunk in fitting:
                chunk.release()

        try:
            await tier.call(
                "put_many",
                tier.driver.put_many([(c.key, c.view) for c in fitting]),
                settled=settled,
            )
        except DriverTimeoutError:
            return 0
        except KVStoreError as exc:
            landed = await self._record_landed(tier, sizes)
            if isinstance(exc, CapacityError) and retry_full:
                tier.note_full()
                refused = [chunk for chunk in fitting if chunk.key not in landed]
                return len(landed) + await self._write(tier, refused, retry_full=False)
            return len(landed)
        return len(fitting)

    def _record_written(self, tier: Tier, sizes: list[tuple[bytes, int]]) -> None:
        """Index chunks (key, encoded size) that ``tier`` now holds, by footprint."""
        for key, size in sizes:
            tier.record(key, tier.footprint(size))
        tier.stats.chunks_written += len(sizes)
        tier.stats.bytes_written += sum(size for _, size in sizes)

    async def _record_landed(self, tier: Tier, sizes: list[tuple[bytes, int]]) -> set[bytes]:
        """Index the chunks of a failed put that ``tier`` holds all the same; their keys."""
        try:
            held = await tier.call(
                "contains_many", tier.driver.contains_many([key for key, _ in sizes])
            )
        except KVStoreError:
            return set()
        landed = [item for item, there in zip(sizes, held) if there]
        self._record_written(tier, landed)
        return {key for key, _ in landed}

    async def _reserve(self, tier: Tier, size: int) -> bool:
        """Make room for ``size`` more bytes (a footprint) in ``tier`` and reserve
        them. It evicts again if a read borrowed a victim before the driver
        deleted it: that victim keeps its room until the loan ends."""
        async with tier.room_lock:
            while (need := tier.occupied_bytes + size - tier.limit) > 0:
                victims = tier.victims(need, self._is_pinned)
                if victims is None:
                    return False
                await self._evict_from(tier, [key for key, _ in victims])
            tier.reserved += size
            return True

    async def _evict_from(self, tier: Tier, keys: list[bytes]) -> None:
        """Remove ``keys`` from ``tier``; write-back tiers first hand them down."""
        below = self.tiers[tier.position + 1] if tier.position + 1 < len(self.tiers) else None
        if below is not None and tier.config.write_policy == "write-back":
            await self._hand_down(tier, below, await self._absent(below, keys))
        tier.stats.evictions += len(keys)
        try:
            await tier.delete(keys)
        except KVStoreError:
            log.warning("tier %s: evicted chunks could not be deleted", tier.name)

    async def _hand_down(self, tier: Tier, below: Tier, keys: list[bytes]) -> None:
        """Copy write-back chunks ``tier`` is evicting into ``below``; those that do
        not land there (unreadable, corrupt, refused) are counted in
        ``tier.stats.dropped_writebacks``."""
        if not keys:
            return
        try:
            values = await tier.call("get_many", tier.driver.get_many(keys))
        except KVStoreError:
            values = [None] * len(keys)
        chunks = [
            _Encoded(key, memoryview(value), tier.codecs, None, self._pool)
            for key, value in zip(keys, values)
            if value is not None
        ]
        recoded: list[_Encoded] = []
        for chunk in chunks:
            try:
                recoded.append(await self._recode(chunk, below.codecs))
            except IntegrityError as exc:
                tier.stats.integrity_failures += 1
                tier.note_error("write-back", exc)
        landed = await self._write(below, recoded)
        tier.stats.dropped_writebacks += len(keys) - landed
        for chunk in (*chunks, *recoded):
            chunk.release()

    async def _absent(self, tier: Tier, keys: list[bytes]) -> list[bytes]:
        """The ``keys`` ``tier`` does not hold: not in its index and, for a shared
        tier (whose index after open knows only this store's writes), not there
        when asked, so nothing another process or run wrote is written again."""
        absent = [key for key in keys if key not in tier.index]
        if not tier.shared or not absent or tier.down is not None:
            return absent
        held = await self._contains(tier, absent)
        return [key for key, there in zip(absent, held) if not there]

    async def _enqueue(self, tier: Tier, chunk: _Encoded) -> None:
        cost = len(chunk.view)
        wait = self.config.on_queue_full == "block"
        if tier.down is None and await self._budget.acquire(cost, wait=wait):
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

    # ---------------------------------------------------------------- retrieve

    @timed("retrieve")
    async def retrieve(self, tokens: TokenIds, out: torch.Tensor | None = None) -> RetrieveResult:
        """Load the KV of the longest cached prefix of ``tokens``.

        ``out``, if given, is a ``[layers, 2, >= n, heads, dim]`` tensor of the
        store's dtype to load into; the result's ``kv`` is then a view of it.
        """
        self._check_open()
        keys = self.keys(tokens)
        located = await self._locate(keys)
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
                        self._decode_into(
                            tier, keys[i], value, outs[i], failed=reads[batch_no].failed
                        )
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
    ) -> tuple[str, ...]:
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
        located = await self._locate(keys)
        sources = tuple(await self._load(keys, located, list(outs))) if located else ()
        self.metrics.count_prefix(
            "retrieve_chunks", len(keys) * self.chunk_tokens, len(sources) * self.chunk_tokens
        )
        return sources

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
                reads.buffers.extend(buffers)

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
        self,
        tier: Tier,
        key: bytes,
        value: memoryview | None,
        out: torch.Tensor,
        *,
        failed: bool = False,
    ) -> bool:
        """Verify and copy one chunk into ``out``; drop a bad copy from its tier. A
        miss drops the chunk from the tier's index unless the read ``failed`` (timed
        out, tier unreachable): then the chunk is most likely still there."""
        if value is None:
            tier.stats.misses += 1
            if not failed:
                tier.forget(key)
            return False
        try:
            await self._run(
                decode_chunk,
                value,
                key=chunk_key_of(key),
                layout=self.layout,
                tokens=self.chunk_tokens,
                out=out,
                verify=tier.config.verify,
                keys=self._keys,
            )
            return True
        except IntegrityError as exc:
            tier.stats.integrity_failures += 1
            tier.note_error("decode", exc)
            try:
                await tier.delete([key])
            except KVStoreError:
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

    async def pin(self, tokens: TokenIds, ttl_s: float | None = None) -> int:
        """Pin the cached prefix of ``tokens`` so no tier evicts it; chunks pinned.

        ttl_s: drop the pin after this many seconds (so a client that dies
        cannot hold chunks forever). A chunk pinned several times stays pinned
        until the latest deadline asked for, or for good if any pin had none.
        """
        if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
            raise InvalidArgumentError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        keys = self.keys(tokens)
        keys = keys[: len(await self._locate(keys))]
        deadlines = self._pin_deadlines
        for key in keys:
            if ttl_s is None:
                deadlines.pop(key, None)
            elif key not in self._pinned or key in deadlines:
                deadlines[key] = max(deadlines.get(key, 0.0), time.monotonic() + ttl_s)
        self._pinned.update(keys)
        if ttl_s is not None and keys:
            self._sweep_later()
        return len(keys)

    async def unpin(self, tokens: TokenIds) -> int:
        """Unpin every chunk of ``tokens``; chunks that were pinned."""
        keys = [key for key in self.keys(tokens) if self._is_pinned(key)]
        self._pinned.difference_update(keys)
        for key in keys:
            self._pin_deadlines.pop(key, None)
        return len(keys)

    def _is_pinned(self, key: bytes) -> bool:
        """Whether ``key`` is pinned now; a pin past its deadline is dropped here."""
        if key not in self._pinned:
            return False
        deadline = self._pin_deadlines.get(key)
        if deadline is not None and deadline <= time.monotonic():
            self._pinned.discard(key)
            del self._pin_deadlines[key]
            return False
        return True

    def _expire_pins(self) -> None:
        now = time.monotonic()
        for key in [key for key, deadline in self._pin_deadlines.items() if deadline <= now]:
            self._pinned.discard(key)
            del self._pin_deadlines[key]

    def _sweep_later(self) -> None:
        """Start the task that drops expired pins, unless it runs already."""
        root = self._root
        if root._sweeper is None or root._sweeper.done():
            root._sweeper = asyncio.create_task(root._sweep_pins(), name="kvstore-pin-sweeper")

    async def _sweep_pins(self) -> None:
        """Drop pins as they expire (at most a second late), until none has a deadline."""
        while self._pin_deadlines:
            earliest = min(self._pin_deadlines.values())
            await asyncio.sleep(min(1.0, max(0.0, earliest - time.monotonic())))
            self._expire_pins()

    async def evict(self, tokens: TokenIds) -> int:
        """Drop the unpinned chunks of ``tokens`` from every tier; chunks dropped."""
        keys = [key for key in self.keys(tokens) if not self._is_pinned(key)]
        dropped: set[bytes] = set()
        for tier in self.tiers:
            held = [key for key in keys if key in tier.index or tier.shared]
            if not held:
                continue
            try:
                existed = await tier.delete(held)
            except KVStoreError:
                continue
            dropped.update(key for key, was in zip(held, existed) if was)
        return len(dropped)

    def _resolve(self, scope: Scope | None) -> Scope:
        """``scope``, or the default: ``tenant`` for a store with a tenant salt (so
        one tenant never touches another's chunks), else ``all``."""
        if scope is None:
            return "tenant" if self.namespace.tenant else "all"
        return scope

    def _scope_prefix(self, scope: Scope | None) -> bytes:
        """What the storage keys of ``scope`` start with."""
        scope = self._resolve(scope)
        if scope == "namespace":
            return self._prefix
        if scope == "tenant":
            return self._prefix[:TAG_BYTES]
        if scope == "all":
            return b""
        raise InvalidArgumentError(f"scope must be namespace, tenant or all, got {scope!r}")

    async def _held(self, tier: Tier, prefix: bytes) -> dict[bytes, int]:
        """Every key ``tier`` holds that starts with ``prefix``, with its size:
        from the index, and from the driver's listing where it can list."""
        held = {key: size for key, size in tier.index.eviction_order() if key.startswith(prefix)}
        if tier.driver.capabilities.listable:
            async for entry in tier.driver.list():
                if entry.key.startswith(prefix):
                    held.setdefault(entry.key, entry.size)
        return held

    async def _selected(
        self, tier: Tier, tokens: TokenIds | None, scope: Scope | None
    ) -> dict[bytes, int]:
        """The chunks of ``tokens`` that ``tier`` holds, or every chunk of ``scope`` in it."""
        if tokens is None:
            return await self._held(tier, self._scope_prefix(scope))
        keys = self.keys(tokens)
        held = {key: tier.index.size_of(key) for key in keys}
        missing = [key for key, size in held.items() if size is None]
        if tier.shared and missing:
            for key, hit in zip(missing, await self._contains(tier, missing)):
                if hit:
                    held[key] = self._chunk_size
        return {key: size for key, size in held.items() if size is not None}

    def _batched(self, held: dict[bytes, int]) -> list[list[bytes]]:
        """Keys in batches of at most ``io_batch_bytes`` (one key at least)."""
        batches: list[list[bytes]] = []
        size = 0
        for key, nbytes in held.items():
            if not batches or size + nbytes > self.config.io_batch_bytes:
                batches.append([])
                size = 0
            batches[-1].append(key)
            size += nbytes
        return batches

    async def _read(self, tier: Tier, keys: list[bytes]) -> list[memoryview | None]:
        """Values of ``keys`` in ``tier``; a failed call reads as misses (and is counted)."""
        try:
            return await tier.call("get_many", tier.driver.get_many(keys))
        except KVStoreError:
            return [None] * len(keys)

    async def _drop(self, tier: Tier, keys: list[bytes]) -> None:
        """Delete ``keys`` from ``tier`` and its index."""
        if keys:
            await tier.delete(keys)

    async def _recode_verified(
        self, tier: Tier, key: bytes, value: memoryview, codecs: tuple[Codec, ...]
    ) -> memoryview | None:
        """``_verified_recode`` off the loop; ``None`` for a bad chunk, which is counted."""
        try:
            return await self._run(_verified_recode, key, value, codecs, self._keys)
        except IntegrityError as exc:
            tier.stats.integrity_failures += 1
            tier.note_error("verify", exc)
            return None

    async def clear(
        self,
        tier: str | None = None,
        *,
        scope: Scope | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Delete the chunks of ``scope`` from one tier (by name) or from all; entries deleted.

        scope: ``namespace``, ``tenant`` or ``all`` (see ``Scope``); by default
        ``tenant`` for a store with a tenant salt, else ``all``. Clearing every
        tier also drops the scope's pins.
        """
        targets = [self._tier(tier)] if tier is not None else self.tiers
        prefix = self._scope_prefix(scope)
        await self.flush()
        held = [(target, await self._held(target, prefix)) for target in targets]
        tally = _Tally(
            sum(len(keys) for _, keys in held),
            sum(sum(keys.values()) for _, keys in held),
            progress,
        )
        deleted = 0
        for target, keys in held:
            ordered = list(keys)
            for start in range(0, len(ordered), 1024):
                batch = ordered[start : start + 1024]
                existed = await target.delete(batch)
                deleted += sum(existed)
                tally.advance(len(batch), sum(keys[key] for key in batch))
        if tier is None:
            for key in [key for key in self._pinned if key.startswith(prefix)]:
                self._pinned.discard(key)
                self._pin_deadlines.pop(key, None)
        return deleted

    async def move(
        self,
        source: str,
        target: str,
        tokens: TokenIds | None = None,
        *,
        migrate: bool = False,
        scope: Scope | None = None,
        progress: ProgressCallback | None = None,
    ) -> MoveResult:
        """Copy chunks from one tier to another (``migrate``: and delete them from the source).

        tokens: only the chunks of this prompt that ``source`` holds (e.g. warm
        a prefix from S3 into CPU memory before a burst); by default every chunk
        of ``scope`` in ``source``. Each chunk is verified and encoded with the
        target tier's codecs before it is written; a bad one is dropped from
        the source. The target makes room as for any write (evicting unpinned
        chunks), and a chunk it cannot take stays where it was.
        """
        src, dst = self._tier(source), self._tier(target)
        if src is dst:
            raise InvalidArgumentError("move needs two different tiers")
        held = await self._selected(src, tokens, scope)
        tally = _Tally(len(held), sum(held.values()), progress)
        for batch in self._batched(held):
            values = await self._read(src, batch)
            fresh: list[_Encoded] = []
            bad: list[bytes] = []
            for key, value in zip(batch, values):
                if value is None:
                    tally.count("failed")
                elif key in dst.index:
                    tally.count("already_there")
                else:
                    encoded = await self._recode_verified(src, key, value, dst.codecs)
                    if encoded is None:
                        bad.append(key)
                    else:
                        fresh.append(_Encoded(key, encoded, dst.codecs, None, self._pool))
            await self._write(dst, fresh)
            landed = [chunk for chunk in fresh if chunk.key in dst.index]
            tally.count("copied", len(landed))
            tally.count("bytes_copied", sum(len(chunk.view) for chunk in landed))
            tally.count("failed", len(fresh) - len(landed))
            tally.count("corrupt", len(bad))
            await self._drop(src, bad)
            if migrate:
                moved = [
                    key
                    for key, value in zip(batch, values)
                    if value is not None and key in dst.index
                ]
                await self._drop(src, moved)
                tally.count("removed", len(moved))
            tally.advance(len(batch), sum(held[key] for key in batch))
        counts = tally.counts
        return MoveResult(
            chunks=len(held),
            copied=counts.get("copied", 0),
            already_there=counts.get("already_there", 0),
            corrupt=counts.get("corrupt", 0),
            failed=counts.get("failed", 0),
            removed=counts.get("removed", 0),
            bytes_copied=counts.get("bytes_copied", 0),
        )

    async def compress(
        self,
        tier: str,
        codecs: str,
        tokens: TokenIds | None = None,
        *,
        scope: Scope | None = None,
        progress: ProgressCallback | None = None,
    ) -> CompressResult:
        """Re-encode chunks held by ``tier`` with another codec stack (``zstd:9``, ``raw``).

        tokens / scope select the chunks as for ``move``. Only lossless codecs
        are accepted: a chunk's KV, and so its key, stays the same. Chunks
        already encoded with the stack's codecs are left as they are; the
        tier's configured codecs still apply to new writes.
        """
        target = self._tier(tier)
        stack = self.lossless_stack(codecs)
        held = await self._selected(target, tokens, scope)
        tally = _Tally(len(held), sum(held.values()), progress)
        for batch in self._batched(held):
            values = await self._read(target, batch)
            changed: list[tuple[_Encoded, int]] = []
            bad: list[bytes] = []
            for key, value in zip(batch, values):
                if value is None:
                    tally.count("failed")
                    continue
                encoded = await self._recode_verified(target, key, value, stack)
                if encoded is None:
                    bad.append(key)
                elif encoded is value:
                    tally.count("unchanged")
                else:
                    changed.append((_Encoded(key, encoded, stack, None, self._pool), len(value)))
            for chunk, _ in changed:
                target.forget(chunk.key)
            await self._write(target, [chunk for chunk, _ in changed])
            for chunk, old_size in changed:
                if chunk.key in target.index:
                    tally.count("recoded")
                    tally.count("bytes_before", old_size)
                    tally.count("bytes_after", len(chunk.view))
                else:
                    target.index.add(chunk.key, target.footprint(old_size))
                    tally.count("failed")
            tally.count("corrupt", len(bad))
            await self._drop(target, bad)
            tally.advance(len(batch), sum(held[key] for key in batch))
        counts = tally.counts
        return CompressResult(
            chunks=len(held),
            recoded=counts.get("recoded", 0),
            unchanged=counts.get("unchanged", 0),
            corrupt=counts.get("corrupt", 0),
            failed=counts.get("failed", 0),
            bytes_before=counts.get("bytes_before", 0),
            bytes_after=counts.get("bytes_after", 0),
        )

    def lossless_stack(self, codecs: str) -> tuple[Codec, ...]:
        """The codec stack ``codecs`` names (with this store's encryption keys), which
        must not change KV: what ``compress`` takes."""
        stack = codec_stack(codecs, self._keys)
        lossy = [codec.spec() for codec in stack if not codec.lossless]
        if lossy:
            raise InvalidArgumentError(
                f"compress keeps KV unchanged and takes lossless codecs only, got {lossy}"
            )
        return stack

    async def health(self, timeout_s: float = 5.0) -> tuple[TierHealth, ...]:
        """Probe every tier at once with one small call and report its state (``TierHealth``)."""
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidArgumentError(f"timeout_s must be positive, got {timeout_s}")
        return tuple(await asyncio.gather(*(self._probe(tier, timeout_s) for tier in self.tiers)))

    async def _probe(self, tier: Tier, timeout_s: float) -> TierHealth:
        limit = min(timeout_s, tier.config.timeout_s)
        error: str | None = None
        start = time.perf_counter()
        try:
            await asyncio.wait_for(tier.driver.contains_many([_PROBE_KEY]), limit)
        except asyncio.TimeoutError:
            error = f"no answer within {limit} s"
        except KVStoreError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            error = str(tier.note_bug("health probe", exc))
        latency = time.perf_counter() - start
        stats = tier.stats
        errors = sum(stats.errors.values())
        operations = stats.hits + stats.misses + stats.chunks_written + errors
        return TierHealth(
            name=tier.name,
            url=tier.driver.config.redacted_url(),
            reachable=error is None,
            latency_s=latency,
            error=error,
            errors=errors,
            error_rate=errors / operations if operations else 0.0,
            entries=len(tier.index),
            used_bytes=tier.index.used_bytes,
            capacity_bytes=tier.capacity,
        )

    def scope_stats(self, scope: Scope | None = None) -> ScopeStats:
        """What the tiers hold of ``scope`` (from the store's indexes) and the
        lookup/retrieve counters of its namespaces: nothing of anyone else's."""
        prefix = self._scope_prefix(scope)
        tiers = []
        for tier in self.tiers:
            held = [(k, size) for k, size in tier.index.eviction_order() if k.startswith(prefix)]
            tiers.append(
                ScopeTierUsage(
                    name=tier.name,
                    entries=len(held),
                    used_bytes=sum(size for _, size in held),
                    capacity_bytes=tier.capacity,
                    pinned=sum(1 for key, _ in held if key in self._pinned),
                )
            )
        counters = ScopeCounters()
        for key, scope_counters in self._scopes.items():
            if key.startswith(prefix):
                counters.add(scope_counters)
        return ScopeStats(scope=self._resolve(scope), tiers=tuple(tiers), counters=counters)

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
        """Finish background writes, then close every driver (a view: nothing)."""
        if self._closed or self._root is not self:
            return
        await self.flush()
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for reconnect in self._reconnects:
            reconnect.cancel()
        await asyncio.gather(*self._reconnects, return_exceptions=True)
        self.metrics.close()
        for writer in self._writers:
            writer.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)
        for tier in self.tiers:
            await tier.cancel_abandoned()
            await tier.driver.close()
        self._executor.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._root._closed:
            raise InvalidArgumentError("the store is closed")

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: func(*args, **kwargs))

    async def __aenter__(self) -> AsyncKVStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _open_tier_driver(position: int, config: TierConfig) -> Driver[Any]:
    """The driver of a tier; for a tier below the first that is not ``required``, an
    ``OfflineDriver`` in place of one that cannot be reached now."""
    try:
        return await open_driver(config.url)
    except KVStoreError as exc:
        if position == 0 or config.required or not exc.retryable:
            raise
        log.warning(
            "tier %d (%s) is down at open: %s; it serves misses and is retried in the background",
            position,
            exc.driver,
            exc,
        )
        return OfflineDriver.standing_in(config.url, config.capacity, str(exc))


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
    def loop_thread(self) -> LoopThread:
        """The loop thread the store's async half runs on."""
        return self._loop

    @property
    def tiers(self) -> list[Tier]:
        return self._store.tiers

    def scoped(self, namespace: Namespace) -> KVStore:
        """This store seen through another namespace (see ``AsyncKVStore.scoped``)."""
        return KVStore(self._store.scoped(namespace), self._loop)

    def keys(self, tokens: TokenIds) -> list[bytes]:
        return self._store.keys(tokens)

    def lookup(self, tokens: TokenIds) -> LookupResult:
        return self._loop.run(self._store.lookup(tokens))

    def contains(self, tokens: TokenIds) -> list[bool]:
        return self._loop.run(self._store.contains(tokens))

    def store(self, tokens: TokenIds, kv: torch.Tensor) -> StoreResult:
        return self._loop.run(self._store.store(tokens, kv))

    def named_keys(self, names: Sequence[bytes]) -> list[bytes]:
        return self._store.named_keys(names)

    def locate(self, keys: Sequence[bytes]) -> tuple[str, ...]:
        return self._loop.run(self._store.locate(keys))

    def store_chunks(self, keys: Sequence[bytes], chunks: Sequence[torch.Tensor]) -> StoreResult:
        return self._loop.run(self._store.store_chunks(keys, chunks))

    def submit_store_chunks(
        self, keys: Sequence[bytes], chunks: Sequence[torch.Tensor]
    ) -> Future[StoreResult]:
        """Start ``store_chunks`` on the loop thread and return at once, with a future
        of its result.

        For callers that must not wait for encoding and tier writes, such as an
        engine's forward pass handing over the KV it just computed. The chunks
        are read after this returns: leave them unchanged until the future is done.
        """
        return asyncio.run_coroutine_threadsafe(
            self._store.store_chunks(keys, chunks), self._loop.loop
        )

    def retrieve_chunks(
        self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]
    ) -> tuple[str, ...]:
        return self._loop.run(self._store.retrieve_chunks(keys, outs))

    def retrieve(self, tokens: TokenIds, out: torch.Tensor | None = None) -> RetrieveResult:
        return self._loop.run(self._store.retrieve(tokens, out))

    def pin(self, tokens: TokenIds, ttl_s: float | None = None) -> int:
        return self._loop.run(self._store.pin(tokens, ttl_s))

    def unpin(self, tokens: TokenIds) -> int:
        return self._loop.run(self._store.unpin(tokens))

    def evict(self, tokens: TokenIds) -> int:
        return self._loop.run(self._store.evict(tokens))

    def clear(self, tier: str | None = None, *, scope: Scope | None = None) -> int:
        return self._loop.run(self._store.clear(tier, scope=scope))

    def move(
        self,
        source: str,
        target: str,
        tokens: TokenIds | None = None,
        *,
        migrate: bool = False,
        scope: Scope | None = None,
    ) -> MoveResult:
        return self._loop.run(
            self._store.move(source, target, tokens, migrate=migrate, scope=scope)
        )

    def compress(
        self, tier: str, codecs: str, tokens: TokenIds | None = None, *, scope: Scope | None = None
    ) -> CompressResult:
        return self._loop.run(self._store.compress(tier, codecs, tokens, scope=scope))

    def health(self, timeout_s: float = 5.0) -> tuple[TierHealth, ...]:
        return self._loop.run(self._store.health(timeout_s))

    def scope_stats(self, scope: Scope | None = None) -> ScopeStats:
        return self._loop.run(self._scope_stats(scope))

    async def _scope_stats(self, scope: Scope | None) -> ScopeStats:
        return self._store.scope_stats(scope)

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
    "CompressResult",
    "KVStore",
    "LookupResult",
    "MoveResult",
    "Progress",
    "RetrieveResult",
    "Scope",
    "ScopeCounters",
    "ScopeStats",
    "ScopeTierUsage",
    "StoreResult",
    "StoreStats",
    "TierHealth",
    "open_store",
]
