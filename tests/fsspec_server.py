"""A real S3 server for the fsspec driver's tests: moto's, as its own process.

``MotoServer`` runs ``python -m moto.server`` on a free port of 127.0.0.1 and
can kill it (SIGKILL), freeze it (SIGSTOP/SIGCONT) and restart it on the same
port, so tests exercise the driver against real process failures. moto keeps
its data in memory: a restarted server starts empty.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from types import TracebackType
from urllib.parse import urlencode

from typing_extensions import Self

HOST = "127.0.0.1"
ACCESS_KEY = "kvstore-test-key"
SECRET_KEY = "kvstore-test-secret"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on one loopback port, started, killed and restarted."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str, **options: object) -> str:
        """An ``fsspec+s3://`` URL of ``path`` (``bucket/prefix``) on this server."""
        query = {"endpoint_url": self.endpoint_url, "key": ACCESS_KEY, "secret": SECRET_KEY}
        query.update((name, str(value)) for name, value in options.items())
        return f"fsspec+s3://{path}?{urlencode(query)}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections."""
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._process.returncode}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"moto server did not listen on {self.endpoint_url} in {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and reap it."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)
            self._process.kill()
            self._process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill the server if it runs and start a fresh one on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """End the server politely, then by force."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGCONT)
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
