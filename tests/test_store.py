"""The hierarchical store: tiers, propagation, eviction, pins, faults, persistence."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.drivers.cpu.pages import pages_for
from kvstore.errors import (
    ClosedError,
    ConfigError,
    IntegrityError,
    InvalidArgumentError,
    StoreClosedError,
    TransientError,
)
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore, ChunkTiers, KVStore, open_store
from kvstore.sync import shared_loop

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("test-model", "rev", LAYOUT, chunk_tokens=CHUNK)
CHUNK_BYTES = LAYOUT.nbytes(CHUNK) + 128  # payload plus header
CHUNK_ROOM = pages_for(CHUNK_BYTES, 256 << 10) * (256 << 10)  # a chunk's whole pages in cpu


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


def config(*tiers: Any, **options: Any) -> StoreConfig:
    return StoreConfig.parse({"tiers": list(tiers), "chunk_tokens": CHUNK, **options})


@pytest.fixture
async def two_tiers(tmp_path: Path) -> AsyncIterator[AsyncKVStore]:
    store = await AsyncKVStore.open(
        config("cpu://?capacity=16MiB", f"nvme://{tmp_path}/nvme?capacity=64MiB"), NAMESPACE
    )
    yield store
    await store.close()


async def test_round_trip_and_lookup(two_tiers: AsyncKVStore) -> None:
    ids, kv = prompt(0, 5 * CHUNK + 3)
    assert (await two_tiers.lookup(ids)).tokens == 0
    result = await two_tiers.store(ids, kv)
    assert (result.chunks, result.written, result.already_cached) == (5, 5, 0)
    lookup = await two_tiers.lookup(ids)
    assert lookup.tokens == 5 * CHUNK  # the partial trailing chunk is never reported
    assert lookup.chunk_tiers == ("0:cpu",) * 5
    loaded = await two_tiers.retrieve(ids)
    assert loaded.tokens == 5 * CHUNK
    assert loaded.kv is not None and torch.equal(loaded.kv, kv[:, :, : 5 * CHUNK])
    again = await two_tiers.store(ids, kv)
    assert (again.written, again.already_cached) == (0, 5)


async def test_shared_prefix_and_divergence(two_tiers: AsyncKVStore) -> None:
    ids, kv = prompt(1, 4 * CHUNK)
    await two_tiers.store(ids, kv)
    other = ids[: 2 * CHUNK] + [7] * (2 * CHUNK)
    assert (await two_tiers.lookup(other)).tokens == 2 * CHUNK
    loaded = await two_tiers.retrieve(other)
    assert loaded.kv is not None and torch.equal(loaded.kv, kv[:, :, : 2 * CHUNK])
    changed_first = [ids[0] + 1, *ids[1:]]
    assert (await two_tiers.lookup(changed_first)).tokens == 0


async def test_retrieve_into_out(two_tiers: AsyncKVStore) -> None:
    ids, kv = prompt(2, 3 * CHUNK)
    await two_tiers.store(ids, kv)
    out = torch.zeros(LAYOUT.shape(4 * CHUNK), dtype=LAYOUT.torch_dtype)
    loaded = await two_tiers.retrieve(ids, out=out)
    assert loaded.kv is not None and loaded.kv.data_ptr() == out.data_ptr()
    assert torch.equal(out[:, :, : 3 * CHUNK], kv)
    with pytest.raises(InvalidArgumentError):
        await two_tiers.retrieve(ids, out=torch.zeros(LAYOUT.shape(CHUNK)))


async def test_write_through_then_promotion(two_tiers: AsyncKVStore) -> None:
    ids, kv = prompt(3, 4 * CHUNK)
    await two_tiers.store(ids, kv)
    await two_tiers.flush()
    cpu, nvme = two_tiers.tiers
    keys = two_tiers.keys(ids)
    assert all(key in nvme.index for key in keys)
    await two_tiers.clear(cpu.name)
    assert (await two_tiers.lookup(ids)).chunk_tiers == (nvme.name,) * 4
    loaded = await two_tiers.retrieve(ids)
    assert loaded.chunk_tiers == (nvme.name,) * 4
    assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    await two_tiers.flush()
    assert (await two_tiers.lookup(ids)).chunk_tiers == (cpu.name,) * 4


async def test_lru_eviction_and_pins(tmp_path: Path) -> None:
    store = await AsyncKVStore.open(
        config({"url": "cpu://?capacity=16MiB", "max_bytes": 4 * CHUNK_ROOM}), NAMESPACE
    )
    try:
        first, kv_first = prompt(4, 2 * CHUNK)
        await store.store(first, kv_first)
        assert await store.pin(first) == 2
        for seed in range(5, 9):
            ids, kv = prompt(seed, CHUNK)
            await store.store(ids, kv)
        assert (await store.lookup(first)).tokens == 2 * CHUNK  # pinned: kept
        assert store.tiers[0].index.used_bytes <= store.tiers[0].capacity
        assert store.tiers[0].stats.evictions >= 2
        assert await store.unpin(first) == 2
        for seed in range(9, 13):
            await store.store(*prompt(seed, CHUNK))
        assert (await store.lookup(first)).tokens == 0  # unpinned: evicted (LRU)
    finally:
        await store.close()


async def test_tier_full_of_pins_refuses_writes() -> None:
    store = await AsyncKVStore.open(
        config({"url": "cpu://?capacity=16MiB", "max_bytes": 2 * CHUNK_ROOM}), NAMESPACE
    )
    try:
        ids, kv = prompt(14, 2 * CHUNK)
        await store.store(ids, kv)
        await store.pin(ids)
        result = await store.store(*prompt(15, CHUNK))
        assert (result.written, result.failed) == (0, 1)
        assert store.tiers[0].stats.dropped_writes == 1
        assert (await store.lookup(ids)).tokens == 2 * CHUNK
    finally:
        await store.close()


async def test_write_back_hands_down_on_eviction(tmp_path: Path) -> None:
    tiers = (
        {"url": "cpu://?capacity=16MiB", "max_bytes": 2 * CHUNK_ROOM, "write_policy": "write-back"},
        f"nvme://{tmp_path}?capacity=16MiB",
    )
    store = await AsyncKVStore.open(config(*tiers), NAMESPACE)
    try:
        first, kv_first = prompt(16, 2 * CHUNK)
        await store.store(first, kv_first)
        await store.flush()
        assert len(store.tiers[1].index) == 0  # write-back: nothing copied down yet
        await store.store(*prompt(17, 2 * CHUNK))
        assert (await store.lookup(first)).chunk_tiers == (store.tiers[1].name,) * 2
        loaded = await store.retrieve(first)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv_first)
    finally:
        await store.close()


async def test_per_tier_codecs(tmp_path: Path) -> None:
    tiers = (
        "cpu://?capacity=16MiB",
        {"url": f"nvme://{tmp_path}?capacity=16MiB", "codecs": "zstd"},
    )
    store = await AsyncKVStore.open(config(*tiers), NAMESPACE)
    try:
        ids, kv = prompt(18, 3 * CHUNK)
        await store.store(ids, kv)
        await store.flush()
        await store.clear(store.tiers[0].name)
        loaded = await store.retrieve(ids)
        assert loaded.chunk_tiers == (store.tiers[1].name,) * 3
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def test_persistent_tier_survives_reopen(tmp_path: Path) -> None:
    cfg = config("cpu://?capacity=16MiB", f"nvme://{tmp_path}?capacity=16MiB")
    ids, kv = prompt(19, 3 * CHUNK)
    store = await AsyncKVStore.open(cfg, NAMESPACE)
    await store.store(ids, kv)
    await store.close()
    reopened = await AsyncKVStore.open(cfg, NAMESPACE)
    try:
        assert (await reopened.lookup(ids)).chunk_tiers == (reopened.tiers[1].name,) * 3
        loaded = await reopened.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await reopened.close()


async def test_namespaces_are_isolated(tmp_path: Path) -> None:
    cfg = config(f"nvme://{tmp_path}?capacity=16MiB")
    ids, kv = prompt(20, 2 * CHUNK)
    store = await AsyncKVStore.open(cfg, NAMESPACE)
    await store.store(ids, kv)
    await store.close()
    other_model = Namespace("other-model", "rev", LAYOUT, chunk_tokens=CHUNK)
    other = await AsyncKVStore.open(cfg, other_model)
    try:
        assert (await other.lookup(ids)).tokens == 0
        assert (await other.retrieve(ids)).kv is None
    finally:
        await other.close()


async def test_evict_and_clear(two_tiers: AsyncKVStore) -> None:
    ids, kv = prompt(21, 3 * CHUNK)
    await two_tiers.store(ids, kv)
    await two_tiers.flush()
    assert await two_tiers.evict(ids) == 3
    assert (await two_tiers.lookup(ids)).tokens == 0
    await two_tiers.store(ids, kv)
    assert await two_tiers.clear() >= 3
    assert (await two_tiers.lookup(ids)).tokens == 0
    assert all(snapshot.entries == 0 for snapshot in two_tiers.stats().tiers)


async def test_bad_input_is_typed_and_loses_nothing(two_tiers: AsyncKVStore) -> None:
    ids, kv = prompt(22, 2 * CHUNK)
    await two_tiers.store(ids, kv)
    with pytest.raises(InvalidArgumentError):
        await two_tiers.store(ids, kv[:, :, :CHUNK])
    with pytest.raises(InvalidArgumentError):
        await two_tiers.store(ids, kv.float())
    with pytest.raises(InvalidArgumentError):
        await two_tiers.store([-5] * CHUNK, kv)
    loaded = await two_tiers.retrieve(ids)
    assert loaded.kv is not None and torch.equal(loaded.kv, kv)


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        StoreConfig.parse({"tiers": []})
    with pytest.raises(ConfigError):
        StoreConfig.parse({"tiers": [{"url": "cpu://", "eviction": "random"}]})
    with pytest.raises(ConfigError):
        StoreConfig.parse({"tiers": [{"url": "cpu://", "codecs": "gzip"}]})
    with pytest.raises(ConfigError):
        StoreConfig.parse({"tiers": ["cpu://"], "queue_bytes": "lots"})


def test_yaml_config(tmp_path: Path) -> None:
    path = tmp_path / "store.yaml"
    path.write_text(
        "chunk_tokens: 16\ntiers:\n  - cpu://?capacity=1GiB\n"
        f"  - url: nvme://{tmp_path}/kv\n    max_bytes: 2GiB\n    codecs: lz4\n"
    )
    parsed = StoreConfig.from_yaml(path)
    assert parsed.tiers[0].url == "cpu://?capacity=1GiB"
    assert parsed.tiers[1].max_bytes == 2 << 30 and parsed.tiers[1].codecs == "lz4"


# ------------------------------------------------------------------ fault tolerance


async def faulty_store(tmp_path: Path, plan: FaultPlan, **tier_options: Any) -> AsyncKVStore:
    """A cpu tier that misbehaves per ``plan`` above a healthy nvme tier."""
    cpu = await open_driver("cpu://?capacity=16MiB")
    nvme = await open_driver(f"nvme://{tmp_path}/faults?capacity=64MiB")
    cfg = config({"url": "cpu://?capacity=16MiB", **tier_options}, f"nvme://{tmp_path}/faults")
    return await AsyncKVStore.open(cfg, NAMESPACE, drivers=[FaultyDriver.wrap(cpu, plan), nvme])


@pytest.mark.parametrize(
    "plan",
    [
        FaultPlan(action="error", operations=frozenset({"get_many"}), error=TransientError),
        FaultPlan(action="error", operations=frozenset({"get_many"}), error=IntegrityError),
        FaultPlan(action="corrupt", flip_bits=3),
        FaultPlan(action="truncate"),
        FaultPlan(action="hang", operations=frozenset({"get_many"}), hang_seconds=600),
    ],
    ids=["transient", "raises-integrity", "corrupt", "truncate", "hang"],
)
async def test_faulty_tier_is_a_miss_served_from_below(tmp_path: Path, plan: FaultPlan) -> None:
    store = await faulty_store(tmp_path, plan, timeout_s=0.5)
    try:
        ids, kv = prompt(30, 3 * CHUNK)
        await store.store(ids, kv)
        await store.flush()
        started = time.monotonic()
        loaded = await store.retrieve(ids)
        assert time.monotonic() - started < 120  # bounded by the tier timeout, not the hang
        assert loaded.tokens == 3 * CHUNK
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert set(loaded.chunk_tiers) == {store.tiers[1].name}
        assert sum(store.tiers[0].stats.errors.values()) >= 1
    finally:
        await store.close()


@pytest.mark.parametrize("action", ["corrupt", "truncate"])
async def test_bad_bytes_in_the_only_tier_are_a_miss(action: str) -> None:
    cpu = await open_driver("cpu://?capacity=16MiB")
    wrapped = FaultyDriver.wrap(cpu, FaultPlan(action=action))  # type: ignore[arg-type]
    store = await AsyncKVStore.open(config("cpu://?capacity=16MiB"), NAMESPACE, drivers=[wrapped])
    try:
        ids, kv = prompt(31, 2 * CHUNK)
        await store.store(ids, kv)
        loaded = await store.retrieve(ids)
        assert loaded.tokens == 0 and loaded.kv is None
        assert store.tiers[0].stats.integrity_failures >= 1
        assert (await store.lookup(ids)).tokens == 0  # the bad copies were dropped
    finally:
        await store.close()


async def test_failing_first_tier_on_store_still_reaches_lower_tiers(tmp_path: Path) -> None:
    plan = FaultPlan(action="error", operations=frozenset({"put_many"}))
    store = await faulty_store(tmp_path, plan)
    try:
        ids, kv = prompt(32, 2 * CHUNK)
        result = await store.store(ids, kv)
        assert result.failed == 2
        await store.flush()
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def test_drop_policy_bounds_the_queue(tmp_path: Path) -> None:
    store = await AsyncKVStore.open(
        config(
            "cpu://?capacity=16MiB",
            f"nvme://{tmp_path}?capacity=64MiB",
            queue_bytes=CHUNK_BYTES,
            on_queue_full="drop",
        ),
        NAMESPACE,
    )
    try:
        for seed in range(40, 48):
            await store.store(*prompt(seed, 2 * CHUNK))
            assert store.stats().queued_bytes <= 2 * CHUNK_BYTES
        await store.flush()
        snapshot = store.stats().tiers[1]
        assert snapshot.stats.dropped_writes + snapshot.entries == 16
    finally:
        await store.close()


# ------------------------------------------------------------ reads hold their room


class HeldReads(FaultyDriver):
    """A driver whose ``get_many``, while ``hold`` is set, waits for ``resume``: it
    keeps a retrieve in flight, its later batches read ahead from the tier above."""

    def __init__(self, config: Any, inner: Any) -> None:
        super().__init__(config, inner)
        self.hold = False
        self.waiting = asyncio.Event()
        self.resume = asyncio.Event()

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        if self.hold:
            self.waiting.set()
            await self.resume.wait()
        return await super()._get_many(keys, into)


@pytest.mark.parametrize("dropped_by", ["eviction", "evict"])
async def test_chunks_on_loan_keep_their_room(tmp_path: Path, dropped_by: str) -> None:
    """A cpu tier whose arena holds exactly its capacity of chunks: the chunks a
    retrieve has on loan keep their pages after they are dropped, so the store
    evicts others to make room rather than failing its put on a full arena."""
    page = 4096
    arena = 6 * pages_for(CHUNK_BYTES, page) * page
    cpu = await open_driver(f"cpu://?capacity={arena}&page_size={page}&pin=none")
    nvme = HeldReads.wrap(
        await open_driver(f"nvme://{tmp_path}?capacity=64MiB"), FaultPlan(probability=0.0)
    )
    assert isinstance(nvme, HeldReads)
    cfg = config({"url": cpu.config.to_url(), "max_bytes": arena}, f"nvme://{tmp_path}")
    store = await AsyncKVStore.open(cfg, NAMESPACE, drivers=[cpu, nvme])
    first, second = store.tiers
    try:
        ids, kv = prompt(60, 4 * CHUNK)
        await store.store(ids, kv)
        await store.store(*prompt(61, 2 * CHUNK))  # the cpu tier is full
        await store.flush()
        await store.move(first.name, second.name, ids[:CHUNK], migrate=True)
        assert (await store.lookup(ids)).chunk_tiers == (second.name,) + (first.name,) * 3
        nvme.hold = True
        retrieve = asyncio.create_task(store.retrieve(ids))
        await nvme.waiting.wait()  # chunk 0 is read from nvme, chunks 1-3 lent by cpu
        if dropped_by == "evict":
            assert await store.pin(ids[:CHUNK]) == 1
            assert await store.evict(ids) == 3  # chunks 1-3, from both tiers
        result = await store.store(*prompt(62, 2 * CHUNK))
        assert result.written == 2
        assert not first.stats.errors
        nvme.resume.set()
        loaded = await retrieve
        assert loaded.chunk_tiers == (second.name,) + (first.name,) * 3
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        await store.flush()
        assert not first.stats.errors
        assert arena - cpu.free_bytes == first.index.used_bytes <= first.capacity
    finally:
        nvme.resume.set()
        await store.close()


async def test_concurrent_reads_and_writes_fit_an_arena_sized_to_the_tier(tmp_path: Path) -> None:
    """Retrieves from both tiers while stores and promotions evict: every put fits
    the cpu arena, which has pages for exactly the tier's capacity of chunks."""
    page = 4096
    chunks = 12
    arena = chunks * pages_for(CHUNK_BYTES, page) * page
    cfg = config(
        {
            "url": f"cpu://?capacity={arena}&page_size={page}&pin=none",
            "max_bytes": arena,
        },
        f"nvme://{tmp_path}?capacity=64MiB",
        io_batch_bytes=2 * CHUNK_BYTES,
    )
    store = await AsyncKVStore.open(cfg, NAMESPACE)
    prompts = [prompt(70 + seed, 6 * CHUNK) for seed in range(12)]

    async def worker(seed: int) -> None:
        draw = random.Random(seed)
        for _ in range(60):
            ids, kv = draw.choice(prompts)
            if draw.random() < 0.5:
                await store.store(ids, kv)
            else:
                loaded = await store.retrieve(ids)
                assert loaded.kv is None or torch.equal(loaded.kv, kv[:, :, : loaded.tokens])

    try:
        await asyncio.gather(*(worker(seed) for seed in range(4)))
        await store.flush()
        first = store.tiers[0]
        assert first.stats.evictions > 0
        assert not first.stats.errors
        assert first.held_bytes == 0
    finally:
        await store.close()


