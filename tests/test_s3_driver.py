"""The s3 driver against a real S3 server (moto's, as its own process on loopback)."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from s3_server import HOST, SECRET_ACCESS_KEY, MotoS3Server, free_port

from kvstore.config import StoreConfig
from kvstore.conformance import DriverTests
from kvstore.drivers.s3.config import S3Config
from kvstore.drivers.s3.driver import S3Driver
from kvstore.drivers.s3.naming import key_of, object_name, shard_of
from kvstore.errors import (
    ConfigError,
    DriverTimeoutError,
    DriverUnavailableError,
    NotFoundError,
    TransientError,
)
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore

BUCKET = "kvstore-tests"
PART = 5 << 20
"""The smallest part size S3 allows: multipart paths with the fewest bytes."""

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("s3-test-model", "rev", LAYOUT, chunk_tokens=CHUNK)


@pytest.fixture(scope="module")
def server() -> Iterator[MotoS3Server]:
    """One moto server (with the test bucket) for the module's tests that do not kill it."""
    with MotoS3Server() as running:
        running.create_bucket(BUCKET)
        yield running


@pytest.fixture
def url(server: MotoS3Server) -> str:
    """A driver URL with a prefix of its own, so tests never see each other's keys."""
    return server.url(BUCKET, f"t-{uuid.uuid4().hex[:12]}", part_size="5MiB")


@pytest.fixture
async def driver(url: str) -> AsyncIterator[S3Driver]:
    opened = await open_driver(url)
    assert isinstance(opened, S3Driver)
    yield opened
    await opened.close()


class TestS3Conformance(DriverTests):
    sustained_reads = 1000
    """moto serves one request at a time (6905 reads take over a minute here);
    ``kvstore conformance`` against a real S3 runs the full count."""

    @pytest.fixture
    def driver_config(self, server: MotoS3Server) -> str:
        return server.url(BUCKET, f"conformance/{uuid.uuid4().hex[:12]}", part_size="5MiB")


# --------------------------------------------------------------------------- config


def test_config_from_url_round_trips_and_pickles() -> None:
    url = (
        "s3://my-bucket/kv/cache/?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
        "&access_key_id=AK&secret_access_key=SK&session_token=TOK&part_size=16MiB"
        "&io_threads=4&connect_timeout=1.5&read_timeout=7&retry_mode=adaptive&max_attempts=5"
        "&addressing_style=path&checksums=when_supported&create_bucket=true"
    )
    config = S3Config.from_url(url)
    assert (config.bucket, config.prefix) == ("my-bucket", "kv/cache")
    assert config.part_size == 16 << 20 and config.read_timeout == 7.0
    assert S3Config.from_url(config.to_url()) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert S3Config.from_url("s3://my-bucket").prefix == ""


def test_secrets_are_masked_for_people(url: str) -> None:
    config = S3Config.from_url(url + "&session_token=TOKEN-VALUE")
    assert SECRET_ACCESS_KEY in config.to_url()
    for shown in (repr(config), str(config), config.redacted_url()):
        assert SECRET_ACCESS_KEY not in shown and "TOKEN-VALUE" not in shown


async def test_driver_repr_masks_the_secret(driver: S3Driver) -> None:
    assert SECRET_ACCESS_KEY not in repr(driver)
    assert "secret_access_key=***" in repr(driver)


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3://Bad_Bucket/kv",
        "s3://bucket/with space",
        "s3://bucket?part_size=1MiB",
        "s3://bucket?access_key_id=only-the-id",
        "s3://bucket?session_token=alone",
        "s3://bucket?retry_mode=sometimes",
        "s3://bucket?read_timeout=0",
    ],
)
def test_bad_configs_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        S3Config.from_url(url)


def test_object_names_are_sharded_and_parse_back() -> None:
    key = b"\x00chunk/..%\xff"
    name = object_name("kv/a", key)
    assert name == f"kv/a/{shard_of(key)}/{key.hex()}"
    assert len(shard_of(key)) == 2
    assert key_of("kv/a", name) == key
    assert key_of("", object_name("", key)) == key
    for foreign in ("kv/a/zz/00", "kv/a/00/not-hex", "kv/a/b/00/0011", "kv/b/00/0011", "kv/a/x"):
        assert key_of("kv/a", foreign) is None


# ----------------------------------------------------------------------- behaviour


