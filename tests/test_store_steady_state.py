"""The store in steady state: stalled tiers, tiers down at open, shared tiers after a
restart, and bugs in drivers, each against real servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from prerequisites import requires
from redis_server import RedisServer, redis_available, serve
from s3_server import MotoS3Server

from kvstore.config import StoreConfig
from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.errors import DriverUnavailableError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.metrics import render_metrics
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore
from kvstore.tier import Tier

pytestmark = requires(redis_available(), "redis-server is not installed")

T = TypeVar("T")

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("steady-model", "rev", LAYOUT, chunk_tokens=CHUNK)
CHUNK_BYTES = LAYOUT.nbytes(CHUNK) + 128
TIMEOUT_S = 0.5
GRACE_S = 0.5
SENTINEL = -3.0


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


def config(*tiers: Any) -> StoreConfig:
    return StoreConfig.parse({"tiers": list(tiers), "chunk_tokens": CHUNK})


def prefix() -> str:
    return f"prefix=steady-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from serve(tmp_path_factory.mktemp("redis"))


async def timed(call: Awaitable[T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = await call
    return time.perf_counter() - start, result


async def settled(tier: Tier) -> None:
    """Wait (bounded) until the calls the tier abandoned have ended."""
    if tier.abandoned:
        await asyncio.wait(set(tier.abandoned), timeout=30)
    assert not tier.abandoned


# ------------------------------------------------------------------ timeout_s


async def check_paused_tier(
    url: str, pause: Callable[[], None], resume: Callable[[], None]
) -> None:
    """A tier over a paused server answers retrieve and store within its timeout_s,
    is not asked again while a call it abandoned still runs, never writes the
    caller's out afterwards, and counts the write that lands late."""
    store = await AsyncKVStore.open(
        config({"url": url, "max_bytes": "64MiB", "timeout_s": TIMEOUT_S}), NAMESPACE
    )
    try:
        ids, kv = prompt(0, 4 * CHUNK)
        assert (await store.store(ids, kv)).written == 4
        late_ids, late_kv = prompt(1, 4 * CHUNK)
        out = torch.full(LAYOUT.shape(4 * CHUNK), SENTINEL, dtype=LAYOUT.torch_dtype)
        tier = store.tiers[0]
        pause()
        try:
            read_s, missed = await timed(store.retrieve(ids, out=out))
            again_s, again = await timed(store.retrieve(ids))
        finally:
            resume()
        await settled(tier)
        pause()
        try:
            write_s, failed = await timed(store.store(late_ids, late_kv))
        finally:
            resume()
        assert (missed.tokens, again.tokens, failed.written) == (0, 0, 0)
        assert read_s < TIMEOUT_S + GRACE_S, f"retrieve took {read_s:.2f} s"
        assert again_s < TIMEOUT_S / 2, f"a retrieve from the stalled tier took {again_s:.2f} s"
        assert write_s < TIMEOUT_S + GRACE_S, f"store took {write_s:.2f} s"
        assert tier.stats.errors["DriverTimeoutError"] >= 3
        await settled(tier)
        assert bool((out == SENTINEL).all()), "the caller's out was written after retrieve"
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert all(key in tier.index for key in store.keys(late_ids))
        late = await store.retrieve(late_ids)
        assert late.kv is not None and torch.equal(late.kv, late_kv)
    finally:
        await store.close()


async def test_a_paused_redis_costs_a_call_at_most_its_timeout(redis_server: RedisServer) -> None:
    await check_paused_tier(redis_server.url(prefix()), redis_server.pause, redis_server.resume)


@pytest.mark.slow
async def test_a_paused_s3_server_costs_a_call_at_most_its_timeout() -> None:
    with MotoS3Server() as server:
        server.create_bucket("steady")
        url = server.url("steady", uuid.uuid4().hex[:12], part_size="5MiB")
        await check_paused_tier(url, server.pause, server.resume)


# ------------------------------------------------------------- down at open


async def test_a_tier_down_at_open_is_degraded_then_comes_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "late")  # not started yet: its port refuses connections
    lower = {"url": server.url(f"{prefix()}&connect_timeout=0.5"), "max_bytes": "64MiB"}
    store = await AsyncKVStore.open(config("cpu://?capacity=16MiB", lower), NAMESPACE)
    try:
        tier = store.tiers[1]
        assert tier.down is not None
        ids, kv = prompt(2, 4 * CHUNK)
        assert (await store.store(ids, kv)).written == 4
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert (await store.lookup(prompt(3, 2 * CHUNK)[0])).tokens == 0
        assert tier.stats.misses >= 2
        await store.flush()
        assert tier.stats.dropped_writes == 4
        health = (await store.health(1.0))[1]
        assert not health.reachable and health.error is not None and "down" in health.error
        assert store.stats().tiers[1].up is False
        up_series = f'kvstore_tier_up{{store="{store.metrics.label}",tier="{tier.name}"}}'
        assert f"{up_series} 0.0" in render_metrics()[0].decode()

        server.start()
        for _ in range(200):
            if tier.down is None:
                break
            await asyncio.sleep(0.05)
        assert tier.down is None, "the tier was not reconnected"
        assert (await store.health(1.0))[1].reachable
        assert f"{up_series} 1.0" in render_metrics()[0].decode()
        await store.store(*prompt(4, 4 * CHUNK))
        await store.flush()
        assert tier.stats.chunks_written == 4
    finally:
        await store.close()
        server.stop()


