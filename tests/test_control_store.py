"""The store operations behind the control API: storage keys, views, pins with
expiry, scoped clear, move, compress, health and per-scope stats, on real tiers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.errors import ConfigError, DriverUnavailableError, InvalidArgumentError, NotFoundError
from kvstore.keys import (
    KEY_BYTES,
    STORAGE_KEY_BYTES,
    TAG_BYTES,
    Namespace,
    chunk_keys,
    namespace_tag,
    storage_prefix,
    tenant_tag,
)
from kvstore.layout import KVLayout
from kvstore.registry import open_driver
from kvstore.results import Progress
from kvstore.store import AsyncKVStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("test-model", "rev", LAYOUT, chunk_tokens=CHUNK)


def prompt(seed: int, tokens: int, *, compressible: bool = False) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    if compressible:
        kv = torch.randint(0, 4, LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    else:
        kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


def config(*tiers: Any, **options: Any) -> StoreConfig:
    return StoreConfig.parse({"tiers": list(tiers), "chunk_tokens": CHUNK, **options})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncKVStore]:
    opened = await AsyncKVStore.open(
        config(
            {"url": "cpu://?capacity=16MiB", "name": "cpu"},
            {"url": f"nvme://{tmp_path}/nvme?capacity=64MiB", "name": "nvme"},
        ),
        NAMESPACE,
    )
    yield opened
    await opened.close()


def test_storage_keys_are_tags_then_the_chunk_key() -> None:
    ids, _ = prompt(0, 3 * CHUNK)
    salted = dataclasses.replace(NAMESPACE, tenant="salt-a")
    digest = salted.digest()
    prefix = storage_prefix(salted)
    assert prefix == tenant_tag("salt-a") + namespace_tag(digest)
    assert len(prefix) == 2 * TAG_BYTES
    expected = [prefix + key for key in chunk_keys(digest, ids, CHUNK)]
    assert all(len(key) == STORAGE_KEY_BYTES for key in expected)
    assert [key[-KEY_BYTES:] for key in expected] == chunk_keys(digest, ids, CHUNK)
    assert tenant_tag("salt-a") != tenant_tag("salt-b")
    assert tenant_tag("salt-a") != tenant_tag("")
    # the vectors of docs/key-spec.md, "Storage keys"
    assert tenant_tag("").hex() == "c2d9bdf1d4e14673"
    assert tenant_tag("tenant-a").hex() == "157bc35f92311d05"
    llama = Namespace(
        "meta-llama/Llama-3.1-8B",
        "0e9e39f249a16976918f6564b8830bc894c89659",
        KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    )
    key0 = chunk_keys(llama.digest(), range(256), 256)[0]
    assert (storage_prefix(llama) + key0).hex() == (
        "c2d9bdf1d4e1467355246ca05abfdf7b"
        "939c5f8b09c09568b4c6605f6960d71b031ddb83173e5b53cc9add7db4745142"
    )


async def test_view_shares_tiers_but_not_keys(store: AsyncKVStore) -> None:
    ids, kv = prompt(1, 4 * CHUNK)
    other = store.scoped(dataclasses.replace(NAMESPACE, revision="rev2"))
    await store.store(ids, kv)
    assert (await store.lookup(ids)).tokens == 4 * CHUNK
    assert (await other.lookup(ids)).tokens == 0
    await other.store(ids, kv * 2)
    loaded = await other.retrieve(ids)
    assert loaded.kv is not None and torch.equal(loaded.kv, kv * 2)
    assert len(store.tiers[0].index) == 8  # one set of tiers, both namespaces in it
    await other.close()  # a view does not own the tiers
    assert (await store.lookup(ids)).tokens == 4 * CHUNK
    with pytest.raises(ConfigError):
        store.scoped(dataclasses.replace(NAMESPACE, chunk_tokens=32))
    with pytest.raises(ConfigError):
        store.scoped(dataclasses.replace(NAMESPACE, layout=KVLayout(2, 2, 64)))


class ManualClock:
    """A clock a test moves by hand, so pin deadlines pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def test_pin_expires_at_its_deadline() -> None:
    chunk_room = 256 << 10  # a chunk of LAYOUT takes one page of the cpu arena
    clock = ManualClock()
    store = await AsyncKVStore.open(
        config({"url": "cpu://?capacity=16MiB", "max_bytes": 3 * chunk_room}),
        NAMESPACE,
        clock=clock,
    )
    try:
        first, kv_first = prompt(2, 2 * CHUNK)
        await store.store(first, kv_first)
        assert await store.pin(first, ttl_s=60) == 2
        await store.store(*prompt(3, CHUNK))
        await store.store(*prompt(4, CHUNK))  # needs room: the pinned chunks stay
        assert (await store.lookup(first)).tokens == 2 * CHUNK
        assert store.stats().pinned_chunks == 2
        clock.advance(61)
        assert store.stats().pinned_chunks == 0
        await store.store(*prompt(5, 2 * CHUNK))
        assert (await store.lookup(first)).tokens == 0  # evicted once the pin expired
        with pytest.raises(InvalidArgumentError):
            await store.pin(first, ttl_s=0)
        with pytest.raises(InvalidArgumentError):
            await store.pin(first, ttl_s=float("nan"))
    finally:
        await store.close()


