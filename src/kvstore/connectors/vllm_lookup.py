"""How vLLM's scheduler asks the worker's store how much of a prompt is cached.

vLLM splits a connector in two: the scheduler-side object decides how many
tokens to load, the worker-side object owns the store. They share a process
under the in-process (``uni``) executor, and then the scheduler calls the
store directly (``local_lookup``); under the multiprocess executor (vLLM's
default on CPU) they do not, and worker rank 0 answers lookups over a Unix
socket (``LookupServer``/``LookupClient``, authenticated with a key both sides
derive from the engine id). A lookup that fails or times out is a miss: the
request is computed, never stalled or failed.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger("kvstore.connectors.vllm")

Lookup = Callable[[str, npt.NDArray[np.int32]], int]
"""Cached prefix length in tokens of a request's token ids, given the request's id."""

_local: dict[str, Lookup] = {}
_local_lock = threading.Lock()
_ANSWER = struct.Struct("<q")
_ID_LENGTH = struct.Struct("<I")
"""A question is the request id's length, the id (UTF-8), then the token ids (int32)."""


def register_local(address: str, lookup: Lookup) -> None:
    """Make ``lookup`` reachable in this process under ``address``."""
    with _local_lock:
        _local[address] = lookup


def unregister_local(address: str) -> None:
    with _local_lock:
        _local.pop(address, None)


def local_lookup(address: str) -> Lookup | None:
    """The lookup a worker in this process registered under ``address``, if any."""
    with _local_lock:
        return _local.get(address)


class LookupServer:
    """Answers lookups on a Unix socket, one thread a connection, until closed."""

    def __init__(self, address: str, authkey: bytes, lookup: Lookup) -> None:
        Path(address).unlink(missing_ok=True)
        self.address = address
        self._lookup = lookup
        self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._accept, name="kvstore-vllm-lookup", daemon=True
        )
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection = self._listener.accept()
            except OSError:
                if not self._closed.is_set():
                    log.exception("kvstore lookup server on %s stopped accepting", self.address)
                return
            except Exception:
                if self._closed.is_set():
                    return
                log.warning("kvstore lookup server refused a connection", exc_info=True)
                continue
            if self._closed.is_set():
                connection.close()
                return
            threading.Thread(
                target=self._serve, args=(connection,), name="kvstore-vllm-lookup", daemon=True
            ).start()

    def _serve(self, connection: Connection) -> None:
        with connection:
            while not self._closed.is_set():
                try:
                    request = connection.recv_bytes()
                except (EOFError, OSError):
                    return
                try:
                    (length,) = _ID_LENGTH.unpack_from(request)
                    start = _ID_LENGTH.size
                    req_id = request[start : start + length].decode()
                    tokens = np.frombuffer(request, dtype="<i4", offset=start + length)
                    answer = self._lookup(req_id, tokens)
                except Exception:
                    log.warning("kvstore lookup failed; answering a miss", exc_info=True)
                    answer = 0
                try:
                    connection.send_bytes(_ANSWER.pack(answer))
                except OSError:
                    return

    def close(self) -> None:
        """Stop accepting (a last bare connection wakes the accepting thread) and
        remove the socket."""
        self._closed.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
            wake.settimeout(1.0)
            try:
                wake.connect(self.address)
            except OSError:
                log.debug("kvstore lookup server on %s was already unreachable", self.address)
        self._thread.join(timeout=5)
        self._listener.close()
        Path(self.address).unlink(missing_ok=True)


class LookupClient:
    """Asks a ``LookupServer``; connects on first use and after any failure."""

    def __init__(self, address: str, authkey: bytes, timeout_s: float) -> None:
        self.address = address
        self._authkey = authkey
        self._timeout_s = timeout_s
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> Connection:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                return Client(self.address, family="AF_UNIX", authkey=self._authkey)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def lookup(self, req_id: str, tokens: npt.NDArray[np.int32]) -> int:
        """Cached prefix length of request ``req_id``'s ``tokens``; 0 when the worker
        cannot be asked."""
        name = req_id.encode()
        question = b"".join(
            (_ID_LENGTH.pack(len(name)), name, np.ascontiguousarray(tokens, dtype="<i4").tobytes())
        )
        with self._lock:
            try:
                if self._connection is None:
                    self._connection = self._connect()
                self._connection.send_bytes(question)
                if not self._connection.poll(self._timeout_s):
                    raise TimeoutError(f"no answer within {self._timeout_s} s")
                (answer,) = _ANSWER.unpack(self._connection.recv_bytes())
                return int(answer)
            except Exception:
                log.warning(
                    "kvstore lookup via %s failed; treating it as a miss",
                    self.address,
                    exc_info=True,
                )
                self.close()
                return 0

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()
