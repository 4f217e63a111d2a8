"""The store as blocking calls, for code outside an event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from kvstore.config import ConfigSource, StoreConfig
from kvstore.driver import Driver
from kvstore.keys import (
    Namespace,
    Scope,
    TokenIds,
)
from kvstore.results import (
    ChunkTiers,
    CompressResult,
    LookupResult,
    MoveResult,
    RetrieveResult,
    ScopeStats,
    StoreResult,
    StoreStats,
    TierHealth,
)
from kvstore.store.async_store import AsyncKVStore
from kvstore.store.loans import ChunkLoan
from kvstore.sync import LoopThread, shared_loop
from kvstore.tier import Tier


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
        """The same store's async API, for coroutines on ``loop_thread``."""
        return self._store

    @property
    def config(self) -> StoreConfig:
        return self._store.config

    @property
    def namespace(self) -> Namespace:
        return self._store.namespace

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

    def keys(self, tokens: TokenIds, *, after: bytes | None = None) -> list[bytes]:
        return self._store.keys(tokens, after=after)

    def lookup(self, tokens: TokenIds) -> LookupResult:
        return self._loop.run(self._store.lookup(tokens))

    def contains(self, tokens: TokenIds) -> list[bool]:
        return self._loop.run(self._store.contains(tokens))

    def store(self, tokens: TokenIds, kv: torch.Tensor) -> StoreResult:
        return self._loop.run(self._store.store(tokens, kv))

    def named_keys(self, names: Sequence[bytes]) -> list[bytes]:
        return self._store.named_keys(names)

    def locate(self, keys: Sequence[bytes]) -> ChunkTiers:
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

    def retrieve_chunks(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> ChunkTiers:
        return self._loop.run(self._store.retrieve_chunks(keys, outs))

    @contextlib.contextmanager
    def borrow_chunks(self, keys: Sequence[bytes]) -> Iterator[ChunkLoan]:
        """``AsyncKVStore.borrow_chunks`` as a ``with`` block: the loan ends with it."""
        loan = self._loop.run(self._store.borrow_chunks(keys))
        try:
            yield loan
        finally:
            self._loop.run(loan.release())

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


def open_store(config: ConfigSource, namespace: Namespace) -> KVStore:
    """A blocking store from a config in any form ``StoreConfig.load`` accepts: a
    ``StoreConfig``, a YAML path, a tier URL, a list of tiers or a config mapping.
    ``StoreConfig.namespace`` makes a namespace that agrees with the config."""
    return KVStore.open(StoreConfig.load(config, option="open_store config"), namespace)