async def test_the_sweeper_drops_expired_pins(store: AsyncKVStore) -> None:
    ids, kv = prompt(8, CHUNK)
    await store.store(ids, kv)
    assert await store.pin(ids, ttl_s=0.05) == 1
    for _ in range(100):  # the sweeper wakes at the deadline, at most a second late
        if store._pins.next_deadline() is None:
            break
        await asyncio.sleep(0.02)
    assert store._pins.next_deadline() is None
    assert store.stats().pinned_chunks == 0


async def test_permanent_pin_outlives_a_ttl_pin() -> None:
    clock = ManualClock()
    store = await AsyncKVStore.open(
        config({"url": "cpu://?capacity=16MiB"}), NAMESPACE, clock=clock
    )
    try:
        ids, kv = prompt(6, 2 * CHUNK)
        await store.store(ids, kv)
        assert await store.pin(ids) == 2
        assert await store.pin(ids, ttl_s=0.05) == 2
        clock.advance(1)
        assert store._is_pinned(store.keys(ids)[0])
        assert await store.unpin(ids) == 2
        assert store.stats().pinned_chunks == 0
    finally:
        await store.close()


async def test_clear_by_scope(store: AsyncKVStore) -> None:
    ids, kv = prompt(7, 3 * CHUNK)
    other = store.scoped(dataclasses.replace(NAMESPACE, revision="other"))
    tenant = store.scoped(dataclasses.replace(NAMESPACE, tenant="salt"))
    for view in (store, other, tenant):
        await view.store(ids, kv)
    await store.flush()
    assert await other.clear(scope="namespace") == 6  # 3 chunks in each of 2 tiers
    assert (await other.lookup(ids)).tokens == 0
    assert (await store.lookup(ids)).tokens == 3 * CHUNK
    assert await tenant.clear() == 6  # a salted view clears its tenant by default
    assert (await tenant.lookup(ids)).tokens == 0
    assert (await store.lookup(ids)).tokens == 3 * CHUNK
    seen: list[Progress] = []
    assert await store.clear("cpu", scope="all", progress=seen.append) == 3
    assert seen[-1] == Progress(3, 3, seen[-1].total_bytes, seen[-1].total_bytes)
    assert (await store.lookup(ids)).chunk_tiers == ("nvme",) * 3
    with pytest.raises(NotFoundError):
        await store.clear("nope")


async def test_move_copies_and_migrates(store: AsyncKVStore) -> None:
    ids, kv = prompt(8, 4 * CHUNK)
    await store.store(ids, kv)
    await store.flush()
    await store.clear("cpu")
    seen: list[Progress] = []
    copied = await store.move("nvme", "cpu", ids[: 2 * CHUNK], progress=seen.append)
    assert (copied.chunks, copied.copied, copied.removed) == (2, 2, 0)
    assert seen[-1].done_chunks == seen[-1].total_chunks == 2
    assert (await store.lookup(ids)).chunk_tiers == ("cpu", "cpu", "nvme", "nvme")
    migrated = await store.move("nvme", "cpu", migrate=True)
    assert (migrated.chunks, migrated.copied, migrated.already_there) == (4, 2, 2)
    assert migrated.removed == 4
    assert len(store.tiers[1].index) == 0
    loaded = await store.retrieve(ids)
    assert loaded.chunk_tiers == ("cpu",) * 4
    assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    with pytest.raises(InvalidArgumentError):
        await store.move("cpu", "cpu")