async def test_a_required_or_first_tier_that_is_down_fails_the_open(tmp_path: Path) -> None:
    url = RedisServer(tmp_path / "never").url("connect_timeout=0.5")
    required = {"url": url, "max_bytes": "64MiB", "required": True}
    with pytest.raises(DriverUnavailableError):
        await AsyncKVStore.open(config("cpu://?capacity=16MiB", required), NAMESPACE)
    with pytest.raises(DriverUnavailableError):
        await AsyncKVStore.open(config({"url": url, "max_bytes": "64MiB"}), NAMESPACE)


# ------------------------------------------------------------- shared tiers


async def test_a_restarted_store_does_not_rewrite_what_a_shared_tier_holds(
    redis_server: RedisServer,
) -> None:
    """Each run is a fresh store over the same Redis, as a restarted or second engine
    would be: its index of the shared tier starts empty."""
    tiers = ("cpu://?capacity=16MiB", {"url": redis_server.url(prefix()), "max_bytes": "64MiB"})
    prompts = [prompt(10 + seed, 8 * CHUNK) for seed in range(4)]
    total = 4 * 8 * CHUNK
    put: list[int] = []
    hits: list[int] = []
    for retrieve_first in (False, True, False):
        store = await AsyncKVStore.open(config(*tiers), NAMESPACE)
        try:
            found = 0
            for ids, kv in prompts:
                if retrieve_first:
                    found += (await store.retrieve(ids)).tokens
                await store.store(ids, kv)
            await store.flush()
            put.append(store.tiers[1].stats.bytes_written)
            hits.append(found)
        finally:
            await store.close()
    assert put[0] == 4 * 8 * CHUNK_BYTES
    assert hits[1] == total
    assert put[1:] == [0, 0], f"bytes put to the shared tier per run: {put}"


# ------------------------------------------------------------------- bugs


class BuggyReads(FaultyDriver):
    """A driver whose ``get_many`` has a bug: it raises outside the error taxonomy."""

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        raise ZeroDivisionError("a bug in the driver")


async def test_a_bug_in_a_driver_is_logged_once_counted_and_a_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nvme_url = f"nvme://{tmp_path}/buggy?capacity=64MiB"
    buggy = BuggyReads.wrap(await open_driver(nvme_url), FaultPlan(operations=frozenset()))
    cpu = await open_driver("cpu://?capacity=16MiB")
    store = await AsyncKVStore.open(
        config("cpu://?capacity=16MiB", nvme_url), NAMESPACE, drivers=[cpu, buggy]
    )
    try:
        ids, kv = prompt(20, 2 * CHUNK)
        await store.store(ids, kv)
        await store.flush()
        await store.clear(store.tiers[0].name)
        with caplog.at_level(logging.ERROR, logger="kvstore.store"):
            for _ in range(2):
                assert (await store.retrieve(ids)).tokens == 0
        tier = store.tiers[1]
        assert tier.stats.internal_errors == 2
        logged = [record for record in caplog.records if record.exc_info is not None]
        assert len(logged) == 1, "a bug is logged with its traceback once"
        assert logged[0].exc_info is not None and logged[0].exc_info[0] is ZeroDivisionError
        series = (
            f'kvstore_internal_errors_total{{store="{store.metrics.label}",tier="{tier.name}"}}'
        )
        assert f"{series} 2.0" in render_metrics()[0].decode()
        assert (await store.lookup(ids)).tokens == 2 * CHUNK  # still indexed: the read failed
    finally:
        await store.close()


async def test_write_back_chunks_that_cannot_be_handed_down_are_counted(tmp_path: Path) -> None:
    nvme = await open_driver(f"nvme://{tmp_path}/refusing?capacity=64MiB")
    refusing = FaultyDriver.wrap(
        nvme, FaultPlan(action="error", operations=frozenset({"put_many"}))
    )
    cpu = await open_driver("cpu://?capacity=16MiB")
    upper = {"url": "cpu://?capacity=16MiB", "max_bytes": 4 * cpu.footprint(CHUNK_BYTES)}
    store = await AsyncKVStore.open(
        config({**upper, "write_policy": "write-back"}, f"nvme://{tmp_path}/refusing"),
        NAMESPACE,
        drivers=[cpu, refusing],
    )
    try:
        await store.store(*prompt(21, 4 * CHUNK))
        await store.store(*prompt(22, 4 * CHUNK))
        cpu_tier = store.tiers[0]
        assert cpu_tier.stats.evictions == 4
        assert cpu_tier.stats.dropped_writebacks == 4
        series = (
            f'kvstore_dropped_writebacks_total{{store="{store.metrics.label}",'
            f'tier="{cpu_tier.name}"}}'
        )
        assert f"{series} 4.0" in render_metrics()[0].decode()
    finally:
        await store.close()
