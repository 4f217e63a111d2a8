"""The fsspec driver on memory, local files and a real S3 server (moto's, as its own process)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from s3_server import MotoS3Server as MotoServer
from s3_server import free_port

from kvstore.config import StoreConfig
from kvstore.conformance import (
    BatchTests,
    CapacityTests,
    ConcurrencyTests,
    CoreTests,
    DriverTests,
    ErrorTests,
    FaultTests,
    KeySpecTests,
    LoanTests,
    PersistenceTests,
)
from kvstore.driver import Driver
from kvstore.drivers.fsspec.baseline import RawClientBaseline
from kvstore.drivers.fsspec.config import FsspecConfig, decode_option, encode_option
from kvstore.drivers.fsspec.driver import FsspecDriver
from kvstore.drivers.fsspec.layout import SEGMENT_HEX, key_of, relative_path, temp_path
from kvstore.errors import (
    ConfigError,
    DriverLoadError,
    DriverTimeoutError,
    DriverUnavailableError,
    TransientError,
)
from kvstore.inflight import CallAbandoned, CallLease
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import open_driver, parse_url
from kvstore.store import AsyncKVStore

BUCKET = "kvstore-fsspec"
FAIL_FAST = '{"retries":{"max_attempts":1},"connect_timeout":2,"read_timeout":10}'
"""botocore settings for the fault tests: no retries of its own, so a dead server is
an error at once and a frozen one is the driver's timeout."""

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("fsspec-test-model", "rev", LAYOUT, chunk_tokens=CHUNK)


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    """One S3 server for the module's tests that do not kill it."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_url(moto_server: MotoServer) -> str:
    """A driver URL with a prefix of its own, so tests never see each other's keys."""
    return moto_server.fsspec_url(f"{BUCKET}/{unique('t')}")


@pytest.fixture
def killable_server() -> Iterator[MotoServer]:
    """A server of the test's own, to kill, freeze and restart."""
    with MotoServer() as server:
        yield server


async def opened(url: str) -> FsspecDriver:
    driver = await open_driver(url)
    assert isinstance(driver, FsspecDriver)
    return driver


# ------------------------------------------------------------------ conformance


class TestMemoryConformance(DriverTests):
    @pytest.fixture
    def driver_config(self) -> str:
        return f"fsspec+memory://{unique('kv')}"


class TestFileConformance(DriverTests):
    @pytest.fixture
    def driver_config(self, tmp_path: Path) -> str:
        return f"fsspec+file://{tmp_path}/kv"


class TestS3Conformance(
    LoanTests, ErrorTests, CapacityTests, PersistenceTests, CoreTests, KeySpecTests
):
    """The quick areas against the S3 server; the rest is TestS3ConformanceUnderLoad."""

    @pytest.fixture
    def driver_config(self, s3_url: str) -> str:
        return s3_url


@pytest.mark.slow
class TestS3ConformanceUnderLoad(FaultTests, ConcurrencyTests, BatchTests):
    """The areas that send hundreds of requests, slow on moto's single process."""

    @pytest.fixture
    def driver_config(self, s3_url: str) -> str:
        return s3_url


# ---------------------------------------------------------------------- config


def test_url_round_trip_with_typed_storage_options() -> None:
    url = (
        "fsspec+s3://bucket/pre%20fix?shard_depth=2&timeout_s=5&endpoint_url=http://127.0.0.1:9"
        "&anon=false&default_block_size=5242880&key=%22123%22"
        '&config_kwargs={"retries":{"max_attempts":1}}'
    )
    config = FsspecConfig.from_url(url)
    assert (config.protocol, config.path, config.shard_depth, config.timeout_s) == (
        "s3",
        "bucket/pre fix",
        2,
        5.0,
    )
    assert config.storage_options == {
        "endpoint_url": "http://127.0.0.1:9",
        "anon": False,
        "default_block_size": 5242880,
        "key": "123",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    assert FsspecConfig.from_url(config.to_url()) == config
    assert parse_url(url) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert FsspecConfig.from_url("fsspec+memory://kv").to_url() == "fsspec+memory://kv"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("12", 12),
        ("1.5", 1.5),
        ("null", None),
        ('"12"', "12"),
        ("http://h:1/x", "http://h:1/x"),
        ('{"a":[1,"b"]}', {"a": [1, "b"]}),
        ("", ""),
    ],
)
def test_storage_option_values(text: str, value: Any) -> None:
    assert decode_option(text) == value
    assert decode_option(encode_option(value)) == value


