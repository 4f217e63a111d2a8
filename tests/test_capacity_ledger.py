"""One capacity ledger: a full tier evicts by what a chunk really occupies on its driver.

Each shipped driver, at its default page size and with chunks of an odd size
(a 576 KiB payload plus the chunk header), is filled several times over through
the store: every store is written, older chunks are evicted, the newest ones
hit, and the store's ledger matches what the driver holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from mooncake_server import MooncakeMaster, master_available
from prerequisites import missing
from redis_server import RedisServer, redis_available
from s3_server import MotoS3Server

from kvstore.config import StoreConfig
from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore

LAYOUT = KVLayout(num_layers=9, num_kv_heads=8, head_dim=128)
CHUNK = 16
PAYLOAD = LAYOUT.nbytes(CHUNK)
NAMESPACE = Namespace("ledger-model", "rev", LAYOUT, chunk_tokens=CHUNK)
TIER_CAPACITY = 4 << 20
STORES = 21
BUCKET = "ledger"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not redis_available():
        missing("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def mooncake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeMaster]:
    if not master_available():
        missing("mooncake_master or the mooncake Python client is not installed")
    with MooncakeMaster(tmp_path_factory.mktemp("mooncake")) as master:
        yield master


def unique() -> str:
    return uuid.uuid4().hex[:12]


TIER_URLS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "cpu": lambda request, tmp: f"cpu://?capacity={TIER_CAPACITY}",
    "nvme": lambda request, tmp: f"nvme://{tmp}/nvme?capacity={TIER_CAPACITY}",
    "redis": lambda request, tmp: request.getfixturevalue("redis").url(f"prefix=l{unique()}"),
    "s3": lambda request, tmp: request.getfixturevalue("moto").url(BUCKET, f"l{unique()}"),
    "fsspec": lambda request, tmp: request.getfixturevalue("moto").fsspec_url(
        f"{BUCKET}/f{unique()}"
    ),
    "fsspec-file": lambda request, tmp: f"fsspec+file://{tmp}/fsspec",
    "mooncake": lambda request, tmp: request.getfixturevalue("mooncake").url(prefix=f"{unique()}/"),
}


def prompt(seed: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (CHUNK,), generator=generator).tolist()
    return ids, torch.randn(LAYOUT.shape(CHUNK), generator=generator).to(LAYOUT.torch_dtype)


@pytest.mark.parametrize("driver", list(TIER_URLS))
async def test_a_full_tier_evicts_by_footprint_and_keeps_caching(
    driver: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = TIER_URLS[driver](request, tmp_path)
    tier_config = {"url": url, "max_bytes": TIER_CAPACITY, "timeout_s": 30}
    config = StoreConfig.parse({"tiers": [tier_config], "chunk_tokens": CHUNK})
    store = await AsyncKVStore.open(config, NAMESPACE)
    try:
        prompts = [prompt(seed) for seed in range(STORES)]
        results = [await store.store(ids, kv) for ids, kv in prompts]
        tier = store.tiers[0]
        assert [result.failed for result in results] == [0] * STORES
        assert dict(tier.stats.errors) == {}
        chunk_bytes = len(tier.index) and tier.index.used_bytes // len(tier.index)
        assert chunk_bytes == tier.footprint(PAYLOAD + 128) >= PAYLOAD + 128
        fitting = TIER_CAPACITY // chunk_bytes
        assert tier.stats.evictions == STORES - fitting
        assert len(tier.index) == fitting
        assert tier.index.used_bytes <= TIER_CAPACITY
        for ids, kv in prompts[-fitting:]:
            loaded = await store.retrieve(ids)
            assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        capabilities = tier.driver.capabilities
        if capabilities.listable:
            held = [entry async for entry in tier.driver.list()]
            assert sum(tier.footprint(entry.size) for entry in held) == tier.index.used_bytes
        if capabilities.capacity_bytes is not None:
            usage = await tier.driver.usage()
            assert usage.entries == fitting
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("cpu://?capacity=4MiB", 3 * (256 << 10)),
        ("cpu://?capacity=4MiB&page_size=64KiB", 10 * (64 << 10)),
    ],
)
async def test_cpu_footprint_is_whole_pages(url: str, expected: int) -> None:
    config = StoreConfig.parse({"tiers": [url], "chunk_tokens": CHUNK})
    store = await AsyncKVStore.open(config, NAMESPACE)
    try:
        assert store.tiers[0].footprint(PAYLOAD + 128) == expected
    finally:
        await store.close()


async def test_a_wrapped_driver_reports_the_footprint_of_the_driver_it_wraps() -> None:
    inner = await open_driver("cpu://?capacity=4MiB")
    wrapped = FaultyDriver.wrap(inner, FaultPlan(probability=0.0))
    try:
        assert wrapped.footprint(PAYLOAD + 128) == inner.footprint(PAYLOAD + 128) == 3 * (256 << 10)
    finally:
        await wrapped.close()
