"""Tests of the nvme driver beyond the conformance suite: its URL, O_DIRECT and its
fallback, the on-disk format, crash leftovers, the directory lock, capacity,
large values in pieces and the zero-copy read path."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import pickle
import resource
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.driver import Driver
from kvstore.drivers.nvme.config import NvmeConfig
from kvstore.drivers.nvme.directio import O_DIRECT, address_of, aligned_buffer
from kvstore.drivers.nvme.driver import NvmeDriver
from kvstore.drivers.nvme.layout import (
    ALIGN,
    HEADER_SIZE,
    TEMP_PREFIX,
    decode_header,
    entry_path,
    file_size,
    padded,
    shard_of,
)
from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverClosedError,
    DriverUnavailableError,
)
from kvstore.keys import Namespace, chunk_keys, storage_prefix
from kvstore.layout import KVLayout
from kvstore.registry import open_driver

MiB = 1 << 20
REFUSED = "buffered: O_DIRECT refused by the filesystem"


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


async def open_nvme(path: Path, capacity: str = "1GiB", **options: Any) -> NvmeDriver:
    return await NvmeDriver.open(NvmeConfig(path=str(path), capacity=capacity, **options))


def direct_io_works(path: Path) -> bool:
    probe = path / "probe"
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_CREAT | O_DIRECT))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return bool(O_DIRECT)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.glob("*/*") if p.name.startswith(TEMP_PREFIX)]


def existing(*paths: str | Path) -> list[Path]:
    return [Path(path) for path in paths if os.path.exists(path)]


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[NvmeDriver]:
    opened = await open_nvme(tmp_path / "store", io_block="1MiB")
    yield opened
    await opened.close()


def test_url_round_trip_and_pickle() -> None:
    config = NvmeConfig.from_url("nvme:///var/cache/kv?capacity=64GiB")
    assert (config.path, config.capacity) == ("/var/cache/kv", 64 << 30)
    assert (config.direct_io, config.io_threads, config.io_block, config.fsync) == (
        "auto",
        8,
        4 * MiB,
        True,
    )
    assert config.to_url() == "nvme:///var/cache/kv?capacity=64GiB"
    tuned = NvmeConfig.from_url(
        "nvme://cache/kv?capacity=512MiB&direct_io=off&io_threads=4&io_block=1MiB&fsync=false"
    )
    assert tuned.path == "cache/kv"
    assert NvmeConfig.from_url(tuned.to_url()) == tuned
    assert pickle.loads(pickle.dumps(tuned)) == tuned


@pytest.mark.parametrize(
    "url",
    [
        "nvme:///x",
        "nvme:///x?capacity=1GiB&io_block=1000",
        "nvme:///x?capacity=1GiB&direct_io=maybe",
        "nvme:///x?capacity=0",
        "nvme:///x?capacity=1GiB&io_threads=0",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        NvmeConfig.from_url(url)


async def test_registry_opens_the_driver_from_a_url(tmp_path: Path) -> None:
    opened: Driver[Any] = await open_driver(f"nvme://{tmp_path}/store?capacity=1MiB")
    try:
        assert isinstance(opened, NvmeDriver)
        assert NvmeDriver.static_capabilities.persistent
        caps = opened.capabilities
        assert (caps.persistent, caps.listable, caps.zero_copy, caps.shared) == (
            True,
            True,
            True,
            False,
        )
        assert caps.capacity_bytes == MiB
        assert caps.max_value_bytes == MiB - HEADER_SIZE  # the largest value whose file fits
        assert opened.footprint(caps.max_value_bytes) == MiB
    finally:
        await opened.close()


async def test_uses_o_direct_where_the_filesystem_allows_it(tmp_path: Path) -> None:
    if not direct_io_works(tmp_path):
        pytest.skip("the filesystem under tmp_path refuses O_DIRECT")
    async with await open_nvme(tmp_path / "store", direct_io="on") as opened:
        assert opened.capabilities.detail("io") == "O_DIRECT"
        value = payload(3 * ALIGN + 5)
        await opened.put_many([(b"k", value)])
        target = aligned_buffer(padded(len(value)))
        target[:] = b"\xaa" * len(target)
        (got,) = await opened.get_many([b"k"], into=[target])
        assert got is not None and bytes(got) == value
        # O_DIRECT read the file's zero padding straight into the buffer.
        assert bytes(target[len(value) :]) == bytes(len(target) - len(value))


@pytest.fixture
def tmpfs_store(tmp_path: Path) -> Iterator[Path]:
    """A store path on tmpfs (/dev/shm), whose filesystem refuses O_DIRECT on older kernels."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this system")
    if direct_io_works(shm):
        pytest.skip("this kernel's tmpfs accepts O_DIRECT, so it cannot show the fallback")
    store = shm / f"kvstore-nvme-test-{os.getpid()}-{tmp_path.name}"
    yield store
    shutil.rmtree(store, ignore_errors=True)