@pytest.mark.parametrize(
    "url",
    [
        "fsspec://kv",
        "fsspec+memory://",
        "fsspec+memory://kv?shard_depth=9",
        "fsspec+memory://kv?concurrency=0",
        "fsspec+memory://kv?write_mode=sometimes",
        "fsspec+memory://kv?a=1&a=2",
        "fsspec+memory://kv?protocol=file",
        "fsspec+memory://kv?skip_instance_cache=true",
        "fsspec+mem_ory://kv",
        "fsspec+memory://kv#part",
        "s3://bucket",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        FsspecConfig.from_url(url)


def test_secrets_are_masked_but_round_trip() -> None:
    url = (
        "fsspec+s3://b/p?key=AKIAEXAMPLE&secret=S3CR3TVALUE&endpoint_url=http://h:1"
        '&client_kwargs={"aws_session_token":"T0KENVALUE","region_name":"us-east-1"}'
    )
    config = FsspecConfig.from_url(url)
    for shown in (repr(config), str(config), config.redacted_url()):
        for secret in ("AKIAEXAMPLE", "S3CR3TVALUE", "T0KENVALUE"):
            assert secret not in shown
        assert "us-east-1" in shown
        assert "http://h:1" in shown or "http%3A%2F%2Fh%3A1" in shown
    assert "S3CR3TVALUE" in config.to_url()
    with pytest.raises(ConfigError) as caught:
        FsspecConfig.from_url(url + "&shard_depth=9")
    assert "S3CR3TVALUE" not in str(caught.value)


async def test_driver_repr_hides_secrets() -> None:
    driver = await opened(f"fsspec+memory://{unique('kv')}?token=T0KENVALUE")
    try:
        assert "T0KENVALUE" not in repr(driver)
        assert "T0KENVALUE" in driver.config.to_url()
    finally:
        await driver.close()


async def test_unknown_protocol_and_missing_package() -> None:
    with pytest.raises(ConfigError, match="nosuchfs"):
        await open_driver("fsspec+nosuchfs://kv")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(DriverLoadError, match="gcsfs"):
            await open_driver("fsspec+gcs://bucket/kv")


# ---------------------------------------------------------------------- layout


@pytest.mark.parametrize("size", [1, 32, 100, 101, 200, 256])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_layout_names_round_trip(size: int, depth: int) -> None:
    key = bytes(range(256))[:size]
    path = relative_path(key, depth)
    assert key_of(path, depth) == key
    assert all(len(part) <= SEGMENT_HEX + 1 for part in path.split("/"))
    assert key_of(temp_path(path), depth) is None


def test_layout_rejects_foreign_names() -> None:
    good = relative_path(b"\x01\x02", 1)
    shard, name = good.split("/")
    wrong_shard = "00" if shard != "00" else "01"
    for foreign in (
        f"{wrong_shard}/{name}",
        name,
        f"{shard}/README",
        f"{shard}/0",
        "",
        good + "/x",
    ):
        assert key_of(foreign, 1) is None


async def test_file_layout_and_foreign_files(tmp_path: Path) -> None:
    driver = await opened(f"fsspec+file://{tmp_path}/kv")
    try:
        await driver.put_many([(b"\x01\x02", b"value")])
        shard = hashlib.blake2b(b"\x01\x02", digest_size=1).hexdigest()
        stored = tmp_path / "kv" / shard / "0102"
        assert stored.read_bytes() == b"value"
        (stored.parent / "0102.tmp-0123456789abcdef").write_bytes(b"half a value")
        (tmp_path / "kv" / "README").write_text("not a value")
        assert [entry.key async for entry in driver.list()] == [b"\x01\x02"]
        assert (await driver.usage()).bytes == 5
    finally:
        await driver.close()


@pytest.mark.parametrize("write_mode", ["rename", "direct"])
@pytest.mark.parametrize("protocol", ["memory", "file"])
async def test_write_modes(tmp_path: Path, protocol: str, write_mode: str) -> None:
    root = f"{tmp_path}/kv" if protocol == "file" else unique("kv")
    driver = await opened(f"fsspec+{protocol}://{root}?write_mode={write_mode}&shard_depth=0")
    try:
        values = {b"a": b"1" * 10, b"b": b"", b"c": os.urandom(3 << 20)}
        await driver.put_many(list(values.items()))
        got = await driver.get_many(list(values))
        assert [None if value is None else bytes(value) for value in got] == [*values.values()]
        fs = fsspec.filesystem(protocol)
        names = {name.rsplit("/", 1)[-1] for name in fs.find(driver.capabilities.detail("root"))}
        assert names == {key.hex() for key in values}, "no temp file is left behind"
        assert driver.capabilities.detail("writes") == (
            "temp file renamed into place" if write_mode == "rename" else "one atomic write"
        )
    finally:
        await driver.close()


# ---------------------------------------------------------------- capabilities


async def test_memory_store_is_global_to_the_process_unless_asked() -> None:
    path = unique("kv")
    first = await opened(f"fsspec+memory://{path}")
    second = await opened(f"fsspec+memory://{path}")
    private = await opened(f"fsspec+memory://{path}?global_store=false")
    try:
        await first.put_many([(b"k", b"v")])
        assert await second.contains_many([b"k"]) == [True]
        assert await private.contains_many([b"k"]) == [False]
        assert (first.capabilities.persistent, first.capabilities.shared) == (False, True)
        assert (private.capabilities.persistent, private.capabilities.shared) == (False, False)
        await first.delete_many([b"k"])
    finally:
        for driver in (first, second, private):
            await driver.close()


async def test_file_and_s3_are_persistent_and_shared(tmp_path: Path, s3_url: str) -> None:
    for url in (f"fsspec+file://{tmp_path}/kv", s3_url):
        driver = await opened(url)
        try:
            capabilities = driver.capabilities
            assert (capabilities.persistent, capabilities.shared, capabilities.listable) == (
                True,
                True,
                True,
            )
            assert capabilities.capacity_bytes is None
        finally:
            await driver.close()


# ---------------------------------------------------------------------- timeouts


def test_lease_blocks_copies_once_revoked() -> None:
    target = memoryview(bytearray(8))
    lease = CallLease()
    lease.copy(target, 0, b"ab")
    lease.revoke()
    with pytest.raises(CallAbandoned):
        lease.copy(target, 2, b"cd")
    with pytest.raises(CallAbandoned):
        lease.check()
    assert bytes(target) == b"ab" + bytes(6)


async def test_blocked_thread_read_is_bounded_by_the_timeout(tmp_path: Path) -> None:
    """A read stuck in the kernel (a FIFO nobody writes) ends the call at timeout_s."""
    driver = await opened(f"fsspec+file://{tmp_path}/kv?timeout_s=0.5")
    path = tmp_path / "kv" / relative_path(b"stuck", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    buffer = bytearray(b"\xaa" * 64)
    try:
        started = time.monotonic()
        with pytest.raises(DriverTimeoutError):
            await driver.get_many([b"stuck"], into=[buffer])
        assert time.monotonic() - started < 5
        assert bytes(buffer) == b"\xaa" * 64
    finally:
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(writer)
        await driver.close()


async def test_frozen_server_times_out_then_recovers(killable_server: MotoServer) -> None:
    url = killable_server.fsspec_url(f"{BUCKET}/frozen", timeout_s=1, config_kwargs=FAIL_FAST)
    driver = await opened(url)
    try:
        await driver.put_many([(b"k", b"before")])
        killable_server.pause()
        try:
            for call in (driver.get_many([b"k"]), driver.put_many([(b"k", b"during")])):
                started = time.monotonic()
                with pytest.raises(DriverTimeoutError):
                    await call
                assert time.monotonic() - started < 5
        finally:
            killable_server.resume()
        got = await driver.get_many([b"k"])
        assert got[0] is not None and bytes(got[0]) in (b"before", b"during")
    finally:
        await driver.close()


async def test_open_against_a_dead_server_is_unavailable() -> None:
    url = MotoServer(free_port()).fsspec_url(f"{BUCKET}/nobody", config_kwargs=FAIL_FAST)
    with pytest.raises(DriverUnavailableError):
        await open_driver(url)


# ---------------------------------------------------------- kill -9 and restart


async def test_killed_server_raises_typed_errors_and_the_driver_reconnects(
    killable_server: MotoServer,
) -> None:
    url = killable_server.fsspec_url(f"{BUCKET}/killed", timeout_s=5, config_kwargs=FAIL_FAST)
    driver = await opened(url)
    try:
        await driver.put_many([(b"k", b"before")])
        killable_server.kill()
        calls = {
            "put_many": driver.put_many([(b"k", b"lost")]),
            "get_many": driver.get_many([b"k"], into=[bytearray(16)]),
            "contains_many": driver.contains_many([b"k"]),
            "delete_many": driver.delete_many([b"k"]),
            "usage": driver.usage(),
        }
        for name, call in calls.items():
            with pytest.raises((DriverUnavailableError, TransientError)) as caught:
                await call
            assert caught.value.driver == "fsspec", name
        killable_server.restart()
        await driver.put_many([(b"k", b"after")])  # the server starts empty: the bucket is re-made
        assert [bytes(v) for v in await driver.get_many([b"k"]) if v is not None] == [b"after"]
        assert [entry.key async for entry in driver.list()] == [b"k"]
    finally:
        await driver.close()


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


@pytest.fixture
def killable_url(killable_server: MotoServer) -> str:
    return killable_server.fsspec_url(f"{BUCKET}/store", timeout_s=5, config_kwargs=FAIL_FAST)


@pytest.mark.parametrize("s3_first", [False, True], ids=["cpu-above", "cpu-below"])
async def test_store_serves_from_cpu_while_the_server_is_dead(
    killable_server: MotoServer, killable_url: str, s3_first: bool
) -> None:
    s3 = {"url": killable_url, "max_bytes": "64MiB", "timeout_s": 10}
    cpu = "cpu://?capacity=16MiB"
    tiers = [s3, cpu] if s3_first else [cpu, s3]
    config = StoreConfig.parse({"tiers": tiers, "chunk_tokens": CHUNK})
    store = await AsyncKVStore.open(config, NAMESPACE)
    s3_tier = store.tiers[0 if s3_first else 1]
    cpu_tier = store.tiers[1 if s3_first else 0]
    try:
        ids, kv = prompt(1, 3 * CHUNK)
        await store.store(ids, kv)
        await store.flush()
        assert all(key in s3_tier.index for key in store.keys(ids))

        killable_server.kill()
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert set(loaded.chunk_tiers) == {cpu_tier.name}
        fresh_ids, fresh_kv = prompt(2, 2 * CHUNK)
        await store.store(fresh_ids, fresh_kv)
        await store.flush()
        loaded = await store.retrieve(fresh_ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, fresh_kv)
        assert sum(s3_tier.stats.errors.values()) >= 1

        killable_server.restart()
        later_ids, later_kv = prompt(3, 2 * CHUNK)
        await store.store(later_ids, later_kv)
        await store.flush()
        await store.clear(cpu_tier.name)
        loaded = await store.retrieve(later_ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, later_kv)
        assert set(loaded.chunk_tiers) == {s3_tier.name}
    finally:
        await store.close()


# ---------------------------------------------------------------------- baseline


@pytest.mark.parametrize("protocol", ["memory", "file", "s3"])
async def test_raw_client_baseline(tmp_path: Path, s3_url: str, protocol: str) -> None:
    url = {
        "memory": f"fsspec+memory://{unique('kv')}",
        "file": f"fsspec+file://{tmp_path}/kv",
        "s3": s3_url,
    }[protocol]
    values = [(b"key-%d" % index, memoryview(os.urandom(1000 + index))) for index in range(4)]
    baseline = await asyncio.to_thread(RawClientBaseline, url, values)
    driver: Driver[Any] = await opened(url)
    try:
        assert protocol in baseline.description
        assert await asyncio.to_thread(baseline.write) > 0
        assert await asyncio.to_thread(baseline.read) > 0
        config = FsspecConfig.from_url(url)
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **config.storage_options)
        written = await asyncio.to_thread(fs.find, driver.capabilities.detail("root"))
        assert sorted(name.rsplit("/", 1)[-1] for name in written if "/.baseline-" in name) == [
            key.hex() for key, _ in values
        ]
        await driver.put_many([(b"mine", b"v")])
        assert [entry.key async for entry in driver.list()] == [b"mine"]
        await asyncio.to_thread(baseline.reset)
        await asyncio.to_thread(baseline.reset)
    finally:
        await asyncio.to_thread(baseline.close)
        await driver.delete_many([b"mine"])
        await driver.close()
