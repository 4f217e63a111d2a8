"""What the store's operations return: results, statistics, progress and scopes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from kvstore.keys import Scope


@dataclass
class TierStats:
    """Counters of one tier since the store opened."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    evictions: int = 0
    integrity_failures: int = 0
    dropped_writes: int = 0
    dropped_writebacks: int = 0
    internal_errors: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class TierSnapshot:
    """What ``stats()`` reports of one tier."""

    name: str
    url: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    pinned: int
    up: bool
    stats: TierStats


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
    """What ``store`` did: whole chunks seen, newly written, already cached, not
    stored; the ``*_tokens`` properties count the same in tokens, as
    ``LookupResult`` and ``RetrieveResult`` do."""

    chunks: int
    written: int
    already_cached: int
    failed: int
    chunk_tokens: int

    @property
    def tokens(self) -> int:
        """Tokens in the whole chunks seen."""
        return self.chunks * self.chunk_tokens

    @property
    def written_tokens(self) -> int:
        return self.written * self.chunk_tokens

    @property
    def cached_tokens(self) -> int:
        """Tokens already cached before this call."""
        return self.already_cached * self.chunk_tokens

    @property
    def failed_tokens(self) -> int:
        return self.failed * self.chunk_tokens


class ChunkTiers(tuple[str, ...]):
    """The tier each chunk of a prefix is in (``locate``) or came from
    (``retrieve_chunks``), fastest-first names, one per chunk; a tuple, as in
    0.1, with the prefix's length in chunks and tokens."""

    chunk_tokens: int

    def __new__(cls, tiers: Iterable[str], chunk_tokens: int) -> ChunkTiers:
        made = super().__new__(cls, tiers)
        made.chunk_tokens = chunk_tokens
        return made

    @property
    def chunks(self) -> int:
        return len(self)

    @property
    def tokens(self) -> int:
        return len(self) * self.chunk_tokens


@dataclass(frozen=True)
class StoreStats:
    tiers: tuple[TierSnapshot, ...]
    queued_bytes: int
    pinned_chunks: int


@dataclass
class ScopeCounters:
    """Lookups and retrieves of one namespace, so a tenant sees its own counts only."""

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    retrieves: int = 0
    retrieved_tokens: int = 0

    def note_lookup(self, requested: int, found: int) -> None:
        self.lookups += 1
        self.lookup_tokens += requested
        self.hit_tokens += found

    def note_retrieve(self, loaded: int) -> None:
        self.retrieves += 1
        self.retrieved_tokens += loaded

    def add(self, other: ScopeCounters) -> None:
        self.lookups += other.lookups
        self.lookup_tokens += other.lookup_tokens
        self.hit_tokens += other.hit_tokens
        self.retrieves += other.retrieves
        self.retrieved_tokens += other.retrieved_tokens


@dataclass(frozen=True)
class ScopeTierUsage:
    """What one tier holds of a scope, as the store's index knows it."""

    name: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    pinned: int


@dataclass(frozen=True)
class ScopeStats:
    """``scope_stats()``: per-tier usage and the counters of one scope only."""

    scope: Scope
    tiers: tuple[ScopeTierUsage, ...]
    counters: ScopeCounters


@dataclass(frozen=True)
class TierHealth:
    """``health()`` of one tier.

    reachable: a probe call (``contains_many`` of one key nothing stores)
        answered within the timeout; ``error`` says why not.
    latency_s: how long the probe took.
    error_rate: driver errors per chunk operation (hits, misses, writes and
        errors) since the store opened.
    """

    name: str
    url: str
    reachable: bool
    latency_s: float
    error: str | None
    errors: int
    error_rate: float
    entries: int
    used_bytes: int
    capacity_bytes: int


@dataclass(frozen=True)
class Progress:
    """How far a long operation (clear, move, compress) has got."""

    done_chunks: int
    total_chunks: int
    done_bytes: int
    total_bytes: int


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class MoveResult:
    """What ``move`` did: chunks looked at, copied, already in the target, bad
    (failed verification and dropped), failed (unread or not written), and
    removed from the source (``migrate``)."""

    chunks: int
    copied: int
    already_there: int
    corrupt: int
    failed: int
    removed: int
    bytes_copied: int


@dataclass(frozen=True)
class CompressResult:
    """What ``compress`` did: chunks looked at, re-encoded, already in the codec
    stack, bad (dropped), failed, and the bytes of the re-encoded chunks before and after."""

    chunks: int
    recoded: int
    unchanged: int
    corrupt: int
    failed: int
    bytes_before: int
    bytes_after: int
