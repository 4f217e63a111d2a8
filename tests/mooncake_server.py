"""A real ``mooncake_master`` process on free loopback ports, for the mooncake driver's tests.

``MooncakeMaster`` runs the master the ``mooncake-transfer-engine`` wheel ships,
with its RPC and metrics servers bound to 127.0.0.1, logging into its own
directory; it can be stopped, killed with SIGKILL and restarted on the same
ports (a restarted master has lost every object). Clients use the
``P2PHANDSHAKE`` metadata mode, so no metadata server is needed. Every wait is
bounded.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
LEASE_TTL_MS = 250
"""The read lease the test master grants (Mooncake's default is 10 s): short, so a
delete after a read waits a fraction of a second, long enough for any read here."""


def master_available() -> bool:
    """Whether the ``mooncake_master`` binary and the Python client are installed."""
    if shutil.which("mooncake_master") is None:
        return False
    try:
        import mooncake.store  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


class MooncakeMaster:
    """One ``mooncake_master`` in ``directory``, on fixed loopback RPC and metrics ports."""

    def __init__(self, directory: Path, *, lease_ttl_ms: int = LEASE_TTL_MS) -> None:
        self.directory = directory
        self.lease_ttl_ms = lease_ttl_ms
        self.rpc_port = free_port()
        self.metrics_port = free_port()
        while self.metrics_port == self.rpc_port:
            self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.rpc_port}"

    def url(self, **options: Any) -> str:
        """A driver URL for this master; ``options`` override the test defaults."""
        query: dict[str, Any] = {
            "local_hostname": HOST,
            "global_segment_size": "256MiB",
            "local_buffer_size": "96MiB",
            "metrics_port": self.metrics_port,
            "io_threads": 2,
            "op_timeout": 30,
            "connect_timeout": 30,
            "lease_wait": 5,
        }
        query.update(options)
        return f"mooncake://{self.address}?{urlencode(query)}"

    def start(self) -> None:
        """Start the master and wait until its RPC port accepts connections."""
        if self.running:
            return
        self.starts += 1
        log = (self.directory / f"master-{self.starts}.log").open("wb")
        try:
            self.process = subprocess.Popen(
                [
                    "mooncake_master",
                    f"--rpc_address={HOST}",
                    f"--rpc_port={self.rpc_port}",
                    f"--metrics_host={HOST}",
                    f"--metrics_port={self.metrics_port}",
                    f"--default_kv_lease_ttl={self.lease_ttl_ms}",
                    "--rpc_thread_num=4",
                    "--logtostderr",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mooncake_master exited with {self.process.returncode}: {self.log_tail()}"
                )
            if self._healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mooncake_master did not start in {START_TIMEOUT_S} s")

    def _healthy(self) -> bool:
        try:
            with socket.create_connection((HOST, self.rpc_port), timeout=0.5):
                pass
            with urllib.request.urlopen(
                f"http://{HOST}:{self.metrics_port}/health", timeout=1
            ) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Close this process's idle Mooncake clients while the master still answers
        (a client unmounts its segment by RPC when it closes, slowly once the master is
        gone), then SIGTERM it, and SIGKILL if it lingers."""
        if self.process is None:
            return
        from kvstore.drivers.mooncake.client import CONNECTIONS

        CONNECTIONS.close_idle()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: every object the master knew of is lost."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def restart(self) -> None:
        """Start again on the same ports (after ``kill`` or ``stop``)."""
        self.kill()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / f"master-{self.starts}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> MooncakeMaster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
