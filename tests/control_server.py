"""A real control server process (``python -m kvstore.control``, i.e. ``kvstore
serve``) on a free loopback port, for the control API's tests.

``ControlProcess`` writes the store config and namespace files, starts the
server with port 0, reads the URL it prints once it accepts connections, and
stops it with SIGTERM (the server then closes its store). Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kvstore.keys import Namespace

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def namespace_file(path: Path, namespace: Namespace, name: str | None = None) -> Path:
    """Write ``namespace`` as the YAML ``kvstore serve --namespace`` reads."""
    data: dict[str, Any] = {
        "model": namespace.model,
        "revision": namespace.revision,
        "layout": dataclasses.asdict(namespace.layout),
        "chunk_tokens": namespace.chunk_tokens,
        "tp_rank": namespace.tp_rank,
        "tp_size": namespace.tp_size,
        "codec": namespace.codec,
        "tenant": namespace.tenant,
    }
    if name is not None:
        data["name"] = name
    path.write_text(yaml.safe_dump(data))
    return path


class ControlProcess:
    """One ``kvstore serve`` process over the store ``config`` (a config mapping)."""

    def __init__(
        self,
        directory: Path,
        config: Mapping[str, Any],
        namespaces: list[Namespace],
        env: Mapping[str, str] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.config_path = directory / "store.yaml"
        control = {"port": 0, **config.get("control", {})}
        self.config_path.write_text(yaml.safe_dump({**config, "control": control}))
        self.namespace_paths = [
            namespace_file(directory / f"namespace-{i}.yaml", namespace)
            for i, namespace in enumerate(namespaces)
        ]
        self.env = {**os.environ, **(env or {})}
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log = directory / "server.log"

    def command(self) -> list[str]:
        words = [sys.executable, "-m", "kvstore.control", "--config", str(self.config_path)]
        for path in self.namespace_paths:
            words += ["--namespace", str(path)]
        return words

    def start(self) -> str:
        """Start the server and return its URL once it accepts connections."""
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=log, env=self.env
            )
        assert self._process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self._process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = self._process.stdout.readline()
                if b"listening on " in line:
                    self.url = line.decode().rsplit(" ", 1)[-1].strip()
                    return self.url
            if self._process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"control server did not start: {line!r}\n{self.log()}")

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit code."""
        process = self._process
        if process is None:
            return None
        self._process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def __enter__(self) -> ControlProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
