"""The store's hot path: one pass on store, loans to lower tiers, per-tier verification,
shared tiers read without asking first, promotion without copies."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_store import CHUNK, CHUNK_BYTES, CHUNK_ROOM, LAYOUT, config, prompt

from kvstore.buffers import ALIGN
from kvstore.chunk import encode_chunk, read_header
from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.digest import THREADS as COPY_THREADS
from kvstore.driver import Driver
from kvstore.drivers.cpu.driver import CpuDriver
from kvstore.errors import InvalidArgumentError
from kvstore.keys import Namespace, chunk_key_of
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore, encoding
from kvstore.store.core import _in_order

NAMESPACE = Namespace("hot-path-model", "rev", LAYOUT, chunk_tokens=CHUNK)
COUNT_ONLY = FaultPlan(action="error", operations=frozenset({"usage"}), probability=0.0)
"""A plan that faults nothing: the wrapper only counts the calls it forwards."""


async def test_store_encodes_into_lent_room_and_lends_the_bytes_below(tmp_path: Path) -> None:
    cpu = FaultyDriver.wrap(await open_driver("cpu://?capacity=16MiB"), COUNT_ONLY)
    nvme = FaultyDriver.wrap(await open_driver(f"nvme://{tmp_path}/n?capacity=64MiB"), COUNT_ONLY)
    store = await AsyncKVStore.open(
        config("cpu://?capacity=16MiB", f"nvme://{tmp_path}/n?capacity=64MiB"),
        NAMESPACE,
        drivers=[cpu, nvme],
    )
    try:
        ids, kv = prompt(1, 3 * CHUNK)
        result = await store.store(ids, kv)
        await store.flush()
        assert result.written == 3
        assert cpu.calls["lend_many"] == 1, "the first tier's chunks are encoded into lent room"
        assert cpu.calls["put_many"] == 0, "no staging buffer is put into the first tier"
        assert cpu.calls["borrow_many"] == 3, "the tier below reads the arena through loans"
        assert nvme.calls["put_many"] >= 1
        keys = store.keys(ids)
        above = await cpu.inner.get_many(keys)
        below = await nvme.inner.get_many(keys)
        assert [bytes(v) for v in above if v] == [bytes(v) for v in below if v]
        assert len([v for v in below if v]) == 3
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def test_a_memory_tier_moves_a_request_in_one_call_and_io_tiers_in_batches(
    tmp_path: Path,
) -> None:
    """Batches bound I/O calls and pooled buffers; room lent and chunks borrowed in
    this process's memory take neither, and each batch waits for its slowest copy,
    so the cpu tier gets a request in one call each way; a tier below it (and
    writes passed down to it) still go in ``io_batch_bytes`` batches."""
    one_chunk = LAYOUT.nbytes(CHUNK)
    cpu = FaultyDriver.wrap(await open_driver("cpu://?capacity=16MiB"), COUNT_ONLY)
    store = await AsyncKVStore.open(
        config("cpu://?capacity=16MiB", io_batch_bytes=one_chunk), NAMESPACE, drivers=[cpu]
    )
    try:
        ids, kv = prompt(9, 5 * CHUNK)
        assert (await store.store(ids, kv)).written == 5
        assert cpu.calls["lend_many"] == 1
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert cpu.calls["borrow_many"] == 1
    finally:
        await store.close()
    cpu = FaultyDriver.wrap(await open_driver("cpu://?capacity=16MiB"), COUNT_ONLY)
    nvme = FaultyDriver.wrap(await open_driver(f"nvme://{tmp_path}/n?capacity=64MiB"), COUNT_ONLY)
    store = await AsyncKVStore.open(
        config(
            "cpu://?capacity=16MiB", f"nvme://{tmp_path}/n?capacity=64MiB", io_batch_bytes=one_chunk
        ),
        NAMESPACE,
        drivers=[cpu, nvme],
    )
    try:
        ids, kv = prompt(10, 5 * CHUNK)
        assert (await store.store(ids, kv)).written == 5
        await store.flush()
        assert cpu.calls["lend_many"] == 5, "written through: one batch at a time"
        await store.clear(tier=store.tiers[0].name)
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert nvme.calls["get_many"] == 5
    finally:
        await store.close()


async def test_a_batch_goes_to_the_codec_threads_in_one_run_per_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each hand-off to a codec thread takes the GIL twice and wakes the loop, so a
    batch goes over in one run per core; a damaged chunk in the middle of a run
    is a miss for that chunk alone, served from the tier below."""
    store = await AsyncKVStore.open(
        config(
            {"url": "cpu://?capacity=16MiB", "verify": True}, f"nvme://{tmp_path}/n?capacity=64MiB"
        ),
        NAMESPACE,
    )
    runs: list[int] = []
    submit = store._executor.submit

    def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        runs.append(len(args[1]) if func is _in_order else 1)
        return submit(func, *args, **kwargs)

    monkeypatch.setattr(store._executor, "submit", counted)
    try:
        ids, kv = prompt(12, 6 * CHUNK)
        assert (await store.store(ids, kv)).written == 6
        assert sum(runs) == 6 and len(runs) <= COPY_THREADS, "encoded into lent room in runs"
        await store.flush()
        keys = store.keys(ids)
        cpu = store.tiers[0]
        async with cpu.driver.borrow_many([keys[2]]) as (view,):
            assert view is not None
            address = np.frombuffer(view, dtype=np.uint8).ctypes.data
            ctypes.memset(address + len(view) - 1, 0x55, 1)  # one byte of the payload
        runs.clear()
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert len(runs) <= COPY_THREADS + 2, "the cpu batch in runs, then the one read below"
        cpu_name, nvme_name = (tier.name for tier in store.tiers)
        assert loaded.chunk_tiers == (cpu_name,) * 2 + (nvme_name,) + (cpu_name,) * 3
        assert cpu.stats.integrity_failures == 1
    finally:
        await store.close()