# -------------------------------------------------------------- the blocking facade


def test_sync_store_from_many_threads(tmp_path: Path) -> None:
    store = KVStore.open(
        config("cpu://?capacity=32MiB", f"nvme://{tmp_path}?capacity=64MiB"), NAMESPACE
    )
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for round_ in range(3):
                ids, kv = prompt(seed * 10 + round_, 2 * CHUNK)
                store.store(ids, kv)
                loaded = store.retrieve(ids)
                assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        store.flush()
        assert store.stats().tiers[1].entries == 36
    finally:
        store.close()


def test_sync_call_inside_the_loop_is_refused() -> None:
    store = KVStore.open(config("cpu://?capacity=8MiB"), NAMESPACE)
    try:

        async def misuse() -> None:
            store.lookup([1] * CHUNK)

        with pytest.raises(RuntimeError, match="event loop thread"):
            shared_loop().run(misuse())
    finally:
        store.close()


async def test_closed_store_refuses_calls() -> None:
    store = await AsyncKVStore.open(config("cpu://?capacity=8MiB"), NAMESPACE)
    await store.close()
    with pytest.raises(InvalidArgumentError):
        await store.retrieve([1] * CHUNK)
    await asyncio.sleep(0)


async def test_mla_layout_round_trip() -> None:
    layout = KVLayout(num_layers=3, num_kv_heads=1, head_dim=48, dtype="bfloat16", mla=True)
    namespace = Namespace("mla-model", "rev", layout, chunk_tokens=CHUNK)
    store = await AsyncKVStore.open(config("cpu://?capacity=8MiB"), namespace)
    try:
        ids = list(range(3 * CHUNK))
        kv = torch.randn(layout.shape(3 * CHUNK)).to(torch.bfloat16)
        await store.store(ids, kv)
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None
        assert loaded.kv.shape == (3, 1, 3 * CHUNK, 1, 48)
        assert torch.equal(loaded.kv, kv)
    finally:
        await store.close()


