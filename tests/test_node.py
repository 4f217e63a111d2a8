"""The node service with real processes: sharing, crashes, restarts and access.

Every client here is a separate process (tests/node_worker.py) or this test
process, talking to a real ``kvstore node`` process (tests/node_server.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from node_server import NodeServer
from node_worker import (
    HELD_ROOM,
    WRITTEN_KEYS,
    key_of,
    namespace,
    prompt,
    store_config,
    value_of,
)

from kvstore.config import StoreConfig
from kvstore.drivers.node.driver import NodeConfig, NodeDriver
from kvstore.errors import ConfigError, DriverUnavailableError
from kvstore.node.access import PeerCredentials, listening_socket, peer_allowed
from kvstore.node.service import NodeService
from kvstore.store import KVStore
from kvstore.sync import LoopThread

WORKER = Path(__file__).with_name("node_worker.py")
NOBODY = 65534
KiB = 1 << 10


@pytest.fixture(scope="module")
def node_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    # The socket's directory is open to all, so the uid test reaches the credential check.
    socket_dir = Path(tempfile.mkdtemp(prefix="kvstore-node-"))
    socket_dir.chmod(0o755)
    server = NodeServer(
        tmp_path_factory.mktemp("node"), capacity="256MiB", socket=socket_dir / "node.sock"
    )
    server.start()
    yield server
    server.stop()
    shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def open_driver(loop: LoopThread, url: str) -> NodeDriver:
    return loop.run(NodeDriver.open(NodeConfig.from_url(url)), 10)


def worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, text=True, cwd=WORKER.parent
    )


def service_stats(loop: LoopThread, driver: NodeDriver) -> dict[str, Any]:
    return loop.run(driver.node_stats(), 10)


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_share_chunks_bit_identically(node_service: NodeServer) -> None:
    writer = worker("store", node_service.url, "1")
    out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert out.strip() == "stored 8"
    tokens, kv = prompt(1)
    with KVStore.open(store_config(node_service.url), namespace()) as store:
        result = store.retrieve(tokens)
    assert result.tokens == len(tokens)
    assert result.kv is not None
    assert torch.equal(result.kv.view(torch.int16), kv.view(torch.int16))


def test_writer_killed_mid_stores_leaves_committed_values_whole_and_no_room_taken(
    node_service: NodeServer, loop: LoopThread
) -> None:
    size = 512 * KiB
    writer = worker("write", node_service.url, str(size))
    assert writer.stdout is not None
    committed = sorted({int(writer.stdout.readline()) for _ in range(100)})
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    driver = open_driver(loop, node_service.url)
    try:
        values = loop.run(driver.get_many([key_of(i) for i in committed]), 10)
        assert [bytes(v) if v is not None else None for v in values] == [
            value_of(i, size) for i in committed
        ]
        # Whatever else the writer got in is whole: committed, or not there at all.
        stored = [e.key for e in loop.run(_listed(driver), 10) if e.key.startswith(b"node-test-")]
        for key, value in zip(stored, loop.run(driver.get_many(stored), 10)):
            assert value is not None
            assert bytes(value) == value_of(int(key[len(b"node-test-") :]), size)
        wait_for(lambda: service_stats(loop, driver)["sessions"] == 1)
        assert service_stats(loop, driver)["reserved_bytes"] == 0
        loop.run(driver.delete_many(stored), 10)
    finally:
        loop.run(driver.close(), 10)


def test_concurrent_writers_and_a_reader_never_see_a_torn_value(
    node_service: NodeServer, loop: LoopThread
) -> None:
    """Three processes overwrite the same keys while this one reads them."""
    size = 256 * KiB
    writers = [worker("write", node_service.url, str(size)) for _ in range(3)]
    driver = open_driver(loop, node_service.url)
    try:
        for writer in writers:
            assert writer.stdout is not None
            writer.stdout.readline()
        keys = [key_of(i) for i in range(WRITTEN_KEYS)]
        for _ in range(20):
            for index, value in enumerate(loop.run(driver.get_many(keys), 10)):
                assert value is None or bytes(value) == value_of(index, size)
    finally:
        for writer in writers:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=10)
        wait_for(lambda: service_stats(loop, driver)["sessions"] == 1)
        assert service_stats(loop, driver)["reserved_bytes"] == 0
        loop.run(driver.delete_many([key_of(i) for i in range(WRITTEN_KEYS)]), 10)
        loop.run(driver.close(), 10)


async def _listed(driver: NodeDriver) -> list[Any]:
    return [entry async for entry in driver.list()]


def test_lent_room_is_committed_on_exit_and_freed_on_an_exception(
    node_service: NodeServer, loop: LoopThread
) -> None:
    driver = open_driver(loop, node_service.url)
    other = open_driver(loop, node_service.url)
    value = value_of(9, HELD_ROOM)

    async def lend(key: bytes, *, fail: bool) -> None:
        async with driver.lend_many([(key, len(value))]) as (room,):
            assert room is not None
            room[:] = value
            assert await other.contains_many([key]) == [False], "seen before its commit"
            if fail:
                raise RuntimeError("the writer gives up")

    try:
        free = service_stats(loop, driver)["free_bytes"]
        with pytest.raises(RuntimeError):
            loop.run(lend(b"given-up", fail=True), 10)
        wait_for(lambda: service_stats(loop, driver)["free_bytes"] == free)
        assert service_stats(loop, driver)["reserved_bytes"] == 0
        assert loop.run(other.contains_many([b"given-up"]), 10) == [False]
        loop.run(lend(b"committed", fail=False), 10)
        assert loop.run(other.get_many([b"committed"]), 10) == [value]
        assert service_stats(loop, driver)["reserved_bytes"] == 0
        loop.run(driver.delete_many([b"committed"]), 10)
    finally:
        loop.run(driver.close(), 10)
        loop.run(other.close(), 10)


def test_a_killed_client_frees_its_room_and_ends_its_loans(
    node_service: NodeServer, loop: LoopThread
) -> None:
    driver = open_driver(loop, node_service.url)
    try:
        free = service_stats(loop, driver)["free_bytes"]
        holder = worker("hold", node_service.url, "lent")
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        stats = service_stats(loop, driver)
        assert stats["reserved_bytes"] == HELD_ROOM
        assert stats["free_bytes"] == free - 2 * HELD_ROOM
        # Deleted while lent: the value stays intact for the borrower until it lets go.
        assert loop.run(driver.delete_many([b"lent"]), 10) == [True]
        assert service_stats(loop, driver)["free_bytes"] == free - 2 * HELD_ROOM
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        wait_for(lambda: service_stats(loop, driver)["free_bytes"] == free)
        assert service_stats(loop, driver)["reserved_bytes"] == 0
        assert loop.run(driver.contains_many([b"held"]), 10) == [False]
    finally:
        loop.run(driver.close(), 10)


@pytest.mark.slow
def test_clients_recover_from_a_service_restart_without_restarting(tmp_path: Path) -> None:
    server = NodeServer(tmp_path)
    server.start()
    tokens, kv = prompt(2)
    config = store_config(server.url + "?retry_s=0.1")
    try:
        with KVStore.open(config, namespace()) as store:
            assert store.store(tokens, kv).written == 8
            assert store.retrieve(tokens).tokens == len(tokens)
            server.kill()
            # Down: misses, no errors.
            assert store.retrieve(tokens).tokens == 0
            assert store.store(tokens, kv).written == 0
            server.start()
            time.sleep(0.2)
            assert store.retrieve(tokens).tokens == 0  # a new service starts empty
            assert store.store(tokens, kv).written == 8
            result = store.retrieve(tokens)
            assert result.tokens == len(tokens)
            assert result.kv is not None
            assert torch.equal(result.kv.view(torch.int16), kv.view(torch.int16))
    finally:
        server.stop()


def test_the_driver_reports_a_stopped_service_as_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DriverUnavailableError):
        LoopThread().run(NodeDriver.open(NodeConfig.from_url(f"node://{tmp_path}/none.sock")), 10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_cannot_connect(node_service: NodeServer) -> None:
    """As uid 65534: the owner-only socket refuses the connection; with the socket
    opened to all, the service's SO_PEERCRED check refuses it."""
    assert node_service.socket.stat().st_mode & 0o777 == 0o600
    assert _connect_as(NOBODY, node_service.socket) == ("error", "EACCES")
    node_service.socket.chmod(0o666)
    try:
        kind, reply = _connect_as(NOBODY, node_service.socket)
    finally:
        node_service.socket.chmod(0o600)
    assert kind == "reply"
    message = msgpack.unpackb(bytes.fromhex(reply)[4:])
    assert message["error"] == "PermissionDeniedError"
    assert f"uid {NOBODY}" in message["message"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_a_group_member_of_another_uid_is_served(tmp_path: Path, loop: LoopThread) -> None:
    """``--group``: as uid 65534 with that group it connects and gets the arena;
    as uid 65534 with another group the 0660 socket refuses it."""
    socket_dir = Path(tempfile.mkdtemp(prefix="kvstore-node-"))
    socket_dir.chmod(0o755)
    path, group = socket_dir / "node.sock", 4242
    config = StoreConfig.from_urls("cpu://?capacity=1MiB&page_size=64KiB&pin=none&shared=true")
    service = loop.run(NodeService.open(config, group_gid=group), 30)
    serving = loop.loop.call_soon_threadsafe
    task: list[Any] = []
    serving(lambda: task.append(loop.loop.create_task(service.serve(path))))
    try:
        wait_for(path.exists)
        kind, reply = _connect_as(NOBODY, path, gid=group)
        assert kind == "reply"
        assert "ok" in msgpack.unpackb(bytes.fromhex(reply)[4:])
        assert _connect_as(NOBODY, path) == ("error", "EACCES")
    finally:
        serving(task[0].cancel)
        wait_for(lambda: task[0].done())
        loop.run(service.close(), 30)
        shutil.rmtree(socket_dir, ignore_errors=True)


def _connect_as(uid: int, path: Path, *, gid: int | None = None) -> tuple[str, str]:
    """Connect to ``path`` from a child process running as ``uid`` (and ``gid``,
    else the same number); what happened."""
    import errno
    import socket

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(str(path))
                outcome = "reply " + sock.recv(4096).hex()
            except OSError as exc:
                outcome = "error " + errno.errorcode.get(exc.errno or 0, str(exc))
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        outcome = pipe.read()
    os.waitpid(child, 0)
    kind, _, detail = outcome.partition(" ")
    return kind, detail


def test_peer_check_serves_the_owner_and_the_group_only() -> None:
    """The credential check itself, with credentials another uid would present."""
    owner = os.getuid()
    assert peer_allowed(PeerCredentials(1, owner, 0), owner, None)
    assert not peer_allowed(PeerCredentials(1, owner + 1000, 4242), owner, None)
    assert not peer_allowed(PeerCredentials(1, owner + 1000, 4242), owner, 4243)
    assert peer_allowed(PeerCredentials(1, owner + 1000, 4242), owner, 4242)


def test_a_full_service_evicts_the_least_recently_used_whoever_wrote_them(
    node_service: NodeServer, loop: LoopThread
) -> None:
    """Puts past the service's capacity evict old values, also another client's,
    so a full host cache keeps taking chunks; a value being used survives."""
    first, second = open_driver(loop, node_service.url), open_driver(loop, node_service.url)
    size = 16 << 20
    try:
        old = [b"lru-old-%d" % i for i in range(4)]
        loop.run(first.put_many([(key, value_of(i, size)) for i, key in enumerate(old)]), 10)
        new = [b"lru-new-%d" % i for i in range(17)]
        for i, key in enumerate(new):
            loop.run(second.get_many([old[0]]), 10)  # keeps old[0] the most recently used
            loop.run(second.put_many([(key, value_of(100 + i, size))]), 10)
        assert loop.run(first.contains_many(old), 10) == [True, False, False, False]
        assert bytes(loop.run(first.get_many([new[-1]]), 10)[0] or b"") == value_of(116, size)
        stats = service_stats(loop, first)["tiers"][0]
        assert stats["used_bytes"] <= stats["capacity_bytes"]
        assert stats["evictions"] >= 3
        loop.run(first.delete_many(old + new), 10)
    finally:
        loop.run(first.close(), 10)
        loop.run(second.close(), 10)


def test_a_group_socket_is_0660_and_a_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "run" / "node.sock"
    listener = listening_socket(path, os.getgid())
    try:
        assert path.stat().st_mode & 0o777 == 0o660
        assert path.stat().st_gid == os.getgid()
        with pytest.raises(ConfigError, match="already serving"):
            listening_socket(path, None)
    finally:
        listener.close()
    # The socket of a service that died is stale: a new service replaces it.
    replaced = listening_socket(path, None)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        replaced.close()


@pytest.mark.slow
def test_the_services_lower_tiers_take_evicted_chunks_and_give_them_back(tmp_path: Path) -> None:
    """A write-back first tier hands the chunks it evicts to the nvme tier below
    (the store's placement); a client's lookup and retrieve find them there and
    the service promotes them back into the arena, bit-identical."""
    server = NodeServer(
        tmp_path,
        capacity="512KiB",  # 8 pages: one prompt's 8 chunks
        first_tier="    write_policy: write-back\n",
        lower_tiers=f"  - url: nvme://{tmp_path}/disk?capacity=64MiB\n",
    )
    server.start()
    (tokens, kv), (other_tokens, other_kv) = prompt(3), prompt(4)
    loop = LoopThread()
    try:
        with KVStore.open(store_config(server.url), namespace()) as store:
            assert store.store(tokens, kv).written == 8
            assert store.store(other_tokens, other_kv).written == 8  # evicts the first 8
            result = store.retrieve(tokens)
        assert result.tokens == len(tokens)
        assert result.kv is not None
        assert torch.equal(result.kv.view(torch.int16), kv.view(torch.int16))
        client = open_driver(loop, server.url)
        tiers = service_stats(loop, client)["tiers"]
        loop.run(client.close(), 10)
        assert tiers[0]["evictions"] >= 8
        assert tiers[1]["hits"] >= 8
    finally:
        loop.stop()
        server.stop()


@pytest.mark.slow
def test_a_write_through_service_copies_committed_chunks_to_its_lower_tier(
    tmp_path: Path,
) -> None:
    """A client's chunks committed into a write-through arena reach the nvme tier
    below through the service store's write-through queue, bit-identical."""
    disk = tmp_path / "disk"
    server = NodeServer(tmp_path, lower_tiers=f"  - url: nvme://{disk}?capacity=64MiB\n")
    server.start()
    tokens, kv = prompt(5)
    loop = LoopThread()
    try:
        with KVStore.open(store_config(server.url), namespace()) as store:
            assert store.store(tokens, kv).written == 8
        client = open_driver(loop, server.url)
        wait_for(lambda: service_stats(loop, client)["tiers"][1]["chunks_written"] == 8)
        loop.run(client.close(), 10)
    finally:
        loop.stop()
        server.stop()
    with KVStore.open(store_config(f"nvme://{disk}?capacity=64MiB"), namespace()) as below:
        result = below.retrieve(tokens)
    assert result.tokens == len(tokens)
    assert result.kv is not None
    assert torch.equal(result.kv.view(torch.int16), kv.view(torch.int16))


@pytest.mark.slow
def test_the_service_serves_the_control_api_of_its_store(tmp_path: Path) -> None:
    """With ``control.enabled`` the service also serves the HTTP control API of
    its store: health, stats and metrics of the host's tiers."""
    import json
    import re
    import urllib.request

    server = NodeServer(tmp_path, settings="control:\n  enabled: true\n  port: 0\n")
    server.start()
    loop = LoopThread()
    try:
        wait_for(lambda: "control server listening" in server.log.read_text())
        url = re.search(r"listening on (\S+)", server.log.read_text())
        assert url is not None
        client = open_driver(loop, server.url)
        loop.run(client.put_many([(b"k", b"v" * 1000)]), 10)
        loop.run(client.close(), 10)
        with urllib.request.urlopen(f"{url.group(1)}/v1/health", timeout=10) as reply:
            health = json.loads(reply.read())
        assert health["tiers"][0]["reachable"] is True
        with urllib.request.urlopen(f"{url.group(1)}/metrics", timeout=10) as reply:
            assert b"kvstore_" in reply.read()
    finally:
        loop.stop()
        server.stop()
