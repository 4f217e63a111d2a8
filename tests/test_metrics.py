"""Prometheus metrics of real stores, read back through prometheus_client's parsers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from kvstore.config import StoreConfig
from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.errors import TransientError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.metrics import COLLECTOR, register_into, render_metrics
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("metrics-model", "rev", LAYOUT, chunk_tokens=CHUNK)
CHUNK_BYTES = LAYOUT.nbytes(CHUNK) + 128  # payload plus header
CHUNK_ROOM = 256 << 10  # what one such chunk occupies in cpu: a whole page

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape() -> Samples:
    body, content_type = render_metrics()
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def series_of(samples: Samples, store: str) -> list[str]:
    return [name for name, labels in samples if ("store", store) in labels]


def config(name: str, *tiers: Any, **options: Any) -> StoreConfig:
    return StoreConfig.parse({"tiers": list(tiers), "chunk_tokens": CHUNK, "name": name, **options})


@pytest.fixture
async def two_tiers(tmp_path: Path) -> AsyncIterator[AsyncKVStore]:
    """A cpu tier that holds four chunks above an nvme tier, write-through."""
    store = await AsyncKVStore.open(
        config(
            "counters",
            {"url": "cpu://?capacity=16MiB", "name": "ram", "max_bytes": 4 * CHUNK_ROOM},
            {"url": f"nvme://{tmp_path}/nvme?capacity=64MiB", "name": "disk"},
        ),
        NAMESPACE,
    )
    yield store
    await store.close()


async def test_counters_and_levels_match_stats(two_tiers: AsyncKVStore) -> None:
    ids, kv = prompt(0, 6 * CHUNK + 5)
    await two_tiers.store(ids, kv)
    await two_tiers.flush()
    loaded = await two_tiers.retrieve(ids)
    assert loaded.tokens == 6 * CHUNK
    await two_tiers.flush()
    unknown, _ = prompt(1, 3 * CHUNK)
    assert (await two_tiers.lookup(unknown)).tokens == 0
    assert (await two_tiers.lookup(ids)).tokens == 6 * CHUNK
    assert await two_tiers.pin(ids[: 2 * CHUNK]) == 2

    samples = scrape()
    stats = two_tiers.stats()
    for snapshot in stats.tiers:
        tier = {"store": "counters", "tier": snapshot.name}
        counts = snapshot.stats
        assert value(samples, "kvstore_lookup_hits_total", **tier) == counts.hits
        assert value(samples, "kvstore_lookup_misses_total", **tier) == counts.misses
        assert value(samples, "kvstore_hit_tokens_total", **tier) == counts.hits * CHUNK
        assert value(samples, "kvstore_read_bytes_total", **tier) == counts.bytes_read
        assert value(samples, "kvstore_written_bytes_total", **tier) == counts.bytes_written
        assert value(samples, "kvstore_chunks_written_total", **tier) == counts.chunks_written
        assert value(samples, "kvstore_evictions_total", **tier) == counts.evictions
        assert value(samples, "kvstore_dropped_writes_total", **tier) == counts.dropped_writes
        assert value(samples, "kvstore_tier_used_bytes", **tier) == snapshot.used_bytes
        assert value(samples, "kvstore_tier_capacity_bytes", **tier) == snapshot.capacity_bytes
        assert value(samples, "kvstore_tier_entries", **tier) == snapshot.entries
        assert value(samples, "kvstore_tier_pinned_chunks", **tier) == snapshot.pinned
        assert value(samples, "kvstore_write_queue_chunks", **tier) == 0
    ram, disk = (snapshot.stats for snapshot in stats.tiers)
    # six chunks through a four-chunk tier: two evicted on store, more on promotion
    assert ram.evictions >= 2 and disk.evictions == 0
    assert ram.hits + disk.hits == 6 and disk.hits >= 2
    assert disk.chunks_written == 6
    assert value(samples, "kvstore_tier_capacity_bytes", store="counters", tier="ram") == (
        4 * CHUNK_ROOM
    )
    assert value(samples, "kvstore_write_queue_bytes", store="counters") == stats.queued_bytes
    assert value(samples, "kvstore_write_queue_limit_bytes", store="counters") == 1 << 30

    lookup = {"store": "counters", "operation": "lookup"}
    retrieve = {"store": "counters", "operation": "retrieve"}
    assert value(samples, "kvstore_requested_tokens_total", **lookup) == 9 * CHUNK
    assert value(samples, "kvstore_prefix_tokens_total", **lookup) == 6 * CHUNK
    assert value(samples, "kvstore_requested_tokens_total", **retrieve) == 6 * CHUNK
    assert value(samples, "kvstore_prefix_tokens_total", **retrieve) == 6 * CHUNK

    assert value(samples, "kvstore_request_duration_seconds_count", **lookup) == 2
    assert value(samples, "kvstore_request_duration_seconds_count", **retrieve) == 1
    store_calls = value(
        samples, "kvstore_request_duration_seconds_count", store="counters", operation="store"
    )
    assert store_calls == 1
    disk_puts = {"store": "counters", "tier": "disk", "operation": "put_many"}
    disk_gets = {"store": "counters", "tier": "disk", "operation": "get_many"}
    ram_borrows = {"store": "counters", "tier": "ram", "operation": "borrow_many"}
    assert value(samples, "kvstore_operation_duration_seconds_count", **disk_puts) >= 1
    assert value(samples, "kvstore_operation_duration_seconds_count", **disk_gets) >= 1
    assert value(samples, "kvstore_operation_duration_seconds_count", **ram_borrows) >= 1
    assert value(samples, "kvstore_operation_duration_seconds_sum", **disk_gets) > 0


async def test_named_chunks_are_counted(two_tiers: AsyncKVStore) -> None:
    """The named-chunk calls engines such as SGLang use count like lookup and retrieve."""
    keys = two_tiers.named_keys([b"page-0", b"page-1", b"page-2"])
    _, kv = prompt(5, 3 * CHUNK)
    chunks = [kv[:, :, i * CHUNK : (i + 1) * CHUNK] for i in range(3)]
    await two_tiers.store_chunks(keys[:2], chunks[:2])
    assert len(await two_tiers.locate(keys)) == 2
    assert len(await two_tiers.retrieve_chunks(keys, [torch.empty_like(c) for c in chunks])) == 2
    samples = scrape()
    for operation in ("locate", "retrieve_chunks"):
        labels = {"store": "counters", "operation": operation}
        assert value(samples, "kvstore_requested_tokens_total", **labels) == 3 * CHUNK
        assert value(samples, "kvstore_prefix_tokens_total", **labels) == 2 * CHUNK
        assert value(samples, "kvstore_request_duration_seconds_count", **labels) == 1
    stores = {"store": "counters", "operation": "store_chunks"}
    assert value(samples, "kvstore_request_duration_seconds_count", **stores) == 1
    assert value(samples, "kvstore_chunks_written_total", store="counters", tier="ram") == 2


async def faulty_store(
    tmp_path: Path, name: str, plan: FaultPlan, timeout_s: float
) -> AsyncKVStore:
    """A cpu tier that misbehaves per ``plan`` above a healthy nvme tier."""
    cpu = await open_driver("cpu://?capacity=16MiB")
    nvme = await open_driver(f"nvme://{tmp_path}/faults?capacity=64MiB")
    cfg = config(
        name,
        {"url": "cpu://?capacity=16MiB", "name": "ram", "timeout_s": timeout_s},
        {"url": f"nvme://{tmp_path}/faults", "name": "disk"},
    )
    return await AsyncKVStore.open(cfg, NAMESPACE, drivers=[FaultyDriver.wrap(cpu, plan), nvme])


async def test_driver_errors_by_type(tmp_path: Path) -> None:
    plan = FaultPlan(action="error", operations=frozenset({"get_many"}), error=TransientError)
    store = await faulty_store(tmp_path, "errors", plan, timeout_s=30)
    try:
        ids, kv = prompt(2, 3 * CHUNK)
        await store.store(ids, kv)
        await store.flush()
        assert (await store.retrieve(ids)).tokens == 3 * CHUNK
        samples = scrape()
        ram = store.stats().tiers[0].stats
        assert ram.errors["TransientError"] >= 1
        errors = value(
            samples,
            "kvstore_driver_errors_total",
            store="errors",
            tier="ram",
            error="TransientError",
        )
        assert errors == ram.errors["TransientError"]
        assert value(samples, "kvstore_lookup_hits_total", store="errors", tier="disk") == 3
        assert value(samples, "kvstore_lookup_misses_total", store="errors", tier="ram") == 3
    finally:
        await store.close()


async def test_timeouts_are_timed_and_counted(tmp_path: Path) -> None:
    plan = FaultPlan(action="hang", operations=frozenset({"get_many"}), hang_seconds=600)
    store = await faulty_store(tmp_path, "timeouts", plan, timeout_s=0.3)
    try:
        ids, kv = prompt(3, CHUNK)
        await store.store(ids, kv)
        await store.flush()
        assert (await store.retrieve(ids)).tokens == CHUNK
        samples = scrape()
        gets = {"store": "timeouts", "tier": "ram", "operation": "get_many"}
        assert value(samples, "kvstore_operation_duration_seconds_count", **gets) == 1
        assert value(samples, "kvstore_operation_duration_seconds_sum", **gets) >= 0.3
        assert value(samples, "kvstore_operation_duration_seconds_bucket", le="0.25", **gets) == 0
        assert value(samples, "kvstore_operation_duration_seconds_bucket", le="0.5", **gets) == 1
        timeouts = value(
            samples,
            "kvstore_driver_errors_total",
            store="timeouts",
            tier="ram",
            error="DriverTimeoutError",
        )
        assert timeouts == 1
    finally:
        await store.close()


async def test_store_labels_are_unique_and_go_away_on_close(tmp_path: Path) -> None:
    cfg = config("twin", "cpu://?capacity=16MiB")
    first = await AsyncKVStore.open(cfg, NAMESPACE)
    second = await AsyncKVStore.open(cfg, NAMESPACE)
    try:
        assert (first.metrics.label, second.metrics.label) == ("twin", "twin-2")
        ids, kv = prompt(4, 2 * CHUNK)
        await second.store(ids, kv)
        samples = scrape()
        first_tier = {"store": "twin", "tier": "0:cpu"}
        second_tier = {"store": "twin-2", "tier": "0:cpu"}
        assert value(samples, "kvstore_chunks_written_total", **first_tier) == 0
        assert value(samples, "kvstore_chunks_written_total", **second_tier) == 2
    finally:
        await first.close()
        await second.close()
    samples = scrape()
    assert series_of(samples, "twin") == [] and series_of(samples, "twin-2") == []


async def test_register_into_another_registry(two_tiers: AsyncKVStore) -> None:
    registry = CollectorRegistry()
    register_into(registry)
    try:
        samples = parse(generate_latest(registry).decode())
    finally:
        registry.unregister(COLLECTOR)
    assert value(samples, "kvstore_tier_entries", store="counters", tier="ram") == 0
    assert not any(name.startswith(("process_", "python_")) for name, _ in samples)
    own = scrape()
    assert any(name.startswith("python_gc_") for name, _ in own)


async def test_openmetrics_on_request(two_tiers: AsyncKVStore) -> None:
    body, content_type = render_metrics("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {family.name: family for family in openmetrics_families(text)}
    assert families["kvstore_read_bytes"].type == "counter"
    assert families["kvstore_read_bytes"].unit == "bytes"
    assert families["kvstore_operation_duration_seconds"].type == "histogram"


async def test_scrapes_while_the_store_works(two_tiers: AsyncKVStore) -> None:
    """Scrapes from another thread never fail while pins, writes and evictions change state."""
    stop = threading.Event()
    failures: list[BaseException] = []
    scrapes = 0

    def scraper() -> None:
        nonlocal scrapes
        while not stop.is_set():
            try:
                scrape()
            except BaseException as exc:
                failures.append(exc)
                return
            scrapes += 1

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        for seed in range(20):
            ids, kv = prompt(100 + seed, 3 * CHUNK)
            await two_tiers.store(ids, kv)
            await two_tiers.pin(ids)
            await two_tiers.retrieve(ids)
            await two_tiers.unpin(ids)
            await asyncio.sleep(0)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and scrapes > 0
