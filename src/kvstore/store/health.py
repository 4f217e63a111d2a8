"""Health probes and statistics."""

from __future__ import annotations

import asyncio
import math
import time

from kvstore.errors import (
    InvalidArgumentError,
    KVStoreError,
)
from kvstore.keys import Scope
from kvstore.results import (
    ScopeCounters,
    ScopeStats,
    ScopeTierUsage,
    StoreStats,
    TierHealth,
)
from kvstore.store.admin import AdminOperations
from kvstore.tier import Tier

_PROBE_KEY = b"kvstore-health-probe"
"""The key ``health`` asks each tier about; nothing stores it."""


class HealthReports(AdminOperations):
    """health, scope_stats and stats."""

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
        pinned = self._pins.live()
        tiers = []
        for tier in self.tiers:
            held = [(k, size) for k, size in tier.index.eviction_order() if k.startswith(prefix)]
            tiers.append(
                ScopeTierUsage(
                    name=tier.name,
                    entries=len(held),
                    used_bytes=sum(size for _, size in held),
                    capacity_bytes=tier.capacity,
                    pinned=sum(1 for key, _ in held if key in pinned),
                )
            )
        counters = ScopeCounters()
        for key, scope_counters in self._scopes.items():
            if key.startswith(prefix):
                counters.add(scope_counters)
        return ScopeStats(scope=self._resolve(scope), tiers=tuple(tiers), counters=counters)

    def stats(self) -> StoreStats:
        pinned = self._pins.live()
        return StoreStats(
            tiers=tuple(tier.snapshot(pinned) for tier in self.tiers),
            queued_bytes=self._budget.used,
            pinned_chunks=len(pinned),
        )
