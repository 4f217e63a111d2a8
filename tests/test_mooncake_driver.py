"""The mooncake driver against a real ``mooncake_master`` on loopback (TCP transfers).

Drivers of one process and connection settings share a Mooncake client (and
its segment); the conformance suite runs with a fresh key prefix per test.
The fault test kills the master with SIGKILL and starts it again on the same
port: the driver raises typed errors meanwhile, hierarchical stores keep
serving from their cpu tier, and the same driver objects work again once the
client has reconnected (a restarted master has lost every object, so those
reads are misses). RDMA needs RDMA hardware and is not tested.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mooncake_server import MooncakeMaster, free_port, master_available
from prerequisites import requires

from kvstore.config import StoreConfig
from kvstore.conformance import DriverTests
from kvstore.drivers.mooncake.config import MooncakeConfig
from kvstore.drivers.mooncake.driver import MooncakeDriver
from kvstore.errors import (
    ConfigError,
    DriverUnavailableError,
    InvalidArgumentError,
    KVStoreError,
    TransientError,
)
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore

pytestmark = requires(
    master_available(), "mooncake-transfer-engine (mooncake_master) is not installed"
)

RECONNECT_TIMEOUT_S = 30.0
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("test-model", "rev", LAYOUT, chunk_tokens=CHUNK)


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeMaster]:
    """One master shared by the tests that do not kill it."""
    with MooncakeMaster(tmp_path_factory.mktemp("mooncake-master")) as running:
        yield running


@pytest.fixture
def own_master(tmp_path: Path) -> Iterator[MooncakeMaster]:
    """A master of the test's own, to kill and restart."""
    with MooncakeMaster(tmp_path / "master") as running:
        yield running


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
async def driver(master: MooncakeMaster) -> AsyncIterator[MooncakeDriver]:
    opened = await open_driver(master.url(prefix=prefix()))
    assert isinstance(opened, MooncakeDriver)
    yield opened
    await opened.close()


class TestMooncakeConformance(DriverTests):
    @pytest.fixture
    def driver_config(self, master: MooncakeMaster) -> str:
        return master.url(prefix=prefix())


# ------------------------------------------------------------------ config


def test_config_round_trips_and_pickles() -> None:
    url = (
        "mooncake://10.1.2.3:50051?metadata=http%3A%2F%2F10.1.2.3%3A8080%2Fmetadata"
        "&protocol=rdma&device_name=mlx5_0%2Cmlx5_1&local_hostname=10.1.2.4"
        "&global_segment_size=4GiB&local_buffer_size=512MiB&replicas=2&prefix=kv%2F"
        "&max_value=64MiB&io_threads=8&op_timeout=5&connect_timeout=3&lease_wait=2"
        "&force_delete=true&metrics_port=9004"
    )
    config = MooncakeConfig.from_url(url)
    assert (config.master, config.protocol, config.replicas) == ("10.1.2.3:50051", "rdma", 2)
    assert config.global_segment_size == 4 << 30
    assert config.value_limit == 64 << 20
    assert MooncakeConfig.from_url(config.to_url()) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert MooncakeConfig.from_url("mooncake://master:50051").to_url() == "mooncake://master:50051"
    no_usage = MooncakeConfig.from_url("mooncake://master:50051?metrics_port=&max_value=")
    assert (no_usage.metrics_port, no_usage.max_value) == (None, None)
    assert MooncakeConfig.from_url(no_usage.to_url()) == no_usage


