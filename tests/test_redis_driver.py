"""The redis driver against real redis-server processes on 127.0.0.1.

One plain server, one with a password and an ACL user, one with TLS (when
this redis-server has it) and one 3-master cluster serve the module; the
fault tests start servers of their own to kill, stop and restart.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from prerequisites import missing, requires
from redis_server import (
    RedisClusterProcess,
    RedisServer,
    TlsFiles,
    free_port,
    redis_available,
    serve,
    tls_available,
)

from kvstore.config import StoreConfig
from kvstore.conformance import DriverTests
from kvstore.conformance.suite import BatchTests, CoreTests
from kvstore.drivers.redis.baseline import RawClientBaseline
from kvstore.drivers.redis.config import RedisConfig, RedissConfig
from kvstore.drivers.redis.driver import RedisDriver
from kvstore.drivers.redis.layout import KeyNames, Manifest
from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverClosedError,
    DriverTimeoutError,
    DriverUnavailableError,
    TransientError,
)
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore

pytestmark = requires(redis_available(), "redis-server is not installed")

PASSWORD = "s3cret:/@?#%"
ACL_USER = ("kvuser", "acl-pass word")
SMALL_PARTS = "part_size=64KiB"
"""Small parts, so the suite's 80 KiB pattern values and everything larger are parted."""