async def test_large_values_use_multipart_and_ranged_reads(
    driver: S3Driver, server: MotoS3Server
) -> None:
    value = bytes(range(256)) * ((2 * PART + 12345) // 256)
    await driver.put_many([(b"large", value)])
    client = server.client()
    try:
        head = client.head_object(Bucket=BUCKET, Key=object_name(driver.config.prefix, b"large"))
    finally:
        client.close()
    assert head["ETag"].endswith('-3"'), "three parts: a multipart upload"
    (got,) = await driver.get_many([b"large"])
    assert got is not None and got == value
    small = bytearray(10)
    exact = bytearray(len(value))
    got_small, got_exact = await driver.get_many([b"large", b"large"], into=[small, exact])
    assert got_small is not None and got_small == value
    assert got_exact is not None and got_exact.obj is exact and got_exact == value


async def test_list_ignores_foreign_objects(driver: S3Driver, server: MotoS3Server) -> None:
    await driver.put_many([(b"mine", b"value")])
    client = server.client()
    try:
        for name in ("notes.txt", "00/not-hex", "zz/6d696e65"):
            client.put_object(Bucket=BUCKET, Key=f"{driver.config.prefix}/{name}", Body=b"x")
    finally:
        client.close()
    assert [(entry.key, entry.size) async for entry in driver.list()] == [(b"mine", 5)]
    usage = await driver.usage()
    assert (usage.entries, usage.bytes, usage.capacity_bytes) == (1, 5, None)


async def test_the_largest_value_is_ten_thousand_parts(driver: S3Driver) -> None:
    assert driver.capabilities.max_value_bytes == PART * 10_000
    assert driver.capabilities.shared and driver.capabilities.persistent


async def test_overwrite_between_ranges_restarts_the_read(
    driver: S3Driver, server: MotoS3Server
) -> None:
    """An object replaced after the first ranged GET of a read is read again, whole:
    the later ranges are pinned to the first one's ETag and fail with 412."""
    old, new = b"o" * (2 * PART + 1), b"n" * (3 * PART + 7)
    await driver.put_many([(b"raced", old)])
    name = object_name(driver.config.prefix, b"raced")
    writer = server.client()
    calls = 0

    def overwrite_once(**_: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            writer.put_object(Bucket=BUCKET, Key=name, Body=new)

    driver._client.meta.events.register("after-call.s3.GetObject", overwrite_once)
    try:
        (got,) = await driver.get_many([b"raced"])
    finally:
        driver._client.meta.events.unregister("after-call.s3.GetObject", overwrite_once)
        writer.close()
    assert got is not None and got == new
    assert calls > 3, "the read restarted after its pinned ranges failed"


class _Refusal:
    """The raw body of a 503 SlowDown, as botocore reads it."""

    def stream(self) -> Iterator[bytes]:
        yield b"<Error><Code>SlowDown</Code><Message>Please reduce your rate</Message></Error>"


@pytest.mark.parametrize("size", [3 << 20, 2 * PART + 5], ids=["put_object", "multipart"])
async def test_throttled_puts_are_retried_with_the_whole_value(driver: S3Driver, size: int) -> None:
    """The first attempt of every upload request is refused with a 503 (before it
    reaches the server); botocore retries, rewinding the body, and the value lands
    whole."""
    value = bytes(range(256)) * (size // 256) + b"tail"
    attempts: dict[str, int] = {}

    def refuse_first(request: AWSPreparedRequest, **_: Any) -> AWSResponse | None:
        if request.method != "PUT" or request.body is None:
            return None
        seen = attempts.get(request.url, 0)
        attempts[request.url] = seen + 1
        return AWSResponse(request.url, 503, {}, _Refusal()) if seen == 0 else None

    driver._client.meta.events.register("before-send.s3", refuse_first)
    try:
        await driver.put_many([(b"throttled", value)])
    finally:
        driver._client.meta.events.unregister("before-send.s3", refuse_first)
    assert attempts and all(count == 2 for count in attempts.values())
    (got,) = await driver.get_many([b"throttled"])
    assert got is not None and got == value


async def test_throttling_that_outlasts_the_retries_is_transient(server: MotoS3Server) -> None:
    driver = await open_driver(server.url(BUCKET, "throttled", max_attempts="2"))
    assert isinstance(driver, S3Driver)

    def refuse(request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, 503, {}, _Refusal())

    driver._client.meta.events.register("before-send.s3", refuse)
    try:
        with pytest.raises(TransientError, match="SlowDown"):
            await driver.get_many([b"k"])
    finally:
        await driver.close()


async def test_readers_racing_overwrites_see_whole_values(driver: S3Driver) -> None:
    sizes = (2 * PART + 3, PART + 11)
    values = [bytes([i]) * sizes[i % 2] for i in range(4)]
    await driver.put_many([(b"hot", values[0])])
    stop = time.monotonic() + 8

    async def write() -> None:
        for round_no in range(1, 12):
            if time.monotonic() > stop:
                return
            await driver.put_many([(b"hot", values[round_no % 4])])

    async def read() -> int:
        reads = 0
        while reads < 12 and time.monotonic() < stop:
            (got,) = await driver.get_many([b"hot"])
            assert got is not None, "the key is never deleted"
            assert got.tobytes() in values, "a read mixed two versions"
            reads += 1
        return reads

    outcomes = await asyncio.gather(write(), read(), read())
    assert sum(outcomes[1:]) > 0


async def test_missing_bucket_is_not_found_unless_created(server: MotoS3Server) -> None:
    bucket = f"kv-{uuid.uuid4().hex[:12]}"
    with pytest.raises(NotFoundError, match=bucket):
        await open_driver(server.url(bucket))
    created = await open_driver(server.url(bucket, create_bucket="true"))
    try:
        await created.put_many([(b"k", b"v")])
        assert await created.contains_many([b"k"]) == [True]
    finally:
        await created.close()


async def test_credentials_come_from_the_environment(
    server: MotoS3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    isolate_aws_settings(monkeypatch, tmp_path)
    bare = f"s3://{BUCKET}/env-{uuid.uuid4().hex[:8]}?endpoint_url={server.endpoint_url}"
    with pytest.raises(ConfigError, match="credentials"):
        await open_driver(bare + "&region=us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    driver = await open_driver(bare)
    try:
        await driver.put_many([(b"k", b"v")])
        assert await driver.get_many([b"k"]) == [b"v"]
    finally:
        await driver.close()


def isolate_aws_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials, config files or instance metadata from the machine."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_unreachable_endpoint_is_unavailable() -> None:
    url = MotoS3Server(free_port()).url(BUCKET, connect_timeout="0.5", max_attempts="1")
    started = time.monotonic()
    with pytest.raises(DriverUnavailableError):
        await open_driver(url)
    assert time.monotonic() - started < 20


async def test_a_silent_server_times_out() -> None:
    """A server that accepts connections and never answers: bounded by read_timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((HOST, 0))
        listener.listen(16)
        url = MotoS3Server(listener.getsockname()[1]).url(
            BUCKET, read_timeout="0.5", max_attempts="1"
        )
        started = time.monotonic()
        with pytest.raises(DriverTimeoutError):
            await open_driver(url)
        assert time.monotonic() - started < 20


# ----------------------------------------------------------------- server killed


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


@pytest.fixture
def own_server() -> Iterator[MotoS3Server]:
    """A server of this test alone, free to be killed and restarted."""
    with MotoS3Server() as running:
        running.create_bucket(BUCKET)
        yield running


async def test_kill_restart_and_the_same_driver_recovers(own_server: MotoS3Server) -> None:
    """kill -9 the server under a store of [s3, cpu]: typed errors, the cpu tier keeps
    serving; after a restart on the same port (empty: moto keeps no state) the same
    driver says the bucket is missing, then works once it is created again."""
    url = own_server.url(BUCKET, "killed", connect_timeout="1", read_timeout="20", max_attempts="2")
    s3 = await open_driver(url)
    cpu = await open_driver("cpu://?capacity=16MiB")
    config = StoreConfig.parse(
        {
            "tiers": [{"url": url, "max_bytes": "64MiB", "timeout_s": 20}, "cpu://?capacity=16MiB"],
            "chunk_tokens": CHUNK,
        }
    )
    store = await AsyncKVStore.open(config, NAMESPACE, drivers=[s3, cpu])
    try:
        ids, kv = prompt(1, 4 * CHUNK)
        assert (await store.store(ids, kv)).written == 4
        await store.flush()
        assert await s3.contains_many(store.keys(ids)) == [True] * 4

        own_server.kill()
        for call in (
            s3.get_many([b"k"]),
            s3.put_many([(b"k", b"v")]),
            s3.contains_many([b"k"]),
            s3.delete_many([b"k"]),
            s3.usage(),
        ):
            with pytest.raises(DriverUnavailableError):
                await call
        loaded = await store.retrieve(ids)
        assert loaded.tokens == 4 * CHUNK and loaded.kv is not None
        assert torch.equal(loaded.kv, kv)
        assert set(loaded.chunk_tiers) == {store.tiers[1].name}
        await store.flush()  # the promotions back into s3 fail while it is down
        assert sum(store.tiers[0].stats.errors.values()) >= 1

        own_server.start()
        with pytest.raises(NotFoundError, match=BUCKET):
            await s3.get_many([b"k"])
        with pytest.raises(NotFoundError):
            await s3.put_many([(b"k", b"v")])
        own_server.create_bucket(BUCKET)
        await s3.put_many([(b"k", b"again")])
        (got,) = await s3.get_many([b"k"])
        assert got is not None and got == b"again"
        assert [entry.key async for entry in s3.list()] == [b"k"]
    finally:
        await store.close()


async def put_until_it_fails(driver: Any, values: list[tuple[bytes, bytes]]) -> None:
    """Put the batch again and again (a bounded number of times) until a put fails."""
    for _ in range(5):
        await driver.put_many(values)


async def test_kill_during_a_batch_is_typed_and_the_driver_recovers(
    own_server: MotoS3Server,
) -> None:
    """A server killed while multipart uploads are in flight: the batch fails with a
    typed error and the driver works again once the server is back."""
    url = own_server.url(
        BUCKET, "mid", part_size="5MiB", connect_timeout="1", read_timeout="20", max_attempts="2"
    )
    driver = await open_driver(url)
    try:
        values = [(f"v{i}".encode(), bytes([i]) * (3 * PART)) for i in range(4)]
        killer = threading.Timer(0.2, own_server.kill)
        killer.start()
        try:
            with pytest.raises((DriverUnavailableError, TransientError)):
                await put_until_it_fails(driver, values)
        finally:
            killer.join()
        own_server.start()
        own_server.create_bucket(BUCKET)
        assert await driver.get_many([key for key, _ in values]) == [None] * 4
        await driver.put_many(values[:1])
        (got,) = await driver.get_many([values[0][0]])
        assert got is not None and got == values[0][1]
    finally:
        await driver.close()
