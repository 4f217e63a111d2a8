"""A store's state, its namespace's keys, and which tier holds each chunk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from typing_extensions import Self

from kvstore.buffers import BufferPool
from kvstore.chunk import raw_chunk_size
from kvstore.codecs import KeyRing
from kvstore.config import StoreConfig
from kvstore.digest import THREADS as COPY_THREADS
from kvstore.digest import side_by_side
from kvstore.errors import (
    ConfigError,
    InvalidKeyError,
    KVStoreError,
    NotFoundError,
    StoreClosedError,
)
from kvstore.keys import (
    STORAGE_KEY_BYTES,
    TAG_BYTES,
    Namespace,
    TokenIds,
    chunk_key_of,
    chunk_keys,
    named_chunk_key,
    storage_prefix,
)
from kvstore.layout import KVLayout
from kvstore.metrics import StoreMetrics
from kvstore.pins import Pins
from kvstore.results import (
    ScopeCounters,
)
from kvstore.store.queue import QueueBudget, WriteJob
from kvstore.tier import Tier, check_codecs

T = TypeVar("T")
J = TypeVar("J")


log = logging.getLogger("kvstore.store")


class StoreState:
    """What every part of the store shares: its config, tiers and namespace."""

    config: StoreConfig
    tiers: list[Tier]
    namespace: Namespace
    layout: KVLayout
    chunk_tokens: int
    metrics: StoreMetrics
    _keys: KeyRing
    _root: StoreState
    _scopes: dict[bytes, ScopeCounters]
    _digest: bytes
    _prefix: bytes
    _counters: ScopeCounters
    _chunk_size: int
    _pins: Pins
    _sweeper: asyncio.Task[None] | None
    _pool: BufferPool
    _executor: ThreadPoolExecutor
    _budget: QueueBudget
    _queues: list[asyncio.Queue[WriteJob]]
    _closed: bool

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

    def scoped(self, namespace: Namespace) -> Self:
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

    def keys(self, tokens: TokenIds, *, after: bytes | None = None) -> list[bytes]:
        """The storage keys of every whole chunk of ``tokens``: this namespace's
        prefix, then the chunk key (docs/key-spec.md). ``after``: the storage key
        of the chunk ``tokens`` follow, so a prompt that grows (a turn's
        generated tokens) is hashed only for its new chunks."""
        prefix = self._prefix
        chained = None if after is None else chunk_key_of(self._own_keys([after])[0])
        return [
            prefix + key
            for key in chunk_keys(self._digest, tokens, self.chunk_tokens, after=chained)
        ]

    def named_keys(self, names: Sequence[bytes]) -> list[bytes]:
        """Storage keys of chunks an engine names itself (SGLang's page hashes)
        instead of by tokens: this namespace's prefix, then ``named_chunk_key``."""
        return [self._prefix + named_chunk_key(self._digest, name) for name in names]

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

    async def _contains(self, tier: Tier, keys: list[bytes]) -> list[bool]:
        """Ask a shared ``tier`` whether it holds ``keys``; a tier down or failing
        answers no."""
        if tier.down is not None:
            tier.stats.misses += len(keys)
            return [False] * len(keys)
        try:
            return await tier.call("contains_many", tier.driver.contains_many(keys))
        except KVStoreError:
            return [False] * len(keys)

    async def _in_tier(self, tier: Tier, keys: list[bytes]) -> list[bool]:
        """Whether ``tier`` holds each of ``keys``: its index says so or, for a
        shared tier (which others write to), the tier does when asked."""
        held = [key in tier.index for key in keys]
        missing = [i for i, hit in enumerate(held) if not hit]
        if tier.shared and missing:
            for i, hit in zip(missing, await self._contains(tier, [keys[i] for i in missing])):
                held[i] = hit
        return held

    async def _where(self, keys: list[bytes]) -> list[int | None]:
        """The position of the fastest tier holding each of ``keys``, or ``None``.
        Every index is consulted before a shared tier is asked about what is left."""
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
        return where

    async def _locate(self, keys: list[bytes]) -> list[int]:
        """The fastest tier holding each chunk of the cached prefix."""
        prefix: list[int] = []
        for position in await self._where(keys):
            if position is None:
                break
            prefix.append(position)
        return prefix

    def _chunks_per_batch(self) -> int:
        """How many whole chunks of KV make one I/O batch (``io_batch_bytes``)."""
        return max(1, self.config.io_batch_bytes // self.layout.nbytes(self.chunk_tokens))

    def _tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise NotFoundError(f"no tier named {name!r} (tiers: {[t.name for t in self.tiers]})")

    def _check_open(self) -> None:
        if self._root._closed:
            raise StoreClosedError("the store is closed")

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: func(*args, **kwargs))

    async def _run_each(self, func: Callable[[J], T], jobs: Sequence[J]) -> list[T]:
        """``[func(job) for job in jobs]`` on the codec pool, the jobs cut into one
        run per core (``COPY_THREADS``), each run done in order on one thread.

        One hand-off per run instead of per job: each hand-off takes the GIL on
        the loop and on a codec thread and wakes the loop, which on 3 MiB chunks
        cost as much as copying them (docs/benchmarks.md). The first exception
        a job raises ends its run and is raised once every run has ended; a
        cancelled caller also waits for the runs, so no thread is still writing
        into memory the caller goes on to free or reuse."""
        count = min(COPY_THREADS, len(jobs))
        runs = [jobs[len(jobs) * n // count : len(jobs) * (n + 1) // count] for n in range(count)]
        futures = [self._executor.submit(_in_order, func, run, count) for run in runs]
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
        finally:
            concurrent.futures.wait(futures)
        return [result for run in results for result in run]


def _in_order(func: Callable[[J], T], jobs: Sequence[J], runs: int) -> list[T]:
    """One of ``runs`` runs at once: its copies leave the other cores to the others."""
    with side_by_side(runs):
        return [func(job) for job in jobs]