def fresh_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from serve(tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=PASSWORD, users=[ACL_USER])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not tls_available():
        missing("this redis-server was built without TLS (or openssl is missing)")
    directory = tmp_path_factory.mktemp("redis-tls")
    server = RedisServer(directory, tls=TlsFiles.create(directory / "tls"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    cluster = RedisClusterProcess(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server only this test uses, free to kill, stop and restart."""
    server = RedisServer(tmp_path / "own")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


# ------------------------------------------------------------ conformance


class TestRedisConformance(DriverTests):
    @pytest.fixture
    def driver_config(self, redis_server: RedisServer) -> str:
        return redis_server.url(f"prefix={fresh_prefix()}&{SMALL_PARTS}")


class TestRedisAuthConformance(DriverTests):
    """As an ACL user, with a TTL, declared persistent (the server keeps values in
    memory across driver reopens, which is what the persistence area checks)."""

    @pytest.fixture
    def driver_config(self, auth_server: RedisServer) -> str:
        options = f"prefix={fresh_prefix()}&ttl=3600&persistent=true&{SMALL_PARTS}"
        return auth_server.url(options, user=ACL_USER)


class TestRedisClusterConformance(DriverTests):
    @pytest.fixture
    def driver_config(self, redis_cluster: RedisClusterProcess) -> str:
        return redis_cluster.url(f"prefix={fresh_prefix()}&{SMALL_PARTS}")


class TestRedissConformance(CoreTests, BatchTests):
    @pytest.fixture
    def driver_config(self, tls_server: RedisServer) -> str:
        return tls_server.url(f"prefix={fresh_prefix()}")  # default part size


# ----------------------------------------------------------------- config


def test_url_location_and_options_round_trip() -> None:
    url = (
        "redis://kv%20user:p%40ss%3Aw%2Fd@Cache.example:6380/3"
        "?prefix=kv&ttl=3600&part_size=4MiB&timeout=2.5&max_connections=4"
    )
    config = RedisConfig.from_url(url)
    assert (config.host, config.port, config.db, config.username) == (
        "cache.example",
        6380,
        3,
        "kv user",
    )
    assert config.password is not None and config.password.get_secret_value() == "p@ss:w/d"
    assert (config.ttl, config.part_size, config.timeout) == (3600, 4 << 20, 2.5)
    assert RedisConfig.from_url(config.to_url()) == config
    assert pickle.loads(pickle.dumps(config)) == config
    for text in (repr(config), config.redacted_url()):
        assert "p@ss" not in text and "p%40ss" not in text
    defaults = RedisConfig.from_url("redis://")
    assert (defaults.host, defaults.port, defaults.db, defaults.prefix) == (
        "localhost",
        6379,
        0,
        "kv",
    )
    assert RedisConfig.from_url(defaults.to_url()) == defaults
    password_only = RedisConfig.from_url("redis://:pw@127.0.0.1")
    assert password_only.username is None
    assert RedisConfig.from_url(password_only.to_url()) == password_only


def test_rediss_config_takes_tls_options() -> None:
    url = "rediss://h:6379/0?ssl_ca_certs=%2Fca.pem&ssl_cert_reqs=optional&ssl_check_hostname=false"
    config = RedissConfig.from_url(url)
    assert config.tls and config.ssl_ca_certs == "/ca.pem"
    assert RedissConfig.from_url(config.to_url()) == config
    assert config.to_url().startswith("rediss://")


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0?ssl_ca_certs=%2Fca.pem",  # TLS options need rediss://
        "redis://h:6379/1?cluster=true",  # a cluster has only db 0
        "redis://h?prefix=a%7Bb%7D",  # braces would change the hash tag
        "redis://h?part_size=1KiB",
        "redis://h:notaport",
        "redis://h/zero",
        "redis://:pw@h?password_env=PW",
        "redis://h?host=other",
        "redis://h?timeout=0",
    ],
)
def test_invalid_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisConfig.from_url(url)


def test_key_names_share_one_hash_tag_and_parse_back() -> None:
    names = KeyNames("kv*[x]")
    key = b"\x00{}\xff/.."
    tag = names.tag(key)
    for name in (names.value(key), names.manifest(key), names.part_prefix(key) + b"ab:0"):
        assert name.startswith(tag) and name.count(b"{") == 1
    assert names.entry_key(names.value(key)) == key
    assert names.entry_key(names.manifest(key)) == key
    assert names.entry_key(names.part_prefix(key) + b"ab:0") is None
    assert names.scan_pattern().startswith(b"kv\\*\\[x\\]:{")
    manifest = Manifest.plan((32 << 20) + 128, 8 << 20)
    assert len(manifest.spans()) == 5 and sum(n for _, n in manifest.spans()) == manifest.length
    assert Manifest.parse(manifest.encode(), "redis") == manifest


# ------------------------------------------------------ auth, TLS, cluster


async def test_password_env_and_acl_user(
    auth_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSTORE_TEST_REDIS_PASSWORD", PASSWORD)
    host = f"127.0.0.1:{auth_server.port}"
    driver = await open_driver(
        f"redis://{host}/0?password_env=KVSTORE_TEST_REDIS_PASSWORD&prefix={fresh_prefix()}"
    )
    try:
        await driver.put_many([(b"k", b"v")])
        assert [bytes(v) for v in await driver.get_many([b"k"]) if v is not None] == [b"v"]
        assert PASSWORD not in repr(driver)
    finally:
        await driver.close()
    acl = await open_driver(auth_server.url(f"prefix={fresh_prefix()}", user=ACL_USER))
    await acl.close()


@pytest.mark.parametrize(
    "userinfo", ["", ":wrong@", "kvuser:wrong@", "nobody:x@"], ids=["none", "bad", "acl", "user"]
)
async def test_refused_credentials_are_config_errors(
    auth_server: RedisServer, userinfo: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await open_driver(f"redis://{userinfo}127.0.0.1:{auth_server.port}/0?timeout=2")
    assert "wrong" not in str(caught.value)


async def test_tls_needs_the_ca(tls_server: RedisServer) -> None:
    url = tls_server.url(f"prefix={fresh_prefix()}").replace("ssl_ca_certs=", "ssl_unused=")
    without_ca = url.split("?")[0] + "?timeout=2&connect_timeout=2"
    with pytest.raises(DriverUnavailableError):
        await open_driver(without_ca)


async def test_cluster_spreads_values_and_keeps_each_in_one_slot(
    redis_cluster: RedisClusterProcess,
) -> None:
    prefix = fresh_prefix()
    driver = await open_driver(redis_cluster.url(f"prefix={prefix}&{SMALL_PARTS}"))
    try:
        values = {f"key{i}".encode(): os.urandom(200_000 + i) for i in range(12)}
        await driver.put_many(list(values.items()))
        got = await driver.get_many(list(values))
        assert [None if v is None else v.tobytes() for v in got] == list(values.values())
        holders = 0
        for node in redis_cluster.nodes:
            with node.client() as admin:
                names = list(admin.scan_iter(match=f"{prefix}:*", count=1000))
                holders += bool(names)
                for name in names:
                    slot = admin.execute_command("CLUSTER", "KEYSLOT", name)
                    tag = name[: name.index(b"}") + 1]
                    assert slot == admin.execute_command("CLUSTER", "KEYSLOT", tag)
        assert holders == len(redis_cluster.nodes)
        assert sum(await driver.delete_many(list(values))) == len(values)
    finally:
        await driver.close()


# ------------------------------------------------------------- atomicity


async def test_readers_racing_overwrites_never_see_a_mix(redis_server: RedisServer) -> None:
    """Two driver objects (as two processes would) overwrite one key with whole
    values of different sizes, parted and inline, while a third reads."""
    url = redis_server.url(f"prefix={fresh_prefix()}&{SMALL_PARTS}")
    writers = [await open_driver(url) for _ in range(2)]
    reader = await open_driver(url)
    sizes = [30_000, 200_000, 700_000, 64 << 10]
    values = [bytes([marker]) * sizes[marker % len(sizes)] for marker in range(1, 9)]
    stop = time.monotonic() + 3
    problems: list[str] = []

    async def write(driver: RedisDriver, offset: int) -> None:
        for round_ in range(40):
            await driver.put_many([(b"race", values[(round_ + offset) % len(values)])])
            if time.monotonic() > stop:
                return

    async def read() -> int:
        reads = 0
        while time.monotonic() < stop and reads < 400:
            into = bytearray(1 << 20) if reads % 2 else None
            (got,) = await reader.get_many([b"race"], into=None if into is None else [into])
            reads += 1
            if got is not None:
                data = got.tobytes()
                if data != bytes([data[0]]) * sizes[data[0] % len(sizes)]:
                    problems.append(f"{len(data)} bytes starting with {data[0]}")
        return reads

    try:
        results = await asyncio.gather(write(writers[0], 0), write(writers[1], 3), read())
        assert results[2] > 0
        assert not problems, problems[:3]
    finally:
        await reader.delete_many([b"race"])
        for driver in (*writers, reader):
            await driver.close()


async def test_one_batch_of_parted_and_inline_values(redis_server: RedisServer) -> None:
    driver = await open_driver(redis_server.url(f"prefix={fresh_prefix()}&{SMALL_PARTS}"))
    try:
        values = {f"key{i}".encode(): os.urandom(i * 70_000 + 1) for i in range(8)}
        await driver.put_many(list(values.items()))
        into = [bytearray(600_000) if i % 2 else None for i in range(len(values))]
        for got in (await driver.get_many(list(values)), await driver.get_many(list(values), into)):
            assert [None if v is None else v.tobytes() for v in got] == list(values.values())
        assert {e.key: e.size async for e in driver.list()} == {
            k: len(v) for k, v in values.items()
        }
        assert await driver.delete_many(list(values)) == [True] * len(values)
    finally:
        await driver.close()


async def test_parts_of_replaced_and_deleted_values_are_removed(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    driver = await open_driver(redis_server.url(f"prefix={prefix}&{SMALL_PARTS}"))
    try:
        await driver.put_many([(b"k", os.urandom(500_000))])
        await driver.put_many([(b"k", os.urandom(300_000))])
        with redis_server.client() as admin:
            assert len(list(admin.scan_iter(match=f"{prefix}:*"))) == 1 + 5  # manifest + parts
            assert all(admin.ttl(name) == -1 for name in admin.scan_iter(match=f"{prefix}:*"))
        await driver.put_many([(b"k", b"small")])
        with redis_server.client() as admin:
            assert list(admin.scan_iter(match=f"{prefix}:*")) == [KeyNames(prefix).value(b"k")]
        await driver.put_many([(b"k", os.urandom(100_000))])
        assert await driver.delete_many([b"k"]) == [True]
        with redis_server.client() as admin:
            assert list(admin.scan_iter(match=f"{prefix}:*")) == []
    finally:
        await driver.close()


async def test_a_value_with_a_lost_part_is_a_miss_and_dropped(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    driver = await open_driver(redis_server.url(f"prefix={prefix}&{SMALL_PARTS}"))
    names = KeyNames(prefix)
    try:
        await driver.put_many([(b"k", os.urandom(300_000))])
        with redis_server.client() as admin:
            part = next(iter(admin.scan_iter(match=names.part_prefix(b"k") + b"*")))
            admin.delete(part)  # as an eviction would
        assert await driver.get_many([b"k"]) == [None]
        assert await driver.contains_many([b"k"]) == [False]
        with redis_server.client() as admin:
            assert list(admin.scan_iter(match=f"{prefix}:*")) == []
    finally:
        await driver.close()


async def test_ttl_expires_values(redis_server: RedisServer) -> None:
    driver = await open_driver(redis_server.url(f"prefix={fresh_prefix()}&ttl=1&{SMALL_PARTS}"))
    try:
        await driver.put_many([(b"small", b"x"), (b"large", os.urandom(200_000))])
        assert await driver.contains_many([b"small", b"large"]) == [True, True]
        deadline = time.monotonic() + 10
        while any(await driver.contains_many([b"small", b"large"])):
            assert time.monotonic() < deadline, "values outlived their TTL"
            await asyncio.sleep(0.2)
        assert await driver.get_many([b"small", b"large"]) == [None, None]
    finally:
        await driver.close()


async def test_list_sees_only_its_prefix(redis_server: RedisServer) -> None:
    first = await open_driver(redis_server.url(f"prefix={fresh_prefix()}&{SMALL_PARTS}"))
    second = await open_driver(redis_server.url(f"prefix={fresh_prefix()}"))
    try:
        await first.put_many([(b"a", b"1"), (b"b", os.urandom(100_000))])
        await second.put_many([(b"c", b"22")])
        assert {e.key: e.size async for e in first.list()} == {b"a": 1, b"b": 100_000}
        assert {e.key: e.size async for e in second.list()} == {b"c": 2}
        usage = await first.usage()
        assert (usage.entries, usage.bytes, usage.capacity_bytes) == (2, 100_001, None)
        await first.delete_many([b"a", b"b"])
        await second.delete_many([b"c"])
    finally:
        await first.close()
        await second.close()


async def test_a_listing_cut_short_by_close_raises_closed(redis_server: RedisServer) -> None:
    driver = await open_driver(redis_server.url(f"prefix={fresh_prefix()}"))
    await driver.put_many([(f"k{i}".encode(), b"v") for i in range(2500)])
    listing = driver.list()
    await listing.__anext__()
    await driver.delete_many([f"k{i}".encode() for i in range(2500)])
    await driver.close()
    with pytest.raises(DriverClosedError):
        async for _ in listing:
            pass


# ----------------------------------------------------------------- faults


async def test_kill_and_restart_same_driver_reconnects(own_server: RedisServer) -> None:
    driver = await open_driver(own_server.url(f"{SMALL_PARTS}&timeout=2&connect_timeout=1"))
    try:
        await driver.put_many([(b"k", os.urandom(200_000))])
        own_server.kill()
        started = time.monotonic()
        for call in (
            driver.get_many([b"k"]),
            driver.put_many([(b"k", b"v")]),
            driver.contains_many([b"k"]),
            driver.delete_many([b"k"]),
            driver.usage(),
        ):
            with pytest.raises((DriverUnavailableError, TransientError)):
                await call
        assert time.monotonic() - started < 20
        own_server.start()  # same port, empty (no persistence)
        assert await driver.get_many([b"k"]) == [None]
        await driver.put_many([(b"k", b"again"), (b"big", os.urandom(300_000))])
        (got, big) = await driver.get_many([b"k", b"big"])
        assert got is not None and got.tobytes() == b"again" and big is not None
    finally:
        await driver.close()


@pytest.mark.slow
async def test_cluster_node_killed_and_restarted(tmp_path: Path) -> None:
    """Keys on the live masters keep working, the dead master's keys fail typed and
    fast, and the same driver serves them again once the master is back."""
    cluster = RedisClusterProcess(tmp_path / "cluster")
    try:
        cluster.start()
        driver = await open_driver(cluster.url("timeout=1&connect_timeout=1"))
        try:
            keys = [f"key{i}".encode() for i in range(30)]
            await driver.put_many([(key, key) for key in keys])
            cluster.nodes[1].kill()
            with pytest.raises((DriverUnavailableError, TransientError)):
                await driver.get_many(keys)
            served = 0
            for key in keys:
                try:
                    (got,) = await driver.get_many([key])
                except (DriverUnavailableError, TransientError):
                    continue
                assert got is not None and got.tobytes() == key
                served += 1
            assert 0 < served < len(keys)
            cluster.nodes[1].start()
            deadline = time.monotonic() + 20
            while True:
                try:
                    await driver.put_many([(key, b"back") for key in keys])
                    break
                except (DriverUnavailableError, TransientError):
                    assert time.monotonic() < deadline, "the cluster did not recover"
                    await asyncio.sleep(0.25)
            assert all(
                v is not None and v.tobytes() == b"back" for v in await driver.get_many(keys)
            )
        finally:
            await driver.close()
    finally:
        cluster.stop()


async def test_a_hung_server_times_out(own_server: RedisServer) -> None:
    driver = await open_driver(own_server.url("timeout=0.5&connect_timeout=0.5"))
    assert own_server.process is not None
    try:
        await driver.put_many([(b"k", b"v")])
        os.kill(own_server.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises((DriverTimeoutError, DriverUnavailableError)):
            await driver.get_many([b"k"])
        assert time.monotonic() - started < 5
        os.kill(own_server.process.pid, signal.SIGCONT)
        (got,) = await driver.get_many([b"k"])
        assert got is not None and got.tobytes() == b"v"
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)
        await driver.close()


async def test_open_fails_fast_when_nothing_listens() -> None:
    started = time.monotonic()
    with pytest.raises(DriverUnavailableError):
        await open_driver(f"redis://127.0.0.1:{free_port()}/0?connect_timeout=1")
    assert time.monotonic() - started < 10


async def test_out_of_memory_is_a_capacity_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "small", maxmemory="4mb")
    server.start()
    try:
        driver = await open_driver(server.url(SMALL_PARTS))
        try:
            await driver.put_many([(b"kept", b"x" * 1000)])
            with pytest.raises(CapacityError):
                await driver.put_many([(b"huge", os.urandom(8 << 20))])
            (kept,) = await driver.get_many([b"kept"])
            assert kept is not None and kept.tobytes() == b"x" * 1000
            with server.client() as admin:  # the parts of the failed put are gone too
                assert admin.keys("*") == [KeyNames("kv").value(b"kept")]
        finally:
            await driver.close()
    finally:
        server.stop()


LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64)
CHUNK = 16
NAMESPACE = Namespace("redis-test-model", "rev", LAYOUT, chunk_tokens=CHUNK)


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


@pytest.fixture
async def cpu_over_redis(own_server: RedisServer) -> AsyncIterator[AsyncKVStore]:
    redis_tier = {"url": own_server.url("timeout=1&connect_timeout=1"), "max_bytes": "64MiB"}
    config = StoreConfig.parse(
        {"tiers": ["cpu://?capacity=16MiB", {**redis_tier, "timeout_s": 5}], "chunk_tokens": CHUNK}
    )
    store = await AsyncKVStore.open(config, NAMESPACE)
    yield store
    await store.close()


async def test_store_serves_from_cpu_while_redis_is_dead_then_reconnects(
    cpu_over_redis: AsyncKVStore, own_server: RedisServer
) -> None:
    store = cpu_over_redis
    cpu, remote = store.tiers
    ids, kv = prompt(1, 3 * CHUNK)
    await store.store(ids, kv)
    await store.flush()
    own_server.kill()
    loaded = await store.retrieve(ids)
    assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    assert set(loaded.chunk_tiers) == {cpu.name}
    more, more_kv = prompt(2, 2 * CHUNK)
    assert (await store.store(more, more_kv)).written == 2  # the cpu tier takes it
    await store.flush()  # the write-through to redis fails and is counted
    assert sum(remote.stats.errors.values()) >= 1
    own_server.start()
    fresh, fresh_kv = prompt(3, 2 * CHUNK)
    await store.store(fresh, fresh_kv)
    await store.flush()
    await store.clear(cpu.name)
    loaded = await store.retrieve(fresh)  # the same driver object, reconnected
    assert loaded.kv is not None and torch.equal(loaded.kv, fresh_kv)
    assert set(loaded.chunk_tiers) == {remote.name}


async def test_store_with_redis_first_falls_back_to_cpu(own_server: RedisServer) -> None:
    redis_tier = {"url": own_server.url("timeout=1&connect_timeout=1"), "max_bytes": "64MiB"}
    config = StoreConfig.parse(
        {"tiers": [{**redis_tier, "timeout_s": 5}, "cpu://?capacity=16MiB"], "chunk_tokens": CHUNK}
    )
    store = await AsyncKVStore.open(config, NAMESPACE)
    try:
        remote, cpu = store.tiers
        ids, kv = prompt(4, 2 * CHUNK)
        await store.store(ids, kv)
        await store.flush()
        own_server.kill()
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        assert set(loaded.chunk_tiers) == {cpu.name}
        own_server.start()
        later, later_kv = prompt(5, 2 * CHUNK)
        assert (await store.store(later, later_kv)).written == 2
        loaded = await store.retrieve(later)
        assert loaded.kv is not None and set(loaded.chunk_tiers) == {remote.name}
    finally:
        await store.close()


# --------------------------------------------------------------- baseline


def test_raw_client_baseline_moves_the_same_bytes(redis_server: RedisServer) -> None:
    values = [(f"chunk{i}".encode(), memoryview(os.urandom(300_000 + i))) for i in range(4)]
    baseline = RawClientBaseline(redis_server.url(f"prefix={fresh_prefix()}"), values)
    try:
        assert baseline.description
        assert baseline.write() > 0
        assert baseline.read() > 0
        assert baseline.buffers_match()
        baseline.reset()
    finally:
        baseline.close()
