"""A real S3 server for tests: moto's server as its own process on a loopback port.

``MotoS3Server`` starts ``python -m moto.server`` on 127.0.0.1 and a free port,
and can stop it, kill it with SIGKILL and start it again on the same port, so
tests can take the server away under a driver and give it back. moto keeps
everything in memory: a restarted server has no buckets until they are
created again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import boto3
from botocore.config import Config
from typing_extensions import Self

HOST = "127.0.0.1"
ACCESS_KEY_ID = "kvstore-test"
SECRET_ACCESS_KEY = "kvstore-test-secret"
REGION = "us-east-1"
KEY_BUFFER_BYTES = 256 << 20
"""moto spills objects larger than its key buffer to temp files; keep test values in memory."""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class MotoS3Server:
    """moto's S3 server in a child process; use as a context manager or start/stop."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def url(self, bucket: str, prefix: str = "", **options: object) -> str:
        """An ``s3://`` driver URL for ``bucket/prefix`` on this server, with test credentials."""
        query = {
            "endpoint_url": self.endpoint_url,
            "region": REGION,
            "access_key_id": ACCESS_KEY_ID,
            "secret_access_key": SECRET_ACCESS_KEY,
            **options,
        }
        rendered = "&".join(f"{name}={value}" for name, value in query.items())
        location = f"{bucket}/{prefix}" if prefix else bucket
        return f"s3://{location}?{rendered}"

    def client(self) -> Any:
        """A plain boto3 client of this server, for setting up and inspecting buckets."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def create_bucket(self, bucket: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        finally:
            client.close()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections."""
        if self.running:
            return
        environment = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(KEY_BUFFER_BYTES)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=environment,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"moto's server exited with status {self._process.returncode} on port "
                    f"{self.port}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.kill()
            raise RuntimeError(f"moto's server did not listen on port {self.port} in {timeout} s")
        self._warm_up(deadline - time.monotonic())

    def _warm_up(self, timeout: float) -> None:
        """Make one S3 request, so moto loads its S3 backend before a test's first call."""
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            config=Config(read_timeout=max(timeout, 1.0), retries={"total_max_attempts": 1}),
        )
        try:
            client.list_buckets()
        finally:
            client.close()

    def fsspec_url(self, path: str, **options: object) -> str:
        """An ``fsspec+s3://`` driver URL of ``path`` (``bucket/prefix``) on this server."""
        query = {
            "endpoint_url": self.endpoint_url,
            "key": ACCESS_KEY_ID,
            "secret": SECRET_ACCESS_KEY,
        }
        query.update((name, str(value)) for name, value in options.items())
        return f"fsspec+s3://{path}?{urlencode(query)}"

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and reap it."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=30)
            self._process = None

    def stop(self) -> None:
        """Stop the server politely, or kill it if it does not stop in time."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
        self.kill()

    def restart(self) -> None:
        """Start the server again on the same port (empty: moto keeps no state)."""
        self.stop()
        self.start()

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
