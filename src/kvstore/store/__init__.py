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

from kvstore.keys import Scope
from kvstore.results import (
    ChunkTiers,
    CompressResult,
    LookupResult,
    MoveResult,
    Progress,
    RetrieveResult,
    ScopeCounters,
    ScopeStats,
    ScopeTierUsage,
    StoreResult,
    StoreStats,
    TierHealth,
)
from kvstore.store.async_store import AsyncKVStore
from kvstore.store.blocking import KVStore, open_store
from kvstore.store.loans import ChunkLoan

__all__ = [
    "AsyncKVStore",
    "ChunkLoan",
    "ChunkTiers",
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
