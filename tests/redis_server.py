"""Real ``redis-server`` processes on free loopback ports, for the redis driver's tests.

``RedisServer`` runs one server (optionally with a password, ACL users, TLS
or cluster mode) in its own directory, on 127.0.0.1 only, with persistence
off; it can be stopped, killed with SIGKILL and restarted on the same port.
``RedisClusterProcess`` runs three cluster-enabled servers and joins them
with ``redis-cli --cluster create``. Every wait is bounded.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from kvstore.soak.faults import start_server

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def redis_available() -> bool:
    """Whether redis-server and redis-cli are installed."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def tls_available() -> bool:
    """Whether this redis-server was built with TLS and openssl can make certificates."""
    if not redis_available() or shutil.which("openssl") is None:
        return False
    probe = subprocess.run(
        ["redis-server", "--port", "0", "--tls-port", "0"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "Bad directive" not in probe.stdout + probe.stderr


def free_port(*, with_bus: bool = False) -> int:
    """A port free on 127.0.0.1 now (and, for cluster nodes, port + 10000 too)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 <= 65535 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port found")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(*(directory / name for name in ("ca.crt", "s.crt", "s.key", "c.crt", "c.key")))
        ca_key = directory / "ca.key"
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=kvstore test CA",
            "-keyout",
            ca_key,
            "-out",
            files.ca,
        )
        for cert, key, name in (
            (files.server_cert, files.server_key, "localhost"),
            (files.client_cert, files.client_key, "kvstore client"),
        ):
            request = directory / f"{cert.stem}.csr"
            extensions = directory / f"{cert.stem}.ext"
            extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
            _openssl(
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                f"/CN={name}",
                "-keyout",
                key,
                "-out",
                request,
            )
            _openssl(
                "x509",
                "-req",
                "-in",
                request,
                "-CA",
                files.ca,
                "-CAkey",
                ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                extensions,
                "-out",
                cert,
            )
        return files


def _quoted(text: str) -> str:
    """``text`` as one double-quoted redis.conf argument."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


class RedisServer:
    """One redis-server process in ``directory`` on a fixed loopback port.

    password: ``requirepass`` for the default user.
    users: ACL users as ``(name, password)``, allowed every command and key.
    tls: serve TLS only (the plain port is off), requiring client certificates.
    cluster: run with ``cluster-enabled yes`` (join nodes with RedisClusterProcess).
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        users: Sequence[tuple[str, str]] = (),
        tls: TlsFiles | None = None,
        cluster: bool = False,
        maxmemory: str | None = None,
    ) -> None:
        self.directory = directory
        self.password = password
        self.users = tuple(users)
        self.tls = tls
        self.cluster = cluster
        self.maxmemory = maxmemory
        self.port = free_port(with_bus=cluster)
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "redis.conf").write_text(self._config())

    def _config(self) -> str:
        lines = [
            f"bind {HOST}",
            "protected-mode no",
            f"dir {self.directory}",
            f"logfile {self.directory / 'redis.log'}",
            'save ""',
            "appendonly no",
            "daemonize no",
        ]
        if self.tls is None:
            lines.append(f"port {self.port}")
        else:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls.server_cert}",
                f"tls-key-file {self.tls.server_key}",
                f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients yes",
            ]
        if self.password is not None:
            lines.append(f"requirepass {_quoted(self.password)}")
        lines += [
            f"user {_quoted(name)} on {_quoted('>' + secret)} ~* &* +@all"
            for name, secret in self.users
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f"cluster-config-file {self.directory / 'nodes.conf'}",
                "cluster-node-timeout 5000",
            ]
        if self.maxmemory is not None:
            lines += [f"maxmemory {self.maxmemory}", "maxmemory-policy noeviction"]
        return "\n".join(lines) + "\n"

    def url(self, options: str = "", *, user: tuple[str, str] | None = None) -> str:
        """A driver URL for this server: ``rediss`` with TLS, credentials when needed."""
        scheme = "redis" if self.tls is None else "rediss"
        userinfo = ""
        if user is not None:
            userinfo = f"{quote(user[0], safe='')}:{quote(user[1], safe='')}@"
        elif self.password is not None:
            userinfo = f":{quote(self.password, safe='')}@"
        query = options
        if self.tls is not None:
            query = "&".join(
                filter(
                    None,
                    (
                        f"ssl_ca_certs={quote(str(self.tls.ca))}",
                        f"ssl_certfile={quote(str(self.tls.client_cert))}",
                        f"ssl_keyfile={quote(str(self.tls.client_key))}",
                        options,
                    ),
                )
            )
        return f"{scheme}://{userinfo}{HOST}:{self.port}/0" + (f"?{query}" if query else "")

    def client(self) -> redis.Redis:
        """A plain redis-py client as the admin (default user), for test set-up."""
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_certfile": str(self.tls.client_cert),
                "ssl_keyfile": str(self.tls.client_key),
            }
        return redis.Redis(
            host=HOST, port=self.port, password=self.password, socket_timeout=5, **tls
        )

    def start(self) -> None:
        """Start the process and wait (bounded) until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the server is already running")
        self.process = start_server(
            ["redis-server", str(self.directory / "redis.conf")],
            self._ping,
            redis.RedisError,
            describe=self.log_tail,
        )

    def _ping(self) -> None:
        with self.client() as client:
            client.ping()

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def kill(self) -> None:
        """SIGKILL (kill -9) the server, as a crash would."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (empty: persistence is off)."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / "redis.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def serve(directory: Path) -> Iterator[RedisServer]:
    """A plain server in ``directory``, started, then stopped when the caller (a
    module fixture: ``yield from serve(...)``) is done with it."""
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()


class RedisClusterProcess:
    """Three cluster-enabled masters on loopback ports, joined into one cluster."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(masters)]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"{HOST}:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self._ready(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.1)

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def url(self, options: str = "") -> str:
        query = "&".join(filter(None, ("cluster=true", options)))
        return f"redis://{HOST}:{self.nodes[0].port}/0?{query}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