async def test_move_drops_a_corrupt_chunk(tmp_path: Path) -> None:
    cpu = await open_driver("cpu://?capacity=16MiB")
    nvme = FaultyDriver.wrap(
        await open_driver(f"nvme://{tmp_path}/nvme?capacity=64MiB"),
        FaultPlan(action="corrupt", operations={"get_many"}, flip_bits=3),
    )
    store = await AsyncKVStore.open(
        config(cpu.config.to_url(), "nvme://x"), NAMESPACE, drivers=[cpu, nvme]
    )
    try:
        ids, kv = prompt(9, 2 * CHUNK)
        await store.store(ids, kv)
        await store.flush()
        await store.clear("0:cpu")
        result = await store.move("1:faulty", "0:cpu", migrate=True)
        assert (result.corrupt, result.copied) == (2, 0)  # verified: never copied
        assert len(store.tiers[1].index) == 0  # and dropped from the source
        assert store.tiers[1].stats.integrity_failures == 2
    finally:
        await store.close()


async def test_compress_recodes_in_place(store: AsyncKVStore) -> None:
    ids, kv = prompt(10, 4 * CHUNK, compressible=True)
    await store.store(ids, kv)
    await store.flush()
    before = store.tiers[1].index.used_bytes
    result = await store.compress("nvme", "zstd:9")
    assert (result.chunks, result.recoded, result.unchanged) == (4, 4, 0)
    assert result.bytes_after < result.bytes_before / 2
    disk = store.tiers[1]
    held = [entry async for entry in disk.driver.list()]
    assert sum(entry.size for entry in held) == result.bytes_after
    assert disk.index.used_bytes == sum(disk.footprint(entry.size) for entry in held) < before
    again = await store.compress("nvme", "zstd:9")
    assert (again.recoded, again.unchanged) == (0, 4)
    await store.clear("cpu")
    loaded = await store.retrieve(ids)
    assert loaded.chunk_tiers == ("nvme",) * 4
    assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    back = await store.compress("nvme", "raw", ids[:CHUNK])
    assert back.recoded == 1
    with pytest.raises(InvalidArgumentError, match="lossless"):
        await store.compress("nvme", "int8")
    with pytest.raises(ConfigError):
        await store.compress("nvme", "nonsense")


async def test_health_reports_an_unreachable_tier(tmp_path: Path) -> None:
    cpu = await open_driver("cpu://?capacity=16MiB")
    broken = FaultyDriver.wrap(
        await open_driver(f"nvme://{tmp_path}/nvme?capacity=64MiB"),
        FaultPlan(action="error", operations={"contains_many"}, error=DriverUnavailableError),
    )
    store = await AsyncKVStore.open(config("cpu://", "nvme://x"), NAMESPACE, drivers=[cpu, broken])
    try:
        await store.store(*prompt(11, 2 * CHUNK))
        healthy, failing = await store.health(timeout_s=2)
        assert healthy.reachable and healthy.error is None and healthy.entries == 2
        assert healthy.latency_s < 2 and healthy.capacity_bytes == 16 << 20
        assert not failing.reachable and "DriverUnavailableError" in (failing.error or "")
        with pytest.raises(InvalidArgumentError):
            await store.health(timeout_s=-1)
    finally:
        await store.close()


async def test_health_times_out_a_hanging_tier(tmp_path: Path) -> None:
    cpu = await open_driver("cpu://?capacity=16MiB")
    hanging = FaultyDriver.wrap(
        await open_driver("cpu://?capacity=16MiB"),
        FaultPlan(action="hang", operations={"contains_many"}, hang_seconds=5),
    )
    store = await AsyncKVStore.open(config("cpu://", "cpu://"), NAMESPACE, drivers=[cpu, hanging])
    try:
        start = time.perf_counter()
        _, slow = await store.health(timeout_s=0.2)
        assert time.perf_counter() - start < 2
        assert not slow.reachable and "no answer" in (slow.error or "")
    finally:
        await store.close()


async def test_scope_stats_count_only_the_scope(store: AsyncKVStore) -> None:
    ids, kv = prompt(12, 2 * CHUNK)
    tenant = store.scoped(dataclasses.replace(NAMESPACE, tenant="salt"))
    await tenant.store(ids, kv)
    await tenant.lookup(ids)
    await tenant.retrieve(ids)
    await store.lookup(ids)
    mine = tenant.scope_stats()
    assert mine.scope == "tenant"
    assert mine.tiers[0].entries == 2
    assert (mine.counters.lookups, mine.counters.hit_tokens) == (1, 2 * CHUNK)
    assert mine.counters.retrieved_tokens == 2 * CHUNK
    own = store.scope_stats("namespace")
    assert own.tiers[0].entries == 0
    assert (own.counters.lookups, own.counters.hit_tokens) == (1, 0)
    everything = store.scope_stats("all")
    assert everything.tiers[0].entries == 2 and everything.counters.lookups == 2
