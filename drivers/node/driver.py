"""The ``node`` driver: a tier served by the host's node service (docs/node.md).

The driver connects to the service's Unix socket, receives the descriptor of
its shared arena and maps it once. A put reserves room, copies the values
into the mapped arena and commits them; a get borrows the values (the service
keeps them intact until released) and copies them out; ``borrow_many`` lends
views of the mapping itself, so the store verifies and copies with no staging
copy; ``lend_many`` lends writable views of reserved room, so the store
encodes a chunk straight into the arena and commits it. Only small msgpack
messages cross the socket.

A lost connection (the service stopped or restarted) makes calls fail with
``DriverUnavailableError``, which the store serves as misses; the next call
after ``retry_s`` connects again. A call interrupted mid-request drops its
connection, and with it (on the service's side) the room and loans it held.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import mmap
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import numpy as np
import numpy.typing as npt
from pydantic import Field
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
from kvstore.errors import DriverUnavailableError, KVStoreError
from kvstore.node.access import default_socket_path
from kvstore.node.protocol import (
    ConnectionClosed,
    raise_reply_error,
    receive_message,
    send_message,
)
from kvstore.sizes import format_size

ByteArray = npt.NDArray[np.uint8]
Segments = list[list[int]]
CopyPair = tuple[ByteArray, ByteArray]
"""A destination and a source array of the same length."""

OFFLOAD_BYTES = 1 << 20
"""Copies of at least this many bytes run on the driver's copy thread, off the event loop."""


class NodeConfig(DriverConfig):
    """``node:///run/kvstore/node.sock``: the node service listening on that socket.

    socket: the service's Unix socket; empty means the default,
        ``$XDG_RUNTIME_DIR/kvstore/node.sock`` or ``/run/kvstore/node.sock``.
    connect_timeout_s: how long connecting may take.
    retry_s: after the service could not be reached, calls fail at once (misses)
        for this long before the driver tries to connect again.
    """

    scheme: ClassVar[str] = "node"
    location_field: ClassVar[str | None] = "socket"

    socket: str = ""
    connect_timeout_s: float = Field(default=2.0, gt=0)
    retry_s: float = Field(default=0.5, ge=0)

    @property
    def socket_path(self) -> Path:
        return Path(self.socket) if self.socket else default_socket_path()


class _Connection:
    """One session with the service: its socket and the mapped arena."""

    def __init__(self, sock: socket.socket, mapping: mmap.mmap, hello: dict[str, Any]) -> None:
        self.sock = sock
        self.mapping = mapping
        self.arena: ByteArray = np.frombuffer(mapping, dtype=np.uint8)
        self.page_size = int(hello["page_size"])
        self.capacity = int(hello["capacity"])
        self.lock = asyncio.Lock()
        self.broken = False

    def close(self) -> None:
        self.broken = True
        self.sock.close()
        self.arena = np.empty(0, dtype=np.uint8)
        with contextlib.suppress(BufferError):
            self.mapping.close()

    def pairs(self, segments: Segments, value: ByteArray, *, to_arena: bool) -> list[CopyPair]:
        """The copies between ``value`` and the arena runs ``segments`` that hold it."""
        pairs: list[CopyPair] = []
        position = 0
        for offset, length in segments:
            stored = self.arena[offset : offset + length]
            piece = value[position : position + length]
            pairs.append((stored, piece) if to_arena else (piece, stored))
            position += length
        return pairs


def _connect(config: NodeConfig) -> _Connection:
    """Connect, check the service's greeting and map the arena it hands over."""
    path = config.socket_path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(config.connect_timeout_s)
        sock.connect(str(path))
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
        try:
            while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
                more = sock.recv(1 << 16)
                if not more:
                    raise ConnectionClosed("the service closed the connection")
                data += more
            reply = msgpack.unpackb(data[4:], raw=False)
            if "ok" not in reply:
                raise_reply_error(reply, "node")
            hello = reply["ok"]
            if len(fds) != 1:
                raise ConnectionClosed("the service sent no arena")
            mapping = mmap.mmap(fds[0], int(hello["arena_bytes"]), flags=mmap.MAP_SHARED)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        sock.setblocking(False)
        return _Connection(sock, mapping, hello)
    except KVStoreError:
        sock.close()
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sock.close()
        raise DriverUnavailableError(
            f"the node service at {path} cannot be reached: {exc}", driver="node"
        ) from exc