async def test_tmpfs_refusing_o_direct_falls_back(tmpfs_store: Path) -> None:
    async with await open_nvme(tmpfs_store) as opened:
        assert opened.capabilities.detail("io") == REFUSED
        await opened.put_many([(b"k", b"value")])
        assert await opened.get_many([b"k"]) == [b"value"]
    with pytest.raises(DriverUnavailableError, match="O_DIRECT refused"):
        await open_nvme(tmpfs_store, direct_io="on")


@pytest.fixture
def refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every O_DIRECT open fail with EINVAL, as a filesystem without it does."""
    if not O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real_open: Callable[..., int] = os.open

    def open_without_direct(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_direct)


@pytest.mark.usefixtures("refuse_o_direct")
async def test_refused_o_direct_falls_back_to_buffered_io(tmp_path: Path) -> None:
    async with await open_nvme(tmp_path / "store", io_block="64KiB") as opened:
        assert opened.capabilities.detail("io") == REFUSED
        value = payload(300_001)
        await opened.put_many([(b"k", value)])
        target = bytearray(len(value) + 1)
        (got,) = await opened.get_many([b"k"], into=[target])
        assert got is not None and got.obj is target and bytes(got) == value
    with pytest.raises(DriverUnavailableError, match="O_DIRECT refused by the filesystem"):
        await open_nvme(tmp_path / "store", direct_io="on")


async def test_direct_io_off_is_buffered(tmp_path: Path) -> None:
    async with await open_nvme(tmp_path / "store", direct_io="off") as opened:
        assert opened.capabilities.detail("io") == "buffered: direct_io=off"
        await opened.put_many([(b"k", b"v" * 10_000)])
        assert [bytes(v) for v in await opened.get_many([b"k"]) if v] == [b"v" * 10_000]


async def test_file_layout_and_header(driver: NvmeDriver, tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    value = payload(5000)
    long_key = bytes(range(256))
    await driver.put_many([(b"\x12\x34", value), (long_key, b"long"), (b"empty", b"")])
    path = entry_path(root, b"\x12\x34")
    assert path == os.path.join(root, shard_of(b"\x12\x34"), "1234")
    data = read_bytes(path)
    assert len(data) == file_size(len(value)) == HEADER_SIZE + 2 * ALIGN
    assert decode_header(data[:HEADER_SIZE]) == (b"\x12\x34", len(value))
    assert data[HEADER_SIZE : HEADER_SIZE + len(value)] == value
    assert len(read_bytes(entry_path(root, b"empty"))) == HEADER_SIZE
    assert len(os.path.basename(entry_path(root, long_key))) < 100
    assert await driver.get_many([long_key, b"empty"]) == [b"long", b""]


async def test_storage_keys_spread_over_the_shards(tmp_path: Path) -> None:
    """Every storage key of a namespace starts with the same tenant and namespace
    tags; the shard is chosen by a hash of the whole key, so they still spread."""
    namespace = Namespace("model", "rev", KVLayout(2, 2, 32), chunk_tokens=4)
    keys = [
        storage_prefix(namespace) + key
        for key in chunk_keys(namespace.digest(), list(range(4 * 116)), 4)
    ]
    async with await open_nvme(tmp_path / "store", fsync=False) as opened:
        await opened.put_many([(key, b"v") for key in keys])
    shards = {Path(entry_path(str(tmp_path / "store"), key)).parent.name for key in keys}
    assert len(shards) > 64  # 116 keys over 256 shards: about 93 expected, 1 by first byte
    for shard in shards:
        assert any((tmp_path / "store" / shard).iterdir())


async def test_files_of_the_first_byte_layout_are_moved_into_place(tmp_path: Path) -> None:
    """Directories written when the shard was the key's first byte stay readable."""
    root = tmp_path / "store"
    values = {f"key-{i}".encode(): payload(5000, seed=i) for i in range(8)}
    async with await open_nvme(root) as first:
        await first.put_many(list(values.items()))
    for key in values:
        old = root / f"{key[0]:02x}" / key.hex()
        os.replace(entry_path(str(root), key), old)
    async with await open_nvme(root) as reopened:
        got = await reopened.get_many(list(values))
        assert [bytes(v) if v else None for v in got] == list(values.values())
    placed = [Path(entry_path(str(root), key)) for key in values]
    assert existing(*placed) == placed
    assert not any((root / f"{b'k'[0]:02x}").iterdir())


