"""Prometheus metrics of every open store, in a registry of kvstore's own.

The counters a store keeps for ``stats()`` (hits, misses, bytes, evictions,
errors by type) and its levels (bytes used, capacity, queued writes) are read
when Prometheus scrapes, by one custom collector: they cost the hot path
nothing and always agree with ``stats()``. Only latencies are recorded as they
happen, into histogram children bound per store, tier and operation when the
store opens, so no label is looked up per key or per chunk.

Every series carries a ``store`` label (``StoreConfig.name``, made unique in
the process), so several stores in one process stay apart. ``render_metrics``
is the body of a ``/metrics`` response; ``register_into`` adds the same
series to an application's own registry instead. docs/metrics.md lists them.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from kvstore.results import StoreStats

log = logging.getLogger("kvstore.metrics")
P = ParamSpec("P")
R = TypeVar("R")

DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Latency buckets in seconds: from an in-memory tier (~100 µs) to a slow object store."""

DRIVER_OPERATIONS = (
    "put_many",
    "get_many",
    "lend_many",
    "borrow_many",
    "contains_many",
    "delete_many",
)
"""Driver calls whose histogram children are bound when a store opens."""

REQUESTS = (
    "lookup",
    "contains",
    "store",
    "retrieve",
    "locate",
    "store_chunks",
    "retrieve_chunks",
    "borrow_chunks",
)
"""Store methods timed by ``kvstore_request_duration_seconds``."""

PREFIX_OPERATIONS = ("lookup", "retrieve", "locate", "retrieve_chunks", "borrow_chunks")
"""Store methods that count requested and cached-prefix tokens: by token ids
(``lookup``, ``retrieve``) and by chunk names (``locate``, ``retrieve_chunks``,
``borrow_chunks``)."""

_DRIVER_DURATION = Histogram(
    "kvstore_operation_duration_seconds",
    "Duration of driver calls made by the store, per tier and operation, timeouts included.",
    ("store", "tier", "operation"),
    unit="seconds",
    buckets=DURATION_BUCKETS,
    registry=None,
)
_REQUEST_DURATION = Histogram(
    "kvstore_request_duration_seconds",
    "Duration of store calls (lookup, retrieve, store, their named-chunk forms, contains).",
    ("store", "operation"),
    unit="seconds",
    buckets=DURATION_BUCKETS,
    registry=None,
)

_STORES: dict[str, StoreMetrics] = {}
_STORES_LOCK = threading.Lock()


class OperationTimings:
    """Latency histograms of one tier's driver calls, once bound to a store."""

    def __init__(self) -> None:
        self._labels: tuple[str, str] | None = None
        self._children: dict[str, Histogram] = {}

    def bind(self, store: str, tier: str) -> None:
        """Create the children of the usual operations for ``store`` and ``tier``."""
        self._labels = (store, tier)
        self._children = {op: _DRIVER_DURATION.labels(store, tier, op) for op in DRIVER_OPERATIONS}

    def observe(self, operation: str, seconds: float) -> None:
        """Record one call; does nothing before ``bind`` (a tier still being opened)."""
        child = self._children.get(operation)
        if child is None:
            if self._labels is None:
                return
            child = self._children[operation] = _DRIVER_DURATION.labels(*self._labels, operation)
        child.observe(seconds)

    def unbind(self) -> None:
        """Drop this tier's series from the exposition."""
        if self._labels is not None:
            for operation in self._children:
                _DRIVER_DURATION.remove(*self._labels, operation)
        self._labels = None
        self._children = {}


class TimedTier(Protocol):
    """What a store's metrics need of each of its tiers."""

    name: str
    timings: OperationTimings