class NodeDriver(Driver[NodeConfig]):
    """A tier served by the host's node service, values moving through its shared arena."""

    config_type: ClassVar[type[DriverConfig]] = NodeConfig
    static_capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False,
        listable=True,
        zero_copy=True,
        lends_views=True,
        lends_room=True,
        shared=True,
        evicts_itself=True,
    )

    def __init__(self, config: NodeConfig, connection: _Connection) -> None:
        super().__init__(config)
        self._connection: _Connection | None = connection
        self._page_size = connection.page_size
        self._capabilities = dataclasses.replace(
            self.static_capabilities,
            max_value_bytes=connection.capacity,
            details=(
                ("socket", str(config.socket_path)),
                ("service_capacity", format_size(connection.capacity)),
                ("full", "the service evicts its least recently used values"),
            ),
        )
        self._retry_at = 0.0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kvstore-node-copy"
        )

    @classmethod
    async def open(cls, config: NodeConfig) -> Self:
        """Connect to the service; DriverUnavailableError if it is not there."""
        return cls(config, await asyncio.to_thread(_connect, config))

    @property
    def capabilities(self) -> Capabilities:
        """The static flags plus the service's capacity, in ``details``: no hard
        ``capacity_bytes``, since a full service evicts to take a put rather than
        refusing it (a tier of this driver is given its capacity in the config)."""
        return self._capabilities

    def footprint(self, nbytes: int) -> int:
        """Whole pages of the service's arena."""
        return -(-nbytes // self._page_size) * self._page_size

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        """Put in groups of at most half the service's capacity, each reserved,
        written and committed whole, so the service can make room for each."""
        limit = max(1, self._capabilities.max_value_bytes or 0) // 2
        group: list[tuple[bytes, memoryview]] = []
        room = 0
        for key, view in items:
            size = self.footprint(len(view))
            if group and room + size > limit:
                await self._put_group(group)
                group, room = [], 0
            group.append((key, view))
            room += size
        await self._put_group(group)

    async def _put_group(self, items: list[tuple[bytes, memoryview]]) -> None:
        async with self._session() as connection:
            reply = await self._request(
                connection, {"op": "reserve", "items": [[key, len(view)] for key, view in items]}
            )
            pairs: list[CopyPair] = []
            for (_, view), segments in zip(items, reply["rooms"], strict=True):
                value = np.frombuffer(view, dtype=np.uint8)
                pairs.extend(connection.pairs(segments, value, to_arena=True))
            try:
                await self._copy(pairs)
            except BaseException:
                await self._notify(connection, {"op": "abort", "id": reply["id"]})
                raise
            await self._request(connection, {"op": "commit", "id": reply["id"]})

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        async with self._session() as connection:
            reply = await self._request(connection, {"op": "lend", "keys": keys})
            try:
                results: list[memoryview | None] = []
                pairs: list[CopyPair] = []
                for index, lent in enumerate(reply["values"]):
                    if lent is None:
                        results.append(None)
                        continue
                    size, segments = lent
                    target = None if into is None else into[index]
                    if target is not None and size <= len(target):
                        result = target[:size]
                        value = np.frombuffer(result, dtype=np.uint8)
                    else:
                        value = np.empty(size, dtype=np.uint8)
                        result = value.data
                    pairs.extend(connection.pairs(segments, value, to_arena=False))
                    results.append(result)
                await self._copy(pairs)
                return results
            finally:
                await self._notify(connection, {"op": "release", "id": reply["id"]})

    def _borrow_many(
        self, keys: list[bytes]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        return self._loan(keys)

    @contextlib.asynccontextmanager
    async def _loan(self, keys: list[bytes]) -> AsyncIterator[list[memoryview | None]]:
        """Views of the mapped arena for values held in one run; the service keeps
        them intact until the block ends (or the connection does)."""
        async with self._session() as connection:
            reply = await self._request(connection, {"op": "lend", "keys": keys})
            try:
                views: list[memoryview | None] = []
                for lent in reply["values"]:
                    if lent is None or len(lent[1]) > 1:
                        views.append(None)
                        continue
                    size, segments = lent
                    offset = segments[0][0] if segments else 0
                    views.append(connection.arena[offset : offset + size].data.toreadonly())
                yield views
            finally:
                await self._notify(connection, {"op": "release", "id": reply["id"]})

    def _lend_many(
        self, items: list[tuple[bytes, int]]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        return self._room(items)

    @contextlib.asynccontextmanager
    async def _room(self, items: list[tuple[bytes, int]]) -> AsyncIterator[list[memoryview | None]]:
        """Writable views of room the service reserves in its arena, one contiguous
        run a value (``None`` where no free run holds it); committed when the block
        exits normally, aborted (the room freed, nothing published) when it exits
        by an exception. A client that dies meanwhile ends its connection, and
        the service frees the room with it."""
        async with self._session() as connection:
            reply = await self._request(
                connection,
                {"op": "reserve", "items": [list(item) for item in items], "one_run": True},
            )
            rooms: list[memoryview | None] = []
            for (_, size), segments in zip(items, reply["rooms"], strict=True):
                offset = segments[0][0] if segments else 0
                rooms.append(
                    None if segments is None else connection.arena[offset : offset + size].data
                )
            try:
                yield rooms
            except BaseException:
                await self._notify(connection, {"op": "abort", "id": reply["id"]})
                raise
            await self._request(connection, {"op": "commit", "id": reply["id"]})

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        async with self._session() as connection:
            return [
                bool(x) for x in await self._request(connection, {"op": "contains", "keys": keys})
            ]

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        async with self._session() as connection:
            return [
                bool(x) for x in await self._request(connection, {"op": "delete", "keys": keys})
            ]

    async def _list(self) -> AsyncIterator[KeyEntry]:
        async with self._session() as connection:
            entries = await self._request(connection, {"op": "list"})
        for key, size in entries:
            yield KeyEntry(bytes(key), int(size))

    async def _usage(self) -> Usage:
        async with self._session() as connection:
            entries, stored, _ = await self._request(connection, {"op": "usage"})
        return Usage(int(entries), int(stored), None)

    async def node_stats(self) -> dict[str, Any]:
        """The service's counters: sessions, and per tier entries, bytes, hits, misses."""
        self._check_open()
        async with self._session() as connection:
            stats: dict[str, Any] = await self._request(connection, {"op": "stats"})
        return stats

    async def _copy(self, pairs: list[CopyPair]) -> None:
        """Run the copies: inline when small, else on the copy thread. Returns only
        once the thread has stopped, even when cancelled, so room is never aborted
        or a loan released while the thread still copies."""
        if sum(len(destination) for destination, _ in pairs) < OFFLOAD_BYTES:
            _copy_all(pairs)
            return
        future = self._executor.submit(_copy_all, pairs)
        try:
            await asyncio.wrap_future(future)
        finally:
            concurrent.futures.wait([future])

    async def _close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[_Connection]:
        """The live connection, connecting again once ``retry_s`` has passed since
        the last failure; DriverUnavailableError while the service is away."""
        connection = self._connection
        if connection is None or connection.broken:
            if connection is not None:
                connection.close()
                self._connection = None
            if time.monotonic() < self._retry_at:
                raise DriverUnavailableError(
                    f"the node service at {self.config.socket_path} is unreachable",
                    driver=self.name,
                )
            try:
                connection = await asyncio.to_thread(_connect, self.config)
            except DriverUnavailableError:
                self._retry_at = time.monotonic() + self.config.retry_s
                raise
            self._connection = connection
        yield connection

    async def _notify(self, connection: _Connection, message: dict[str, Any]) -> None:
        """Send a request the service does not answer (``UNANSWERED``). On a broken
        connection there is nothing to send: the service ended its room and loans
        when it closed; an interrupted send breaks the connection, to the same end."""
        try:
            async with connection.lock:
                if not connection.broken:
                    await send_message(connection.sock, message)
        except OSError:
            connection.broken = True
        except BaseException:
            connection.broken = True
            raise

    async def _request(self, connection: _Connection, message: dict[str, Any]) -> Any:
        """Send one request and wait for its reply. A connection that fails or whose
        call is interrupted mid-request is dropped (the service then frees what it held)."""
        try:
            async with connection.lock:
                if connection.broken:
                    raise ConnectionClosed("an earlier call on it failed")
                await send_message(connection.sock, message)
                reply = await receive_message(connection.sock)
        except (ConnectionClosed, OSError) as exc:
            connection.broken = True
            raise DriverUnavailableError(
                f"the node service connection was lost: {exc}", driver=self.name
            ) from exc
        except BaseException:
            connection.broken = True
            raise
        if "ok" not in reply:
            raise_reply_error(reply, self.name)
        return reply["ok"]


def _copy_all(pairs: list[CopyPair]) -> None:
    for destination, source in pairs:
        np.copyto(destination, source)
