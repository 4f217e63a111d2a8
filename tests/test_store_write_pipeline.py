"""store keeps several batch writes under way on the first tier, and counts,
indexes and releases each batch's chunks exactly as if they were written one
batch at a time."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import torch
from test_store import CHUNK, CHUNK_BYTES, CHUNK_ROOM, config, prompt
from test_store_hot_path import COUNT_ONLY, NAMESPACE

from kvstore.conformance.faults import FaultPlan, FaultyConfig, FaultyDriver
from kvstore.driver import Driver
from kvstore.errors import TransientError
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore
from kvstore.store.writes import WRITE_LOAN_SHARE, WRITES_IN_FLIGHT

CHUNKS = 8


class GatedPuts(FaultyDriver):
    """Counts the ``put_many`` calls under way at once (``deepest`` is set once
    ``WRITES_IN_FLIGHT`` are); each waits at ``gate`` until the test opens it,
    then ``delay_s``."""

    def __init__(self, config: FaultyConfig, inner: Driver[Any]) -> None:
        super().__init__(config, inner)
        self.under_way = 0
        self.most_under_way = 0
        self.deepest = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.delay_s = 0.02

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        self.under_way += 1
        self.most_under_way = max(self.most_under_way, self.under_way)
        if self.under_way == WRITES_IN_FLIGHT:
            self.deepest.set()
        try:
            await self.gate.wait()
            await asyncio.sleep(self.delay_s)
            await super()._put_many(items)
        finally:
            self.under_way -= 1


async def _open(tmp_path: Path, plan: FaultPlan = COUNT_ONLY) -> tuple[AsyncKVStore, GatedPuts]:
    """A store over one nvme tier, one chunk a batch, its driver wrapped in ``GatedPuts``."""
    url = f"nvme://{tmp_path}/n?capacity=64MiB"
    driver = GatedPuts.wrap(await open_driver(url), plan)
    assert isinstance(driver, GatedPuts)
    store = await AsyncKVStore.open(
        config(url, io_batch_bytes=CHUNK_BYTES), NAMESPACE, drivers=[driver]
    )
    return store, driver


def _count_buffers(store: AsyncKVStore) -> list[int]:
    """Count the store's pooled buffers out of the pool: ``[acquired - released]``."""
    out = [0]
    pool = store._pool
    acquire, release = pool.acquire, pool.release

    def counted_acquire(nbytes: int) -> torch.Tensor:
        out[0] += 1
        return acquire(nbytes)

    def counted_release(buffer: torch.Tensor) -> None:
        out[0] -= 1
        release(buffer)

    pool.acquire = counted_acquire  # type: ignore[method-assign]
    pool.release = counted_release  # type: ignore[method-assign]
    return out


async def test_store_keeps_several_batch_writes_under_way(tmp_path: Path) -> None:
    store, driver = await _open(tmp_path)
    out = _count_buffers(store)
    try:
        ids, kv = prompt(11, CHUNKS * CHUNK)
        result = await store.store(ids, kv)
        assert (result.written, result.failed) == (CHUNKS, 0)
        assert driver.calls["put_many"] == CHUNKS, "one chunk a batch"
        assert driver.most_under_way == WRITES_IN_FLIGHT >= 2
        first = store.tiers[0]
        assert first.reserved == 0
        assert first.stats.chunks_written == CHUNKS
        assert all(key in first.index for key in store.keys(ids))
        assert out == [0], "every pooled buffer is back"
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def test_a_failed_batch_leaves_the_others_counted(tmp_path: Path) -> None:
    plan = FaultPlan(action="error", operations=frozenset({"put_many"}), every_nth=3)
    store, driver = await _open(tmp_path, plan)
    out = _count_buffers(store)
    try:
        ids, kv = prompt(12, CHUNKS * CHUNK)
        result = await store.store(ids, kv)
        failed = CHUNKS // 3
        assert driver.injected["put_many"] == failed
        assert (result.written, result.failed) == (CHUNKS - failed, failed)
        first = store.tiers[0]
        assert first.reserved == 0
        held = await driver.inner.contains_many(store.keys(ids))
        assert [key in first.index for key in store.keys(ids)] == held
        assert sum(held) == CHUNKS - failed
        assert first.stats.errors[TransientError.__name__] == failed
        assert out == [0]
    finally:
        await store.close()


async def test_a_cancelled_store_releases_every_buffer_and_counts_what_landed(
    tmp_path: Path,
) -> None:
    store, driver = await _open(tmp_path)
    out = _count_buffers(store)
    try:
        driver.gate.clear()
        ids, kv = prompt(13, CHUNKS * CHUNK)
        storing = asyncio.ensure_future(store.store(ids, kv))
        await driver.deepest.wait()
        storing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await storing
        first = store.tiers[0]
        assert first.reserved > 0, "the puts abandoned still hold their room"
        driver.gate.set()
        await asyncio.gather(*first.abandoned)
        assert first.reserved == 0
        held = await driver.inner.contains_many(store.keys(ids))
        assert sum(held) == WRITES_IN_FLIGHT, "the abandoned puts ended and stored their chunks"
        assert [key in first.index for key in store.keys(ids)] == held
        assert out == [0], "every pooled buffer is back, the next batch's encode included"
    finally:
        await store.close()


async def test_chunks_waiting_for_a_stalled_tier_below_do_not_fill_the_first(
    tmp_path: Path,
) -> None:
    """Chunks queued for a tier that does not take them keep at most
    ``WRITE_LOAN_SHARE`` of the first tier on loan: the rest are copies, so the
    full first tier still evicts and takes every new chunk."""
    nvme_url = f"nvme://{tmp_path}/n?capacity=64MiB"
    below = GatedPuts.wrap(await open_driver(nvme_url), COUNT_ONLY)
    assert isinstance(below, GatedPuts)
    below.gate.clear()
    cpu_url = "cpu://?capacity=16MiB"
    first = await open_driver(cpu_url)
    store = await AsyncKVStore.open(
        config({"url": cpu_url, "max_bytes": 8 * CHUNK_ROOM}, nvme_url),
        NAMESPACE,
        drivers=[first, below],
    )
    try:
        tier = store.tiers[0]
        for seed in range(6):
            ids, kv = prompt(100 + seed, 4 * CHUNK)
            result = await store.store(ids, kv)
            assert result.written == 4, f"store {seed}: {result}"
            assert tier.write_loan_bytes <= WRITE_LOAN_SHARE * tier.limit
        assert tier.stats.evictions > 0
        below.gate.set()
        await store.flush()
        assert tier.write_loan_bytes == 0
    finally:
        below.gate.set()
        await store.close()
