"""Tests of the cpu driver: config URLs, pinning, capacity, churn, concurrency, zero copy."""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import pickle
import random
import resource
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.driver import KeyEntry
from kvstore.drivers.cpu import pinned
from kvstore.drivers.cpu.driver import CpuConfig, CpuDriver
from kvstore.drivers.cpu.pages import PageAllocator, page_segments, pages_for
from kvstore.errors import CapacityError, ConfigError, DriverClosedError, DriverUnavailableError
from kvstore.sync import LoopThread, SyncDriver

KiB = 1 << 10
MiB = 1 << 20


def locked_bytes() -> int | None:
    """This process's locked memory (VmLck), or None where /proc does not say."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * KiB
    return None


def pattern(fill: int, size: int) -> bytes:
    """A value whose every byte is ``fill``: a torn read shows as mixed bytes."""
    return bytes([fill]) * size


def assert_whole(value: memoryview, size_of_fill: dict[int, int]) -> None:
    array = np.frombuffer(value, dtype=np.uint8)
    assert len(array) > 0
    fill = int(array[0])
    assert len(array) == size_of_fill[fill]
    assert (array == fill).all()


@pytest.fixture
async def driver() -> AsyncIterator[CpuDriver]:
    opened = await CpuDriver.open(CpuConfig(capacity=16 * MiB, page_size=64 * KiB, pin="none"))
    yield opened
    await opened.close()


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("cpu://", "cpu://"),
        ("cpu://?capacity=4GiB&pin=auto", "cpu://?capacity=4GiB"),
        ("cpu://?capacity=4294967296", "cpu://?capacity=4GiB"),
        (
            "cpu://?capacity=64MiB&pin=mlock&page_size=64KiB&copy_threads=2",
            "cpu://?capacity=64MiB&pin=mlock&page_size=64KiB&copy_threads=2",
        ),
    ],
)
def test_url_round_trip(url: str, canonical: str) -> None:
    config = CpuConfig.from_url(url)
    assert config.to_url() == canonical
    assert CpuConfig.from_url(config.to_url()) == config


def test_config_defaults_and_pickle() -> None:
    config = CpuConfig.from_url("cpu://?capacity=2GiB&pin=none")
    assert config.capacity == 2 << 30
    assert config.page_size == 256 * KiB
    restored = pickle.loads(pickle.dumps(config))
    assert restored == config
    assert restored.to_url() == "cpu://?capacity=2GiB&pin=none"


@pytest.mark.parametrize(
    "url",
    [
        "cpu://?pin=sometimes",
        "cpu://?capacity=1000000",
        "cpu://?capacity=1MiB&page_size=2MiB",
        "cpu://?page_size=1000",
        "cpu://?copy_threads=0",
        "cpu://?colour=blue",
        "cpu://somewhere",
    ],
)
def test_bad_config_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        CpuConfig.from_url(url)


def test_page_segments_merge_neighbouring_pages() -> None:
    assert page_segments([0, 1, 2, 5, 6, 9], 10, 55) == [(0, 30), (50, 20), (90, 5)]
    assert page_segments([], 10, 0) == []
    allocator = PageAllocator(8)
    first = allocator.allocate(3)
    second = allocator.allocate(2)
    allocator.release(first)
    assert allocator.allocate(4) == [0, 1, 2, 5]
    assert second == [3, 4]
    assert pages_for(0, 10) == 0
    assert pages_for(11, 10) == 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["allocate", "run", "release"]), st.integers(1, 9)),
        max_size=60,
    )
)
def test_page_allocator_hands_out_the_lowest_free_pages(operations: list[tuple[str, int]]) -> None:
    """Against a model that keeps every free page: the lowest pages for ``allocate``,
    the lowest neighbouring run for ``allocate_run``, any order of releases."""
    allocator = PageAllocator(32)
    free = set(range(32))
    held: list[list[int]] = []
    for operation, count in operations:
        if operation == "release":
            if held:
                pages = held.pop(count % len(held))
                allocator.release(pages[::-1])
                free.update(pages)
        elif operation == "allocate" and count <= len(free):
            pages = allocator.allocate(count)
            assert pages == sorted(free)[:count]
            free.difference_update(pages)
            held.append(pages)
        elif operation == "run":
            starts = [p for p in sorted(free) if all(p + i in free for i in range(count))]
            run = allocator.allocate_run(count)
            assert run == (list(range(starts[0], starts[0] + count)) if starts else None)
            if run is not None:
                free.difference_update(run)
                held.append(run)
        assert allocator.free_count == len(free)
    with pytest.raises(ValueError, match="pages requested"):
        allocator.allocate(len(free) + 1)


async def test_capabilities(driver: CpuDriver) -> None:
    static = CpuDriver.static_capabilities
    assert (static.persistent, static.listable, static.zero_copy, static.shared) == (
        False,
        True,
        True,
        False,
    )
    capabilities = driver.capabilities
    assert capabilities.zero_copy
    assert capabilities.listable
    assert not capabilities.persistent
    assert not capabilities.shared
    assert capabilities.capacity_bytes == 16 * MiB
    assert capabilities.max_value_bytes == 16 * MiB
    assert capabilities.detail("pinning") == "none"
    assert capabilities.detail("page_size") == "64KiB"


async def test_auto_pinning_is_reported_and_real() -> None:
    before = locked_bytes()
    driver = await CpuDriver.open(CpuConfig(capacity=4 * MiB))
    try:
        pinning = driver.capabilities.detail("pinning")
        assert pinning is not None
        assert pinning in ("cuda", "mlock") or pinning.startswith("none: mlock failed: ")
        if pinning == "mlock" and before is not None:
            locked = locked_bytes()
            assert locked is not None
            assert locked - before >= 4 * MiB
    finally:
        await driver.close()
    if pinning == "mlock" and before is not None:
        assert locked_bytes() == before


async def test_memlock_limit_falls_back_to_pageable_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, hard))
    try:
        with caplog.at_level(logging.WARNING):
            driver = await CpuDriver.open(CpuConfig(capacity=4 * MiB))
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    try:
        pinning = driver.capabilities.detail("pinning")
        if pinning in ("cuda", "mlock"):
            pytest.skip(f"pinning={pinning}: this process may pin past RLIMIT_MEMLOCK")
        assert pinning is not None
        assert pinning.startswith("none: mlock failed: ")
        assert "RLIMIT_MEMLOCK" in pinning
        assert "pageable" in caplog.text
        await driver.put_many([(b"k", b"still works")])
        assert [bytes(v) for v in await driver.get_many([b"k"]) if v is not None] == [
            b"still works"
        ]
    finally:
        await driver.close()


async def test_failed_mlock_falls_back_under_auto_and_fails_when_asked_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(address: int, size: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(pinned, "_mlock", refuse)
    monkeypatch.setattr(pinned, "_cuda_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        driver = await CpuDriver.open(CpuConfig(capacity=1 * MiB))
    assert driver.capabilities.detail("pinning") == (
        "none: mlock failed: [Errno 1] Operation not permitted"
    )
    assert "pageable" in caplog.text
    await driver.close()
    with pytest.raises(DriverUnavailableError, match="pin=mlock"):
        await CpuDriver.open(CpuConfig(capacity=1 * MiB, pin="mlock"))


async def test_cuda_pinning_needs_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinned, "_cuda_available", lambda: False)
    with pytest.raises(DriverUnavailableError, match="CUDA"):
        await CpuDriver.open(CpuConfig(capacity=1 * MiB, pin="cuda"))


@pytest.mark.gpu
async def test_cuda_pinning() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    driver = await CpuDriver.open(CpuConfig(capacity=8 * MiB, pin="cuda"))
    try:
        assert driver.capabilities.detail("pinning") == "cuda"
        await driver.put_many([(b"k", pattern(7, 3 * MiB))])
        (value,) = await driver.get_many([b"k"])
        assert value is not None
        assert bytes(value) == pattern(7, 3 * MiB)
    finally:
        await driver.close()


async def test_capacity_is_a_hard_limit(driver: CpuDriver) -> None:
    with pytest.raises(CapacityError):
        await driver.put_many([(b"huge", bytes(16 * MiB + 1))])
    await driver.put_many([(b"full", pattern(1, 16 * MiB))])
    assert driver.free_bytes == 0
    with pytest.raises(CapacityError):
        await driver.put_many([(b"more", b"x")])
    # Overwriting the only value still fits: its old pages make room.
    await driver.put_many([(b"full", pattern(2, 16 * MiB))])
    (value,) = await driver.get_many([b"full"])
    assert value is not None
    assert bytes(value) == pattern(2, 16 * MiB)
    await driver.delete_many([b"full"])
    # A batch that does not fit stores none of its items.
    with pytest.raises(CapacityError):
        await driver.put_many([(b"a", bytes(9 * MiB)), (b"b", bytes(9 * MiB))])
    assert await driver.contains_many([b"a", b"b"]) == [False, False]
    assert driver.free_bytes == 16 * MiB


async def test_churn_does_not_fragment(driver: CpuDriver) -> None:
    rng = np.random.default_rng(1234)
    page = 64 * KiB
    expected: dict[bytes, bytes] = {}
    keys = [f"key-{i}".encode() for i in range(40)]
    for _ in range(1500):
        key = keys[int(rng.integers(len(keys)))]
        if rng.random() < 0.3:
            assert await driver.delete_many([key]) == [key in expected]
            expected.pop(key, None)
            continue
        value = rng.integers(0, 256, int(rng.integers(0, 3 * MiB // 2)), dtype=np.uint8)
        try:
            await driver.put_many([(key, value)])
        except CapacityError:
            victims = list(expected)[: len(expected) // 2]
            await driver.delete_many(victims)
            for victim in victims:
                del expected[victim]
            continue
        expected[key] = value.tobytes()
    for victim in list(expected)[::2]:
        await driver.delete_many([victim])
        del expected[victim]

    used_pages = sum(pages_for(len(value), page) for value in expected.values())
    assert driver.free_bytes == 16 * MiB - used_pages * page
    usage = await driver.usage()
    assert (usage.entries, usage.bytes) == (len(expected), sum(map(len, expected.values())))

    free = driver.free_bytes
    await driver.put_many([(b"all-the-rest", pattern(9, free))])
    assert driver.free_bytes == 0
    with pytest.raises(CapacityError):
        await driver.put_many([(b"one-more", b"x")])
    values = await driver.get_many([*expected, b"all-the-rest"])
    for value, wanted in zip(values, [*expected.values(), pattern(9, free)], strict=True):
        assert value is not None
        assert bytes(value) == wanted


async def test_list_usage_and_delete(driver: CpuDriver) -> None:
    await driver.put_many([(b"a", b"12345"), (b"b", b""), (b"a", b"123")])
    entries = sorted([entry async for entry in driver.list()], key=lambda e: e.key)
    assert entries == [KeyEntry(b"a", 3), KeyEntry(b"b", 0)]
    usage = await driver.usage()
    assert (usage.entries, usage.bytes, usage.capacity_bytes) == (2, 3, 16 * MiB)
    assert await driver.delete_many([b"a", b"zz"]) == [True, False]
    assert await driver.contains_many([b"a", b"b"]) == [False, True]
    (empty,) = await driver.get_many([b"b"])
    assert empty is not None
    assert bytes(empty) == b""
    assert driver.free_bytes == 16 * MiB


async def test_concurrent_tasks_never_see_torn_values() -> None:
    driver = await CpuDriver.open(
        CpuConfig(capacity=64 * MiB, page_size=64 * KiB, pin="none", copy_threads=4)
    )
    size_of_fill = {fill: (fill % 7 + 1) * 512 * KiB + fill for fill in range(1, 40)}
    keys = [b"k0", b"k1", b"k2"]
    rng = random.Random(5)

    async def writer() -> None:
        for _ in range(60):
            fill = rng.randrange(1, 40)
            await driver.put_many([(rng.choice(keys), pattern(fill, size_of_fill[fill]))])

    async def deleter() -> None:
        for _ in range(30):
            await driver.delete_many([rng.choice(keys)])
            await asyncio.sleep(0)

    async def reader() -> None:
        buffers: list[bytearray | None] = [bytearray(4 * MiB), None, bytearray(MiB)]
        for _ in range(60):
            for value in await driver.get_many(keys, into=buffers):
                if value is not None:
                    assert_whole(value, size_of_fill)

    try:
        await asyncio.gather(
            *(writer() for _ in range(3)), deleter(), *(reader() for _ in range(6))
        )
        entries = [entry async for entry in driver.list()]
        used = sum(pages_for(entry.size, 64 * KiB) for entry in entries)
        assert driver.free_bytes == 64 * MiB - used * 64 * KiB
    finally:
        await driver.close()


async def test_pages_being_read_outlive_a_delete_and_overwrite() -> None:
    driver = await CpuDriver.open(CpuConfig(capacity=32 * MiB, page_size=64 * KiB, pin="none"))
    try:
        await driver.put_many([(b"k", pattern(1, 12 * MiB))])
        read = asyncio.create_task(driver.get_many([b"k"]))
        await asyncio.sleep(0)  # the read has pinned the value and is copying it
        assert await driver.delete_many([b"k"]) == [True]
        assert driver.free_bytes == 20 * MiB
        await driver.put_many([(b"k", pattern(2, 12 * MiB))])
        (old,) = await read
        assert old is not None
        assert bytes(old) == pattern(1, 12 * MiB)
        assert driver.free_bytes == 20 * MiB
        (new,) = await driver.get_many([b"k"])
        assert new is not None
        assert bytes(new) == pattern(2, 12 * MiB)
    finally:
        await driver.close()


async def test_a_loan_holds_only_the_values_it_lends(driver: CpuDriver) -> None:
    page = 64 * KiB
    await driver.put_many(
        [(b"a", pattern(1, page)), (b"gap", pattern(2, page)), (b"b", pattern(3, page))]
    )
    await driver.delete_many([b"gap"])
    await driver.put_many([(b"split", pattern(4, 2 * page))])  # pages 1 and 3: two runs
    free = driver.free_bytes
    async with driver.borrow_many([b"a", b"split"]) as (lent, split):
        assert lent is not None and split is None
        assert await driver.delete_many([b"a", b"split"]) == [True, True]
        assert driver.free_bytes == free + 2 * page  # the value not lent is freed at once
        assert bytes(lent) == pattern(1, page)
    assert driver.free_bytes == free + 3 * page  # the lent one when the loan ends


def test_concurrent_threads_never_see_torn_values() -> None:
    loop = LoopThread("cpu-driver-test")
    config = CpuConfig(capacity=64 * MiB, page_size=64 * KiB, pin="none")
    store = SyncDriver(loop.run(CpuDriver.open(config)), loop)
    size_of_fill = {fill: fill * 97 * KiB + fill for fill in range(1, 30)}
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                key = rng.choice([b"a", b"b"])
                action = rng.random()
                if action < 0.4:
                    fill = rng.randrange(1, 30)
                    store.put_many([(key, pattern(fill, size_of_fill[fill]))])
                elif action < 0.5:
                    store.delete_many([key])
                else:
                    (value,) = store.get_many([key])
                    if value is not None:
                        assert_whole(value, size_of_fill)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures
    finally:
        store.close()
        loop.stop()


async def test_get_into_buffers_writes_in_place(driver: CpuDriver) -> None:
    big = np.random.default_rng(0).integers(0, 256, 3 * MiB + 5, dtype=np.uint8).tobytes()
    await driver.put_many([(b"big", big), (b"small", b"hello")])
    big_buffer = bytearray(4 * MiB)
    small_buffer = np.zeros(16, dtype=np.uint8)
    tight = bytearray(4)
    results = await driver.get_many(
        [b"big", b"small", b"small", b"missing", b"big"],
        into=[big_buffer, small_buffer, tight, bytearray(8), None],
    )
    big_view, small_view, fresh, missing, big_copy = results
    assert big_view is not None
    assert big_view.obj is big_buffer
    assert len(big_view) == len(big)
    assert bytes(big_buffer[: len(big)]) == big
    assert small_view is not None
    assert small_view.obj is small_buffer
    assert small_buffer[:5].tobytes() == b"hello"
    assert fresh is not None
    assert bytes(fresh) == b"hello"
    assert tight == bytearray(4)
    assert missing is None
    assert big_copy is not None
    assert bytes(big_copy) == big


async def test_cancelled_copies_leave_no_partial_value_or_leak(driver: CpuDriver) -> None:
    value = pattern(3, 12 * MiB)
    put = asyncio.create_task(driver.put_many([(b"k", value)]))
    await asyncio.sleep(0)
    put.cancel()
    try:
        await put
    except asyncio.CancelledError:
        assert await driver.contains_many([b"k"]) == [False]
        assert driver.free_bytes == 16 * MiB
    await driver.put_many([(b"k", value)])
    get = asyncio.create_task(driver.get_many([b"k"]))
    await asyncio.sleep(0)
    get.cancel()
    await asyncio.gather(get, return_exceptions=True)
    assert await driver.delete_many([b"k"]) == [True]
    assert driver.free_bytes == 16 * MiB


async def test_close_releases_the_arena() -> None:
    before = locked_bytes()
    driver = await CpuDriver.open(CpuConfig(capacity=2 * MiB, pin="auto"))
    await driver.put_many([(b"k", b"v")])
    await driver.close()
    assert driver.closed
    if driver.capabilities.detail("pinning") == "mlock" and before is not None:
        assert locked_bytes() == before
    with pytest.raises(DriverClosedError):
        await driver.get_many([b"k"])
    await driver.close()


async def test_shared_arena_is_one_memory_with_another_mapping() -> None:
    """``shared=true``: a second mapping of the memfd sees what the driver stores,
    and room written through it is a value once committed, not before."""
    opened = await CpuDriver.open(
        CpuConfig(capacity=4 * MiB, page_size=64 * KiB, pin="none", shared=True)
    )
    try:
        fd = opened.shared_memory
        assert fd is not None
        assert opened.capabilities.detail("memory") == "shared memfd"
        view = mmap.mmap(fd, 4 * MiB, flags=mmap.MAP_SHARED)
        await opened.put_many([(b"a", pattern(7, 100 * KiB))])
        (entry,) = opened.lend([b"a"])
        assert entry is not None
        seen = b"".join(view[offset : offset + length] for offset, length in entry.segments)
        assert seen == pattern(7, 100 * KiB)
        opened.end_loan([entry])

        (room,) = opened.reserve_room([(b"b", 70 * KiB)])
        for offset, length in room.segments:
            view[offset : offset + length] = pattern(9, length)
        assert await opened.contains_many([b"b"]) == [False]
        opened.commit_room([b"b"], [room])
        assert bytes((await opened.get_many([b"b"]))[0] or b"") == pattern(9, 70 * KiB)

        free = opened.free_bytes
        (aborted,) = opened.reserve_room([(b"c", 64 * KiB)])
        assert opened.free_bytes == free - 64 * KiB
        opened.abort_room([aborted])
        assert opened.free_bytes == free
        view.close()
    finally:
        await opened.close()


async def test_a_lent_entry_outlives_delete_and_overwrite(driver: CpuDriver) -> None:
    await driver.put_many([(b"k", pattern(1, 128 * KiB))])
    free = driver.free_bytes
    (entry,) = driver.lend([b"k"])
    await driver.delete_many([b"k"])
    await driver.put_many([(b"k", pattern(2, 128 * KiB))])
    assert driver.free_bytes == free - 128 * KiB
    driver.end_loan([entry])
    assert driver.free_bytes == free