async def test_values_persist_across_reopen(tmp_path: Path) -> None:
    values = {f"key-{i}".encode(): payload(i * 3000 + 1, seed=i) for i in range(6)}
    values[bytes(range(256))] = b"long key"
    async with await open_nvme(tmp_path / "store") as first:
        await first.put_many(list(values.items()))
        await first.delete_many([b"key-0"])
    del values[b"key-0"]
    async with await open_nvme(tmp_path / "store") as second:
        assert [bytes(v) if v else None for v in await second.get_many(list(values))] == list(
            values.values()
        )
        listed = {entry.key: entry.size async for entry in second.list()}
        assert listed == {key: len(value) for key, value in values.items()}
        usage = await second.usage()
        assert (usage.entries, usage.bytes) == (len(values), sum(map(len, values.values())))
        assert await second.contains_many([b"key-0", b"key-1"]) == [False, True]


async def test_crash_leftovers_are_invisible_and_cleaned(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with await open_nvme(root) as opened:
        await opened.put_many([(b"kept", payload(9000)), (b"torn", payload(9000, seed=1))])
    torn = Path(entry_path(str(root), b"torn"))
    os.truncate(torn, HEADER_SIZE + ALIGN)
    half_written = root / "6b" / f"{TEMP_PREFIX}0123456789abcdef"
    half_written.write_bytes(b"\0" * 1000)
    foreign = root / "66" / "666f726569676e"
    foreign.write_bytes(b"not a value file")
    async with await open_nvme(root) as reopened:
        assert existing(torn, half_written, foreign) == []
        assert temp_files(root) == []
        assert await reopened.contains_many([b"kept", b"torn", b"foreign"]) == [True, False, False]
        assert await reopened.get_many([b"torn"]) == [None]
        assert [bytes(v) for v in await reopened.get_many([b"kept"]) if v] == [payload(9000)]
        assert (await reopened.usage()).bytes == 9000


async def test_file_truncated_under_an_open_driver_reads_as_a_miss(
    driver: NvmeDriver, tmp_path: Path
) -> None:
    await driver.put_many([(b"small", payload(9000)), (b"big", payload(3 * MiB))])
    for key in (b"small", b"big"):
        path = entry_path(str(tmp_path / "store"), key)
        os.truncate(path, HEADER_SIZE + ALIGN)
        assert await driver.get_many([key]) == [None]
        assert existing(path) == []
    assert await driver.contains_many([b"small", b"big"]) == [False, False]
    assert (await driver.usage()).bytes == 0


async def test_with_one_slot_a_second_driver_cannot_open_a_locked_directory(
    tmp_path: Path,
) -> None:
    first = await open_nvme(tmp_path / "store", slots=1)
    try:
        with pytest.raises(DriverUnavailableError, match="in use by another open nvme driver"):
            await open_nvme(tmp_path / "store", slots=1)
    finally:
        await first.close()
    second = await open_nvme(tmp_path / "store", slots=1)
    await second.close()


async def test_drivers_sharing_a_directory_take_private_slots(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = await open_nvme(root, slots=3)
    second = await open_nvme(root, slots=3)
    third = await open_nvme(root, slots=3)
    try:
        assert first.capabilities.detail("path") == str(root)
        assert second.capabilities.detail("path") == str(root / "slots" / "1")
        assert third.capabilities.detail("path") == str(root / "slots" / "2")
        await first.put_many([(b"k", b"first")])
        await second.put_many([(b"k", b"second")])
        assert await third.get_many([b"k"]) == [None]
        with pytest.raises(DriverUnavailableError, match="all 3 slots are taken"):
            await open_nvme(root, slots=3)
    finally:
        await second.close()
    async with await open_nvme(root, slots=3) as reopened:  # the free slot, values kept
        assert reopened.capabilities.detail("path") == str(root / "slots" / "1")
        assert await reopened.get_many([b"k"]) == [b"second"]
    await first.close()
    await third.close()


async def test_capacity_is_a_hard_limit_on_file_bytes(tmp_path: Path) -> None:
    """Capacity counts each value's file: a 4 KiB header plus the value padded to 4 KiB."""
    async with await open_nvme(tmp_path / "store", capacity="64KiB") as opened:
        assert opened.footprint(40_000) == file_size(40_000) == HEADER_SIZE + 40 * 1024
        await opened.put_many([(b"a", bytes(40_000))])  # 44 KiB on disk
        with pytest.raises(CapacityError):
            await opened.put_many([(b"b", bytes(20_000))])  # 24 KiB more
        with pytest.raises(CapacityError):
            await opened.put_many([(b"huge", bytes(64 * 1024 - HEADER_SIZE + 1))])
        with pytest.raises(CapacityError):
            await opened.put_many([(b"c", bytes(5_000)), (b"d", bytes(5_000))])
        assert await opened.contains_many([b"b", b"c", b"d"]) == [False, False, False]
        await opened.put_many([(b"e", bytes(16 * 1024 - HEADER_SIZE))])  # exactly full
        usage = await opened.usage()
        assert (usage.entries, usage.bytes, usage.capacity_bytes) == (2, 52_288, 64 * 1024)
        await opened.delete_many([b"a"])
        await opened.put_many([(b"b", bytes(20_000))])


async def test_full_disk_is_a_capacity_error(tmp_path: Path) -> None:
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    opened = await open_nvme(tmp_path / "store")
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, limits[1]))
        with pytest.raises(CapacityError, match="full"):
            await opened.put_many([(b"k", bytes(3 * MiB))])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert await opened.contains_many([b"k"]) == [False]
    assert temp_files(tmp_path / "store") == []
    await opened.put_many([(b"k", bytes(3 * MiB))])
    await opened.close()