class StoreMetrics:
    """The series of one open store, labelled ``store=<label>``.

    ``stats`` and ``queue_depths`` (background writes waiting per tier, in
    chunks) are called at scrape time, from the scraping thread: they must
    only read.
    """

    def __init__(
        self,
        name: str,
        tiers: Sequence[TimedTier],
        *,
        chunk_tokens: int,
        queue_limit: int,
        stats: Callable[[], StoreStats],
        queue_depths: Callable[[], Sequence[int]],
    ) -> None:
        self._chunk_tokens = chunk_tokens
        self._queue_limit = queue_limit
        self._stats = stats
        self._queue_depths = queue_depths
        self._tiers = list(tiers)
        self.requested_tokens = dict.fromkeys(PREFIX_OPERATIONS, 0)
        self.prefix_tokens = dict.fromkeys(PREFIX_OPERATIONS, 0)
        with _STORES_LOCK:
            self.label = _free_label(name)
            if self.label != name:
                log.warning(
                    "two open stores are named %r; metrics label this one %r", name, self.label
                )
            self.requests = {op: _REQUEST_DURATION.labels(self.label, op) for op in REQUESTS}
            for tier in self._tiers:
                tier.timings.bind(self.label, tier.name)
            _STORES[self.label] = self

    def count_prefix(self, operation: str, requested: int, found: int) -> None:
        """Count one lookup or retrieve: whole-chunk tokens asked for and found."""
        self.requested_tokens[operation] += requested
        self.prefix_tokens[operation] += found

    def close(self) -> None:
        """Remove the store's series; later scrapes no longer show it."""
        with _STORES_LOCK:
            if _STORES.get(self.label) is not self:
                return
            del _STORES[self.label]
            for operation in self.requests:
                _REQUEST_DURATION.remove(self.label, operation)
            for tier in self._tiers:
                tier.timings.unbind()

    def _add_samples(self, families: dict[str, _Family]) -> None:
        stats = self._stats()
        store = self.label
        for operation in PREFIX_OPERATIONS:
            labels = [store, operation]
            families["requested"].add_metric(labels, self.requested_tokens[operation])
            families["prefix"].add_metric(labels, self.prefix_tokens[operation])
        families["queue_bytes"].add_metric([store], stats.queued_bytes)
        families["queue_limit"].add_metric([store], self._queue_limit)
        for tier, depth in zip(stats.tiers, self._queue_depths()):
            labels = [store, tier.name]
            counts = tier.stats
            families["hits"].add_metric(labels, counts.hits)
            families["misses"].add_metric(labels, counts.misses)
            families["hit_tokens"].add_metric(labels, counts.hits * self._chunk_tokens)
            families["bytes_read"].add_metric(labels, counts.bytes_read)
            families["bytes_written"].add_metric(labels, counts.bytes_written)
            families["chunks_written"].add_metric(labels, counts.chunks_written)
            families["evictions"].add_metric(labels, counts.evictions)
            families["integrity"].add_metric(labels, counts.integrity_failures)
            families["dropped"].add_metric(labels, counts.dropped_writes)
            families["dropped_writebacks"].add_metric(labels, counts.dropped_writebacks)
            families["internal"].add_metric(labels, counts.internal_errors)
            families["up"].add_metric(labels, int(tier.up))
            # dict() of a Counter copies it in one step under the GIL, so a
            # first error of a new kind on the store's thread cannot break the scrape.
            for error, count in sorted(dict(counts.errors).items()):
                families["errors"].add_metric([*labels, error], count)
            families["used"].add_metric(labels, tier.used_bytes)
            families["capacity"].add_metric(labels, tier.capacity_bytes)
            families["entries"].add_metric(labels, tier.entries)
            families["pinned"].add_metric(labels, tier.pinned)
            families["queue_chunks"].add_metric(labels, depth)


class _Measured(Protocol):
    metrics: StoreMetrics


M = TypeVar("M", bound=_Measured)
Method = Callable[Concatenate[M, P], Coroutine[Any, Any, R]]


def timed(operation: str) -> Callable[[Method[M, P, R]], Method[M, P, R]]:
    """Record each call of a store method in ``kvstore_request_duration_seconds``."""

    def decorate(method: Method[M, P, R]) -> Method[M, P, R]:
        @functools.wraps(method)
        async def timed_method(self: M, /, *args: P.args, **kwargs: P.kwargs) -> R:
            start = time.perf_counter()
            try:
                return await method(self, *args, **kwargs)
            finally:
                self.metrics.requests[operation].observe(time.perf_counter() - start)

        return timed_method

    return decorate


def _free_label(name: str) -> str:
    label, number = name, 1
    while label in _STORES:
        number += 1
        label = f"{name}-{number}"
    return label


_Family = CounterMetricFamily | GaugeMetricFamily