@pytest.mark.parametrize(
    "url",
    [
        "mooncake://",
        "mooncake://master",
        "mooncake://master:port",
        "mooncake://master:50051?protocol=udp",
        "mooncake://master:50051?replicas=0",
        "mooncake://master:50051?local_buffer_size=4KiB",
        "mooncake://master:50051?unknown=1",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        MooncakeConfig.from_url(url)


def test_value_limit_follows_buffer_and_segment() -> None:
    config = MooncakeConfig.from_url(
        "mooncake://m:1?local_buffer_size=64MiB&global_segment_size=32MiB"
    )
    assert config.value_limit == (32 << 20) - 1
    pure_client = MooncakeConfig.from_url(
        "mooncake://m:1?local_buffer_size=64MiB&global_segment_size=0"
    )
    assert pure_client.value_limit == (64 << 20) - 1


# ------------------------------------------------------------------ behaviour


async def test_capabilities_are_those_of_a_shared_cache(driver: MooncakeDriver) -> None:
    caps = driver.capabilities
    assert (caps.persistent, caps.listable, caps.shared, caps.lends_views) == (
        False,
        False,
        True,
        True,
    )
    assert caps.capacity_bytes is None
    assert caps.max_value_bytes == (96 << 20) - 1
    await driver.put_many([(b"listed?", b"v")])
    assert [entry async for entry in driver.list()] == [], "listable=False: list yields nothing"


async def test_usage_counts_the_whole_store(driver: MooncakeDriver) -> None:
    before = await driver.usage()
    await driver.put_many([(b"usage-a", b"x" * 5000), (b"usage-b", b"y" * 7000)])
    after = await driver.usage()
    assert after.entries >= before.entries + 2
    assert after.bytes >= before.bytes + 12_000
    assert after.capacity_bytes is None


async def test_a_second_client_reads_and_writes_over_tcp(master: MooncakeMaster) -> None:
    """A pure client (no segment of its own) shares values with the one holding the
    memory, each through its own transfer engine: real TCP transfers on loopback."""
    shared_prefix = prefix()
    owner = await open_driver(master.url(prefix=shared_prefix))
    visitor = await open_driver(
        master.url(prefix=shared_prefix, global_segment_size=0, local_buffer_size="48MiB")
    )
    try:
        big, small = np.random.default_rng(2).bytes(3 << 20), b"s" * 100
        await owner.put_many([(b"from-owner", big)])
        await visitor.put_many([(b"from-visitor", small), (b"empty", b"")])
        got = await visitor.get_many([b"from-owner"], into=[bytearray(4 << 20)])
        assert got[0] is not None and bytes(got[0]) == big
        assert [
            None if v is None else bytes(v)
            for v in await owner.get_many([b"from-visitor", b"empty", b"nowhere"])
        ] == [small, b"", None]
        assert await visitor.delete_many([b"from-owner"]) == [True]
    finally:
        await visitor.close()
        await owner.close()


async def test_registered_memory_moves_without_staging(driver: MooncakeDriver) -> None:
    region = np.zeros(1 << 20, dtype=np.uint8)
    await driver.register_memory(region)
    with pytest.raises(InvalidArgumentError):
        await driver.register_memory(region[1000:2000])
    source = memoryview(region)[4096 : 4096 + 70_000]
    source[:] = np.random.default_rng(1).integers(0, 256, 70_000, dtype=np.uint8).tobytes()
    expected = bytes(source)
    await driver.put_many([(b"registered", source)])
    source[:] = bytes(70_000)
    target = memoryview(region)[200_000:300_000]
    (got,) = await driver.get_many([b"registered"], into=[target])
    assert got is not None and bytes(got) == expected
    got[0] ^= 0xFF
    assert target[0] == got[0], "the value must be read straight into the registered target"
    tight = memoryview(region)[400_000:470_000]
    (exact,) = await driver.get_many([b"registered"], into=[tight])
    assert exact is not None and bytes(exact) == expected
    await driver.unregister_memory(region)
    with pytest.raises(InvalidArgumentError):
        await driver.unregister_memory(region)
    (again,) = await driver.get_many([b"registered"])
    assert again is not None and bytes(again) == expected


async def test_a_read_lease_delays_delete(tmp_path: Path) -> None:
    with MooncakeMaster(tmp_path / "master", lease_ttl_ms=1500) as slow_lease:
        impatient = await open_driver(slow_lease.url(lease_wait=0.2))
        patient = await open_driver(slow_lease.url(lease_wait=10))
        forceful = await open_driver(slow_lease.url(force_delete="true"))
        try:
            await patient.put_many([(b"leased", b"v" * 100), (b"forced", b"f" * 100)])
            assert await impatient.get_many([b"leased"]) != [None]
            with pytest.raises(TransientError, match="read leases"):
                await impatient.delete_many([b"leased"])
            started = time.monotonic()
            assert await patient.delete_many([b"leased"]) == [True]
            assert time.monotonic() - started < 5
            assert await patient.get_many([b"leased"]) == [None]
            assert await forceful.get_many([b"forced"]) != [None]
            assert await forceful.delete_many([b"forced"]) == [True]
        finally:
            for opened in (impatient, patient, forceful):
                await opened.close()


async def test_open_without_a_master_is_unavailable() -> None:
    url = f"mooncake://127.0.0.1:{free_port()}?local_hostname=127.0.0.1&connect_timeout=1"
    started = time.monotonic()
    with pytest.raises(DriverUnavailableError):
        await open_driver(url)
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------ faults


async def _until_served(driver: MooncakeDriver, key: bytes, value: bytes) -> None:
    """Put and read back until the reconnected client serves again (bounded)."""
    deadline = time.monotonic() + RECONNECT_TIMEOUT_S
    while True:
        try:
            await driver.put_many([(key, value)])
            (got,) = await driver.get_many([key])
            if got is not None and bytes(got) == value:
                return
        except (DriverUnavailableError, TransientError):
            pass
        assert time.monotonic() < deadline, "the driver did not serve again after the restart"
        await asyncio.sleep(0.2)


def _prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


async def _two_tier_store(master: MooncakeMaster, *, mooncake_first: bool) -> AsyncKVStore:
    mooncake = {"url": master.url(prefix=prefix()), "max_bytes": "64MiB", "timeout_s": 20}
    cpu = {"url": "cpu://?capacity=16MiB"}
    tiers = [mooncake, cpu] if mooncake_first else [cpu, mooncake]
    config = StoreConfig.parse({"tiers": tiers, "chunk_tokens": CHUNK})
    return await AsyncKVStore.open(config, NAMESPACE)


def _tier_names(store: AsyncKVStore, driver: str) -> set[str]:
    return {tier.name for tier in store.tiers if tier.driver.name == driver}


async def test_master_killed_and_restarted(own_master: MooncakeMaster) -> None:
    """One SIGKILL and restart of the master: the driver raises typed errors meanwhile,
    stores with a cpu tier above and below it keep serving, and the same driver
    objects work again after the restart, which lost every object."""
    driver = await open_driver(own_master.url(prefix=prefix(), io_threads=4))
    above = await _two_tier_store(own_master, mooncake_first=False)
    below = await _two_tier_store(own_master, mooncake_first=True)
    try:
        await driver.put_many([(b"before", b"b" * 4096)])
        ids, kv = _prompt(7, 3 * CHUNK)
        for store in (above, below):
            await store.store(ids, kv)
            await store.flush()
        await above.clear(above.tiers[0].name)
        loaded = await above.retrieve(ids)
        assert set(loaded.chunk_tiers) == _tier_names(above, "mooncake"), "read from mooncake"
        await above.flush()  # the chunks read are promoted back into the cpu tier

        own_master.kill()
        # Concurrently: each call to a dead master takes the client seconds to give up.
        outcomes = await asyncio.gather(
            driver.get_many([b"before"], into=[bytearray(8192)]),
            driver.contains_many([b"before"]),
            driver.put_many([(b"during", b"d")]),
            return_exceptions=True,
        )
        for outcome in outcomes:
            assert isinstance(outcome, (DriverUnavailableError, TransientError)), outcome
        for store, loaded in zip(
            (above, below), await asyncio.gather(*(s.retrieve(ids) for s in (above, below)))
        ):
            assert loaded.kv is not None and torch.equal(loaded.kv, kv)
            assert set(loaded.chunk_tiers) == _tier_names(store, "cpu")
        more_ids, more_kv = _prompt(8, 2 * CHUNK)
        assert (await above.store(more_ids, more_kv)).written == 2, "the cpu tier takes writes"

        own_master.restart()
        await _until_served(driver, b"after", b"a" * 4096)
        assert await driver.get_many([b"before"]) == [None], "a restarted master forgets"
        assert await driver.contains_many([b"before", b"after"]) == [False, True]
        assert await driver.delete_many([b"after"]) == [True]
        later_ids, later_kv = _prompt(9, 2 * CHUNK)
        for store in (above, below):
            result = await store.store(later_ids, later_kv)
            await store.flush()
            assert result.failed == 0
            tier = next(t for t in store.tiers if t.driver.name == "mooncake")
            assert await tier.driver.contains_many(store.keys(later_ids)) == [True, True]
    finally:
        for opened in (above, below):
            await opened.close()
        await driver.close()


async def test_errors_are_typed_never_raw(own_master: MooncakeMaster) -> None:
    driver = await open_driver(own_master.url(op_timeout=10))
    try:
        own_master.kill()
        with pytest.raises(KVStoreError) as caught:
            await driver.usage()
        assert caught.value.driver == "mooncake"
    finally:
        await driver.close()