async def test_other_disk_failures_are_driver_unavailable(
    driver: NvmeDriver, tmp_path: Path
) -> None:
    shard = tmp_path / "store" / shard_of(b"a")
    shard.rmdir()
    shard.write_bytes(b"")
    with pytest.raises(DriverUnavailableError):
        await driver.put_many([(b"a", b"value")])
    assert (await driver.usage()).bytes == 0


@pytest.mark.parametrize("aligned_source", [True, False])
async def test_large_values_move_in_parallel_pieces(tmp_path: Path, aligned_source: bool) -> None:
    size = 33 * MiB + 123
    value = payload(size, seed=7)
    source: memoryview | bytes = value
    if aligned_source:
        aligned_copy = aligned_buffer(size)
        aligned_copy[:] = value
        source = aligned_copy
    async with await open_nvme(tmp_path / "store", io_block="4MiB", fsync=False) as opened:
        await opened.put_many([(b"big", source), (b"small", b"x")])
        (fresh,) = await opened.get_many([b"big"])
        assert fresh is not None and fresh == value
        unaligned = bytearray(size + 1)
        aligned = mmap.mmap(-1, padded(size))
        in_unaligned, in_aligned = await opened.get_many(
            [b"big", b"big"], into=[memoryview(unaligned)[1:], aligned]
        )
        assert in_unaligned is not None and in_unaligned == value
        assert in_aligned is not None and in_aligned == value
        assert address_of(in_aligned) == address_of(memoryview(aligned))


async def test_aligned_into_buffer_is_filled_in_place(driver: NvmeDriver) -> None:
    value = payload(2 * MiB + 3 * ALIGN + 17)
    await driver.put_many([(b"k", value)])
    covering = aligned_buffer(padded(len(value)) + ALIGN)
    exact = aligned_buffer(len(value))
    short = aligned_buffer(len(value) - 1)
    got = await driver.get_many([b"k", b"k", b"k"], into=[covering, exact, short])
    assert all(view is not None and view == value for view in got)
    assert got[0] is not None and address_of(got[0]) == address_of(covering)
    assert got[1] is not None and address_of(got[1]) == address_of(exact)
    assert got[2] is not None and address_of(got[2]) != address_of(short)


async def test_duplicate_keys_in_a_batch_keep_the_last_value(driver: NvmeDriver) -> None:
    await driver.put_many([(b"k", b"first"), (b"k", b"second")])
    assert await driver.get_many([b"k"]) == [b"second"]
    assert (await driver.usage()).bytes == len(b"second")


async def test_concurrent_replacements_never_tear(driver: NvmeDriver) -> None:
    versions = [payload(size, seed=size) for size in (5000, 2 * MiB + 1, 300_000)]

    async def writer(round_index: int) -> None:
        await driver.put_many([(b"k", versions[round_index % len(versions)])])

    await writer(0)
    for round_index in range(6):
        results = await asyncio.gather(writer(round_index), driver.get_many([b"k", b"k"]))
        assert all(value is not None and bytes(value) in versions for value in results[1])
    assert (await driver.usage()).bytes == len(versions[5 % len(versions)])


async def test_cancelled_put_leaves_no_temp_files_or_reservations(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with await open_nvme(root, capacity="24MiB", io_block="1MiB") as opened:
        task = asyncio.ensure_future(opened.put_many([(b"big", bytes(20 * MiB))]))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert temp_files(root) == []
        await opened.delete_many([b"big"])
        await opened.put_many([(b"other", bytes(24 * MiB - HEADER_SIZE))])


async def test_close_releases_the_directory(tmp_path: Path) -> None:
    opened = await open_nvme(tmp_path / "store")
    await opened.close()
    with pytest.raises(DriverClosedError):
        await opened.get_many([b"k"])
    await opened.close()
    async with await open_nvme(tmp_path / "store"):
        pass