def test_results_count_tokens_and_a_closed_store_says_so(tmp_path: Path) -> None:
    """``open_store`` takes any config form; ``StoreConfig.namespace`` agrees with
    the config; results count tokens; a closed store raises ``StoreClosedError``."""
    forms: list[Any] = [
        "cpu://?capacity=16MiB",
        ["cpu://?capacity=16MiB"],
        {"tiers": ["cpu://?capacity=16MiB"], "chunk_tokens": CHUNK, "tenant": "t"},
    ]
    for form in forms:
        chosen = StoreConfig.load(form)
        namespace = chosen.namespace(model="m", revision="r", layout=LAYOUT)
        assert (namespace.chunk_tokens, namespace.tenant) == (chosen.chunk_tokens, chosen.tenant)
        assert namespace.codec == chosen.lossy_codec == "raw"
        store = open_store(form, namespace)
        ids, kv = prompt(40, 2 * namespace.chunk_tokens)
        result = store.store(ids, kv)
        assert (result.tokens, result.written_tokens) == (len(ids), len(ids))
        assert result.cached_tokens == result.failed_tokens == 0
        keys = store.keys(ids)
        located = store.locate(keys)
        assert isinstance(located, ChunkTiers) and located == ("0:cpu", "0:cpu")
        assert (located.chunks, located.tokens) == (2, len(ids))
        outs = [torch.empty_like(kv[:, :, : namespace.chunk_tokens]) for _ in keys]
        loaded = store.retrieve_chunks(keys, outs)
        assert loaded == located and loaded.tokens == len(ids)
        store.close()
        with pytest.raises(StoreClosedError) as closed:
            store.store(ids, kv)
        assert isinstance(closed.value, ClosedError)
        assert isinstance(closed.value, InvalidArgumentError)  # what 0.1 raised
