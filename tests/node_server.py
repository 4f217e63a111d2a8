"""A real ``kvstore node`` process on a Unix socket in a test's directory.

``NodeServer`` writes a store config whose first tier is a shared cpu arena,
starts the service, waits (bounded) until its socket answers, and can kill it
with SIGKILL and start it again on the same socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 30.0


class NodeServer:
    """One node service; ``url`` is its ``node://`` URL."""

    def __init__(
        self,
        directory: Path,
        *,
        capacity: str = "64MiB",
        page_size: str = "64KiB",
        socket: Path | None = None,
        first_tier: str = "",
        lower_tiers: str = "",
        settings: str = "",
    ) -> None:
        """``first_tier``: more YAML keys of the arena's tier (indented under it);
        ``lower_tiers``: YAML list items of the tiers below it; ``settings``: more
        top-level YAML of the store config."""
        self.directory = directory
        self.socket = socket or directory / "node.sock"
        self.config = directory / "node.yaml"
        self.config.write_text(
            "tiers:\n"
            f"  - url: cpu://?capacity={capacity}&page_size={page_size}&pin=none&shared=true\n"
            f"{first_tier}{lower_tiers}{settings}"
        )
        self.log = directory / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"node://{self.socket}"

    def start(self) -> None:
        command = [sys.executable, "-m", "kvstore.cli", "node"]
        command += ["--config", str(self.config), "--socket", str(self.socket)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"kvstore node exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"kvstore node did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the service gets no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True
