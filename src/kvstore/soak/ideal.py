"""The hit rate an ideal cache of the soak's capacities would reach on the same trace.

The ideal is exact LRU with no faults, no failed writes and a perfect
ledger, replayed on the requests the workers actually made, in the order
they made them. Each worker has a private LRU (its cpu and nvme tiers: with
write-through the lower tier holds what the upper does, so the larger of the
two; with write-back they add up) and all workers share one LRU of the shared
tier's capacity. A request hits the longest prefix of its chunks held by its
worker's LRU or the shared one, then every chunk of it is used in both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


class LRU:
    """A set of names with a capacity in entries, least recently used out first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def use(self, name: str) -> None:
        self._entries[name] = None
        self._entries.move_to_end(name)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace: who made it, its chunk names, whether it completed."""

    worker: int
    chunk_ids: list[str]
    completed: bool


@dataclass(frozen=True)
class IdealResult:
    requested_chunks: int
    hit_chunks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_chunks / self.requested_chunks if self.requested_chunks else 0.0


def replay(trace: Iterable[TraceRequest], private_chunks: int, shared_chunks: int) -> IdealResult:
    """Hits of the ideal cache over the completed requests of ``trace`` (every
    request, completed or not, updates the LRUs, as it did the real tiers)."""
    private: dict[int, LRU] = {}
    shared = LRU(shared_chunks)
    requested = hits = 0
    for request in trace:
        own = private.setdefault(request.worker, LRU(private_chunks))
        prefix = 0
        for name in request.chunk_ids:
            if name not in own and name not in shared:
                break
            prefix += 1
        if request.completed:
            requested += len(request.chunk_ids)
            hits += prefix
        for name in request.chunk_ids:
            own.use(name)
            shared.use(name)
    return IdealResult(requested, hits)