def _families() -> dict[str, _Family]:
    """Fresh, empty families of every scrape-time series."""
    tier = ("store", "tier")
    operation = ("store", "operation")
    return {
        "hits": CounterMetricFamily(
            "kvstore_lookup_hits",
            "Chunks a tier served to retrieve, verified.",
            labels=tier,
        ),
        "misses": CounterMetricFamily(
            "kvstore_lookup_misses",
            "Chunk reads of a tier that came back empty (gone, or the driver call failed).",
            labels=tier,
        ),
        "hit_tokens": CounterMetricFamily(
            "kvstore_hit_tokens",
            "Tokens of KV a tier served to retrieve (hits times chunk_tokens).",
            labels=tier,
        ),
        "bytes_read": CounterMetricFamily(
            "kvstore_read_bytes",
            "Encoded chunk bytes read from a tier for hits.",
            labels=tier,
            unit="bytes",
        ),
        "bytes_written": CounterMetricFamily(
            "kvstore_written_bytes",
            "Encoded chunk bytes written to a tier.",
            labels=tier,
            unit="bytes",
        ),
        "chunks_written": CounterMetricFamily(
            "kvstore_chunks_written", "Chunks written to a tier.", labels=tier
        ),
        "evictions": CounterMetricFamily(
            "kvstore_evictions", "Chunks a tier evicted to make room.", labels=tier
        ),
        "integrity": CounterMetricFamily(
            "kvstore_integrity_failures",
            "Chunks read from a tier that failed verification (dropped, treated as misses).",
            labels=tier,
        ),
        "dropped": CounterMetricFamily(
            "kvstore_dropped_writes",
            "Chunk writes to a tier given up: no room left, the write queue was full, "
            "or the tier is down.",
            labels=tier,
        ),
        "dropped_writebacks": CounterMetricFamily(
            "kvstore_dropped_writebacks",
            "Write-back chunks a tier evicted that did not reach the tier below "
            "(unreadable, corrupt, refused there).",
            labels=tier,
        ),
        "internal": CounterMetricFamily(
            "kvstore_internal_errors",
            "Exceptions outside kvstore's error taxonomy (bugs) around a tier's calls; "
            "each was logged and treated as a miss.",
            labels=tier,
        ),
        "errors": CounterMetricFamily(
            "kvstore_driver_errors",
            "Failed tier calls by error type (each was treated as a miss).",
            labels=(*tier, "error"),
        ),
        "requested": CounterMetricFamily(
            "kvstore_requested_tokens",
            "Tokens in the whole chunks that lookups and retrieves were asked for.",
            labels=operation,
        ),
        "prefix": CounterMetricFamily(
            "kvstore_prefix_tokens",
            "Tokens of the cached prefix that lookups found and retrieves loaded.",
            labels=operation,
        ),
        "up": GaugeMetricFamily(
            "kvstore_tier_up",
            "1 while a tier's driver is open, 0 while it is down (retried in the background).",
            labels=tier,
        ),
        "used": GaugeMetricFamily(
            "kvstore_tier_used_bytes",
            "Room the chunks a tier holds occupy (their footprints).",
            labels=tier,
            unit="bytes",
        ),
        "capacity": GaugeMetricFamily(
            "kvstore_tier_capacity_bytes",
            "A tier's capacity (a hard limit).",
            labels=tier,
            unit="bytes",
        ),
        "entries": GaugeMetricFamily("kvstore_tier_entries", "Chunks a tier holds.", labels=tier),
        "pinned": GaugeMetricFamily(
            "kvstore_tier_pinned_chunks", "Pinned chunks a tier holds.", labels=tier
        ),
        "queue_chunks": GaugeMetricFamily(
            "kvstore_write_queue_chunks",
            "Chunks waiting for a background write to a tier.",
            labels=tier,
        ),
        "queue_bytes": GaugeMetricFamily(
            "kvstore_write_queue_bytes",
            "Bytes of chunks waiting for background writes, all tiers.",
            labels=("store",),
            unit="bytes",
        ),
        "queue_limit": GaugeMetricFamily(
            "kvstore_write_queue_limit_bytes",
            "The store's queue_bytes: the most bytes background writes may hold.",
            labels=("store",),
            unit="bytes",
        ),
    }


class _StoresCollector:
    """Every open store's series, read at scrape time."""

    def describe(self) -> Iterable[Metric]:
        return [*_families().values(), *_REQUEST_DURATION.describe(), *_DRIVER_DURATION.describe()]

    def collect(self) -> Iterable[Metric]:
        with _STORES_LOCK:
            stores = list(_STORES.values())
        families = _families()
        for store in stores:
            store._add_samples(families)
        return [*families.values(), *_REQUEST_DURATION.collect(), *_DRIVER_DURATION.collect()]


COLLECTOR = _StoresCollector()
"""The collector of every kvstore series; register it wherever they should appear."""

REGISTRY = CollectorRegistry(auto_describe=True)
"""kvstore's own registry: its series plus the process, platform and GC collectors."""
for _collector in (COLLECTOR, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)


def register_into(registry: CollectorRegistry) -> None:
    """Expose kvstore's series through an application's own ``registry`` too
    (for example ``prometheus_client.REGISTRY``); process metrics stay out."""
    registry.register(COLLECTOR)


def render_metrics(accept: str | None = None) -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` response for ``REGISTRY``.

    ``accept`` is the request's Accept header: OpenMetrics when it asks for
    ``application/openmetrics-text``, else the Prometheus text format.
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


__all__ = [
    "COLLECTOR",
    "DURATION_BUCKETS",
    "REGISTRY",
    "OperationTimings",
    "StoreMetrics",
    "register_into",
    "render_metrics",
    "timed",
]