async def test_chunks_for_a_tier_lending_no_room_are_encoded_in_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the first tier on disk, each batch is encoded into pooled buffers as
    one run per core, not a hand-off per chunk, and every buffer goes back."""
    store = await AsyncKVStore.open(
        config(f"nvme://{tmp_path}/n?capacity=64MiB", io_batch_bytes=3 * LAYOUT.nbytes(CHUNK)),
        NAMESPACE,
    )
    runs: list[int] = []
    others: list[Any] = []
    submit = store._executor.submit

    def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        (runs.append(len(args[1])) if func is _in_order else others.append(func))
        return submit(func, *args, **kwargs)

    monkeypatch.setattr(store._executor, "submit", counted)
    try:
        ids, kv = prompt(13, 6 * CHUNK)
        assert (await store.store(ids, kv)).written == 6
        assert sum(runs) == 6 and len(runs) <= 2 * COPY_THREADS, "two batches, in runs"
        assert not others, "no chunk is handed over alone"
        await store.flush()
        assert store._pool.idle_bytes == 6 * -(-CHUNK_BYTES // ALIGN) * ALIGN, "all are back"
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def test_a_chunk_failing_to_encode_fails_its_batch_and_returns_every_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await AsyncKVStore.open(
        config(f"nvme://{tmp_path}/n?capacity=64MiB", io_batch_bytes=3 * LAYOUT.nbytes(CHUNK)),
        NAMESPACE,
    )
    ids, kv = prompt(14, 6 * CHUNK)
    doomed = chunk_key_of(store.keys(ids)[4])

    def encode_or_fail(key: bytes, chunk: torch.Tensor, **kwargs: Any) -> memoryview:
        if key == doomed:
            raise InvalidArgumentError("this chunk cannot be encoded")
        return encode_chunk(key, chunk, **kwargs)

    monkeypatch.setattr(encoding, "encode_chunk", encode_or_fail)
    out: list[int] = []
    acquire, release = store._pool.acquire, store._pool.release

    def lent(nbytes: int) -> torch.Tensor:
        out.append(1)
        return acquire(nbytes)

    def returned(buffer: torch.Tensor) -> None:
        out.pop()
        release(buffer)

    monkeypatch.setattr(store._pool, "acquire", lent)
    monkeypatch.setattr(store._pool, "release", returned)
    try:
        with pytest.raises(InvalidArgumentError, match="cannot be encoded"):
            await store.store(ids, kv)
        await store.flush()
        assert not out, "every pooled buffer is back, the failed chunk's included"
        loaded = await store.retrieve(ids)
        assert loaded.tokens == 3 * CHUNK, "the batch before the failure was written"
        assert loaded.kv is not None and torch.equal(loaded.kv, kv[:, :, : 3 * CHUNK])
    finally:
        await store.close()


async def test_a_cancelled_run_returns_only_once_its_threads_are_done() -> None:
    store = await AsyncKVStore.open(config("cpu://?capacity=16MiB"), NAMESPACE)
    release = threading.Event()
    finished: list[int] = []

    def job(number: int) -> None:
        release.wait(10)
        finished.append(number)

    try:
        task = asyncio.ensure_future(store._run_each(job, [0, 1, 2]))
        await asyncio.sleep(0.05)
        threading.Timer(0.2, release.set).start()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(finished) == [0, 1, 2], "no thread is still at work for the caller"
    finally:
        release.set()
        await store.close()


async def test_strided_and_repeated_stores_read_back_exactly() -> None:
    store = await AsyncKVStore.open(config("cpu://?capacity=16MiB"), NAMESPACE)
    try:
        ids, kv = prompt(2, 4 * CHUNK)
        wide = torch.zeros(LAYOUT.shape(6 * CHUNK), dtype=LAYOUT.torch_dtype)
        wide[:, :, CHUNK : 5 * CHUNK] = kv
        strided = wide[:, :, CHUNK : 5 * CHUNK]
        assert (await store.store(ids, strided)).written == 4
        assert (await store.store(ids, strided)).already_cached == 4
        out = torch.zeros(LAYOUT.shape(7 * CHUNK), dtype=LAYOUT.torch_dtype)
        loaded = await store.retrieve(ids, out=out[:, :, 2 * CHUNK :])
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def test_a_cancelled_loan_frees_its_room_and_was_never_visible() -> None:
    driver = await open_driver("cpu://?capacity=4MiB&page_size=64KiB")
    assert isinstance(driver, CpuDriver)
    writing = asyncio.Event()

    async def writer() -> None:
        async with driver.lend_many([(b"being-written", 3 << 20)]) as (room,):
            assert room is not None
            room[:] = bytes(len(room))
            writing.set()
            await asyncio.sleep(3600)

    try:
        task = asyncio.ensure_future(writer())
        await writing.wait()
        assert driver.free_bytes == 1 << 20
        assert await driver.get_many([b"being-written"]) == [None]
        assert await driver.contains_many([b"being-written"]) == [False]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert driver.free_bytes == 4 << 20, "an aborted loan gives its room back"
        assert await driver.contains_many([b"being-written"]) == [False]
    finally:
        await driver.close()


async def test_retrieve_reads_a_shared_tier_without_asking_first(tmp_path: Path) -> None:
    url = f"fsspec+memory://hot-path-{tmp_path.name}"
    shared = {"url": url, "max_bytes": 64 << 20}
    writer = await AsyncKVStore.open(config("cpu://?capacity=16MiB", shared), NAMESPACE)
    ids, kv = prompt(3, 3 * CHUNK)
    try:
        await writer.store(ids, kv)
        await writer.flush()
    finally:
        await writer.close()
    remote = FaultyDriver.wrap(await open_driver(url), COUNT_ONLY)
    cpu = await open_driver("cpu://?capacity=16MiB")
    reader = await AsyncKVStore.open(
        config("cpu://?capacity=16MiB", shared), NAMESPACE, drivers=[cpu, remote]
    )
    try:
        remote.calls.clear()
        loaded = await reader.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert loaded.chunk_tiers == (reader.tiers[1].name,) * 3
        missed = await reader.retrieve(prompt(4, 2 * CHUNK)[0])
        assert missed.tokens == 0
        assert remote.calls["contains_many"] == 0, "a miss is None from get_many already"
        assert remote.calls["get_many"] >= 2
        await reader.flush()
        again = await reader.retrieve(ids)
        assert again.chunk_tiers == (reader.tiers[0].name,) * 3, "hits were promoted"
    finally:
        await reader.close()


@pytest.mark.parametrize("codecs", ["raw", "zstd"])
async def test_promotion_lands_in_the_first_tier(tmp_path: Path, codecs: str) -> None:
    lower = {"url": f"nvme://{tmp_path}/n?capacity=64MiB", "codecs": codecs}
    ids, kv = prompt(5, 3 * CHUNK)
    first = await AsyncKVStore.open(config("cpu://?capacity=16MiB", lower), NAMESPACE)
    try:
        await first.store(ids, kv)
        await first.flush()
    finally:
        await first.close()
    store = await AsyncKVStore.open(config("cpu://?capacity=16MiB", lower), NAMESPACE)
    try:
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert loaded.chunk_tiers == (store.tiers[1].name,) * 3
        await store.flush()
        again = await store.retrieve(ids)
        assert again.chunk_tiers == (store.tiers[0].name,) * 3
        assert again.kv is not None and torch.equal(again.kv, kv)
    finally:
        await store.close()


async def test_verification_defaults_per_tier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cpu_default = await AsyncKVStore.open(
        config("cpu://?capacity=16MiB", f"nvme://{tmp_path}/a?capacity=64MiB"), NAMESPACE
    )
    try:
        assert [tier.verify for tier in cpu_default.tiers] == [False, True]
    finally:
        await cpu_default.close()
    with caplog.at_level(logging.WARNING, logger="kvstore.store"):
        forced = await AsyncKVStore.open(
            config(
                {"url": "cpu://?capacity=16MiB", "verify": True},
                {"url": f"nvme://{tmp_path}/b?capacity=64MiB", "verify": False},
            ),
            NAMESPACE,
        )
    try:
        assert [tier.verify for tier in forced.tiers] == [True, True]
        assert "verify: false is ignored" in caplog.text
    finally:
        await forced.close()
    wrapped = FaultyDriver.wrap(await open_driver("cpu://?capacity=16MiB"), COUNT_ONLY)
    faulty = await AsyncKVStore.open(config("cpu://?capacity=16MiB"), NAMESPACE, drivers=[wrapped])
    try:
        assert faulty.tiers[0].verify, "a wrapper that may damage values is verified"
    finally:
        await faulty.close()


@pytest.mark.gpu
@pytest.mark.parametrize("codecs", ["raw", "int8"])
async def test_device_kv_crosses_to_the_host_once(codecs: str) -> None:
    """Device KV goes straight into lent pinned room (raw) or is quantized on the
    device first (int8), with no pageable host copy in between."""
    namespace = Namespace("hot-path-gpu", "rev", LAYOUT, chunk_tokens=CHUNK, codec=codecs)
    tier = {"url": "cpu://?capacity=16MiB", "codecs": codecs}
    store = await AsyncKVStore.open(config(tier), namespace)
    try:
        ids, kv = prompt(6, 3 * CHUNK)
        assert (await store.store(ids, kv.cuda())).written == 3
        out = torch.empty(LAYOUT.shape(3 * CHUNK), dtype=LAYOUT.torch_dtype, device="cuda")
        loaded = await store.retrieve(ids, out=out)
        assert loaded.kv is not None and loaded.tokens == 3 * CHUNK
        if codecs == "raw":
            assert torch.equal(loaded.kv.cpu(), kv)
        else:
            assert torch.allclose(loaded.kv.cpu().float(), kv.float(), atol=0.05, rtol=0.02)
    finally:
        await store.close()


async def test_chunks_the_first_tier_cannot_hold_still_reach_the_tier_below(
    tmp_path: Path,
) -> None:
    store = await AsyncKVStore.open(
        config(
            {"url": "cpu://?capacity=16MiB", "max_bytes": 2 * CHUNK_ROOM},
            f"nvme://{tmp_path}/n?capacity=64MiB",
        ),
        NAMESPACE,
    )
    try:
        ids, kv = prompt(7, 4 * CHUNK)
        result = await store.store(ids, kv)
        await store.flush()
        assert result.written == 2, "two chunks fit the first tier"
        assert len(store.tiers[1].index) == 4, "every chunk is written through below"
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def _hashed_flags(driver: Driver[Any], keys: list[bytes]) -> list[bool]:
    """Whether each chunk ``driver`` holds under ``keys`` carries its digest."""
    return [read_header(memoryview(v)).hashed for v in await driver.get_many(keys) if v]


async def test_a_tier_nobody_verifies_stores_unhashed_and_hashes_what_leaves_it(
    tmp_path: Path,
) -> None:
    """A write-back cpu tier that does not verify skips the digest on store; write-back,
    move and compress give every chunk that leaves it its digest, and the tier below
    verifies them."""
    cpu = await open_driver("cpu://?capacity=16MiB")
    nvme = await open_driver(f"nvme://{tmp_path}/n?capacity=64MiB")
    store = await AsyncKVStore.open(
        config(
            {
                "url": "cpu://?capacity=16MiB",
                "max_bytes": 3 * CHUNK_ROOM,
                "write_policy": "write-back",
            },
            f"nvme://{tmp_path}/n?capacity=64MiB",
        ),
        NAMESPACE,
        drivers=[cpu, nvme],
    )
    try:
        ids, kv = prompt(3, 5 * CHUNK)
        keys = store.keys(ids)
        assert (await store.store(ids[: 3 * CHUNK], kv[:, :, : 3 * CHUNK])).written == 3
        assert await _hashed_flags(cpu, keys[:3]) == [False] * 3
        assert (await store.compress(store.tiers[0].name, "raw")).unchanged == 3

        assert (await store.store(ids, kv)).written == 2, "two more chunks evict two"
        await store.flush()
        handed_down = [key for key in keys if key in store.tiers[1].index]
        assert len(handed_down) == 2
        assert await _hashed_flags(nvme, handed_down) == [True, True]

        moved = await store.move(store.tiers[0].name, store.tiers[1].name)
        assert moved.copied == 3 and moved.corrupt == 0
        assert await _hashed_flags(nvme, keys) == [True] * 5
        await store.clear(tier=store.tiers[0].name)
        loaded = await store.retrieve(ids)
        assert loaded.chunk_tiers[:5] == (store.tiers[1].name,) * 5
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


async def test_chunks_are_hashed_on_store_where_they_are_verified_or_written_through(
    tmp_path: Path,
) -> None:
    for tiers in (
        [{"url": "cpu://?capacity=16MiB", "verify": True}],
        ["cpu://?capacity=16MiB", f"nvme://{tmp_path}/n?capacity=64MiB"],
    ):
        cpu = await open_driver("cpu://?capacity=16MiB")
        below = [await open_driver(f"nvme://{tmp_path}/n?capacity=64MiB")] if len(tiers) > 1 else []
        store = await AsyncKVStore.open(config(*tiers), NAMESPACE, drivers=[cpu, *below])
        try:
            ids, kv = prompt(4, 2 * CHUNK)
            assert (await store.store(ids, kv)).written == 2
            assert await _hashed_flags(cpu, store.keys(ids)) == [True, True]
        finally:
            await store.close()
