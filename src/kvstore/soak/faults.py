"""What the soak breaks, and the real things it breaks: a redis-server and a small disk.

``RedisProcess`` is a redis-server on a free 127.0.0.1 port, persistence off,
that can be paused (SIGSTOP), resumed, killed (SIGKILL) and started again.
``private_disk`` mounts a tmpfs of a given size that only this process and
its children see (a private mount namespace), so filling it to ENOSPC
touches no one else's disk. ``corrupt_chunk_files`` flips bytes inside the
values of nvme chunk files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore.drivers.nvme.layout import HEADER_SIZE, HeaderError, decode_header

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2


def start_server(
    argv: list[str],
    answers: Callable[[], object],
    errors: type[Exception] | tuple[type[Exception], ...],
    describe: Callable[[], str] = lambda: "",
) -> subprocess.Popen[bytes]:
    """Start a server process and wait (bounded) until ``answers()`` stops raising
    ``errors``. RuntimeError, with ``describe()`` (say, its log's tail), if it
    exits first or does not answer in time (it is killed then)."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with status {process.returncode}: {describe()}")
        try:
            answers()
            return process
        except errors:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"{argv[0]} did not answer in time: {describe()}") from None
            time.sleep(0.05)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class RedisProcess:
    """A redis-server for the soak's shared tier, with a memory limit and LRU eviction."""

    def __init__(self, directory: Path, maxmemory: int) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("the soak needs redis-server on PATH (apt install redis-server)")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        (directory / "redis.conf").write_text(
            "\n".join(
                [
                    f"bind {HOST}",
                    f"port {self.port}",
                    "protected-mode no",
                    f"dir {directory}",
                    f"logfile {directory / 'redis.log'}",
                    'save ""',
                    "appendonly no",
                    f"maxmemory {maxmemory}",
                    "maxmemory-policy allkeys-lru",
                ]
            )
            + "\n"
        )

    def url(self, query: str) -> str:
        return f"redis://{HOST}:{self.port}/0?{query}"

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        """A plain client that gives up at once (no retries) when the server does not answer."""
        return redis.Redis(
            host=HOST, port=self.port, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        self.process = start_server(
            ["redis-server", str(self.directory / "redis.conf")], self._ping, redis.RedisError
        )

    def _ping(self) -> None:
        with self.client() as client:
            client.ping()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would (a paused server is killed too)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def keys(self) -> int | None:
        """DBSIZE, or None if the server does not answer."""
        try:
            with self.client() as client:
                return int(client.dbsize())
        except redis.RedisError:
            return None

    def _signal(self, signum: int) -> None:
        if self.process is not None:
            self.process.send_signal(signum)


def private_disk(path: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes on ``path`` in a mount namespace of this
    process's own (its children inherit it; it goes away with them). None when
    mounted, else why not (then ``path`` is left a plain directory).

    Without root it needs unprivileged user namespaces and a process of one
    thread: ``kvstore.soak.command`` calls it before importing numpy and torch,
    which start threads."""
    path.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNS | (_CLONE_NEWUSER if uid != 0 else 0)
    if libc.unshare(flags) != 0:
        return f"unshare: {os.strerror(ctypes.get_errno())}"
    try:
        if uid != 0:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    except OSError as exc:
        return f"user namespace: {exc}"
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return f"private mounts: {os.strerror(ctypes.get_errno())}"
    options = f"size={size}".encode()
    if libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, options) != 0:
        return f"mount tmpfs: {os.strerror(ctypes.get_errno())}"
    return None


def release_disk(path: Path) -> None:
    """Unmount what ``private_disk`` mounted on ``path`` (nothing if it is no mount)."""
    ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(path), _MNT_DETACH)


def fill_disk(directory: Path) -> int:
    """Write a ballast file in ``directory`` until its filesystem is full; bytes written."""
    block = b"\0" * (1 << 20)
    written = 0
    with (directory / "ballast").open("wb", buffering=0) as ballast:
        while True:
            try:
                written += ballast.write(block) or 0
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                return written


def free_disk(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / "ballast").unlink()


def chunk_files(directory: Path) -> list[Path]:
    """The nvme driver's value files under ``directory`` (not its lock or temp files)."""
    return [
        path for path in directory.rglob("*") if path.is_file() and not path.name.startswith(".")
    ]


def corrupt_chunk_files(directories: list[Path], count: int, rng: random.Random) -> int:
    """Overwrite 64 bytes inside the value of ``count`` random nvme chunk files; how
    many were corrupted (files may vanish meanwhile: the workers keep running)."""
    files = [path for directory in directories for path in chunk_files(directory)]
    corrupted = 0
    for path in rng.sample(files, min(count, len(files))):
        try:
            with path.open("r+b") as file:
                _, length = decode_header(file.read(HEADER_SIZE))
                if length < 64:
                    continue
                file.seek(HEADER_SIZE + rng.randrange(length - 63))
                file.write(rng.randbytes(64))
            corrupted += 1
        except (OSError, HeaderError):
            continue
    return corrupted
