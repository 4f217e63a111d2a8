"""The node service: one store per host, lent to every process through shared memory.

``NodeService`` holds an ``AsyncKVStore`` opened from the usual config; its
first tier is a ``cpu://?shared=true`` arena whose memfd every client maps.
Each connection is a session: a writer reserves room (``reserve``), writes
the values into the arena through its own mapping, then ``commit``s (or
``abort``s); a reader borrows values (``lend``: their offsets, kept intact
until ``release``) and copies or verifies them in place. Room is made in the
first tier's ledger (the store's ``Tier``) by the store's own placement code,
so capacity, eviction order, pins and write-back are the in-process store's.
A session's reservations and loans end with its connection, so a client that
dies at any instant leaves no room taken and nothing half-written visible:
uncommitted room is never published.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.config import StoreConfig
from kvstore.driver import check_keys
from kvstore.drivers.cpu.driver import ArenaEntry, CpuDriver
from kvstore.errors import (
    CapacityError,
    ConfigError,
    InternalError,
    InvalidArgumentError,
    KVStoreError,
    PermissionDeniedError,
)
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.node.access import listening_socket, peer_allowed, peer_credentials
from kvstore.node.protocol import (
    ConnectionClosed,
    error_reply,
    frame,
    receive_message,
    send_message,
)
from kvstore.store import AsyncKVStore
from kvstore.tier import Tier

log = logging.getLogger(__name__)

_SERVICE_MODEL = "kvstore-node"
"""The namespace model of the service's own store: clients bring storage keys
already tagged with their tenant and namespace, so this one is never used to
make keys."""


UNANSWERED = frozenset({"release", "abort"})
"""Operations the service sends no reply to: nothing can fail that the client
could act on, so it need not wait a round trip."""


@dataclass
class _Reservation:
    keys: list[bytes]
    sizes: list[int]
    entries: list[ArenaEntry | None]
    cost: int


@dataclass
class _Loan:
    """Lent entries, and the tier's borrow of them: the store's ledger counts their
    keys as being read (never evicted as victims, their room kept) until the end."""

    entries: list[ArenaEntry | None]
    ledger: contextlib.AsyncExitStack

    async def end(self, arena: CpuDriver) -> None:
        arena.end_loan(self.entries)
        await self.ledger.aclose()


@dataclass(eq=False)
class _Session:
    """One client connection's reservations and loans, ended with it."""

    reservations: dict[int, _Reservation] = field(default_factory=dict)
    loans: dict[int, _Loan] = field(default_factory=dict)


class NodeService:
    """A store serving its first tier, a shared cpu arena, to local processes."""

    def __init__(self, store: AsyncKVStore, *, group_gid: int | None = None) -> None:
        tier = store.tiers[0]
        arena = tier.driver
        if not isinstance(arena, CpuDriver) or arena.shared_memory is None:
            raise ConfigError(
                "the node service's first tier must be a shared cpu arena "
                "(cpu://?capacity=...&shared=true)"
            )
        self.store = store
        self.tier: Tier = tier
        self.arena: CpuDriver = arena
        self.group_gid = group_gid
        self._ids = itertools.count(1)
        self._sessions: set[_Session] = set()

    @classmethod
    async def open(cls, config: StoreConfig, *, group_gid: int | None = None) -> NodeService:
        """Open the store of ``config`` (every tier) and serve its shared first tier."""
        layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1)
        namespace = Namespace(
            model=_SERVICE_MODEL,
            revision="",
            layout=layout,
            chunk_tokens=config.chunk_tokens,
            tenant=config.tenant,
        )
        store = await AsyncKVStore.open(config, namespace)
        try:
            return cls(store, group_gid=group_gid)
        except BaseException:
            await store.close()
            raise

    async def close(self) -> None:
        await self.store.close()

    async def serve(self, path: Path, ready: Callable[[], None] | None = None) -> None:
        """Accept connections on the Unix socket at ``path`` until cancelled."""
        listener = listening_socket(path, self.group_gid)
        loop = asyncio.get_running_loop()
        connections: set[asyncio.Task[None]] = set()
        try:
            if ready is not None:
                ready()
            while True:
                conn, _ = await loop.sock_accept(listener)
                conn.setblocking(False)
                task = asyncio.create_task(self._serve_connection(conn))
                connections.add(task)
                task.add_done_callback(connections.discard)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _serve_connection(self, conn: socket.socket) -> None:
        session = _Session()
        self._sessions.add(session)
        try:
            peer = peer_credentials(conn)
            if not peer_allowed(peer, os.getuid(), self.group_gid):
                log.warning("refused a connection from uid %d (pid %d)", peer.uid, peer.pid)
                denied = PermissionDeniedError(f"uid {peer.uid} may not use this node service")
                await send_message(conn, error_reply(denied))
                return
            self._greet(conn)
            while True:
                request = await receive_message(conn)
                reply = await self._answer(session, request)
                if not (isinstance(request, dict) and request.get("op") in UNANSWERED):
                    await send_message(conn, reply)
        except (ConnectionClosed, OSError):
            pass
        except Exception:
            log.exception("node service: a session failed")
        finally:
            await self._end(session)
            self._sessions.discard(session)
            conn.close()

    def _greet(self, conn: socket.socket) -> None:
        """Send the arena's descriptor and geometry, the first message of a session."""
        fd = self.arena.shared_memory
        assert fd is not None
        hello = {
            "ok": {
                "arena_bytes": self.arena.config.capacity,
                "page_size": self.arena.config.page_size,
                "capacity": self.tier.capacity,
            }
        }
        conn.setblocking(True)
        try:
            socket.send_fds(conn, [frame(hello)], [fd])
        finally:
            conn.setblocking(False)

    async def _answer(self, session: _Session, request: Any) -> dict[str, Any]:
        try:
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise InvalidArgumentError("a request is a map with an 'op'")
            handler = getattr(self, "_op_" + request["op"], None)
            if handler is None:
                raise InvalidArgumentError(f"unknown operation {request['op']!r}")
            return {"ok": await handler(session, request)}
        except KVStoreError as exc:
            return error_reply(exc)
        except (KeyError, TypeError, ValueError) as exc:
            return error_reply(InvalidArgumentError(f"malformed request: {exc!r}"))
        except Exception as exc:
            log.exception("node service: %s failed", request.get("op"))
            return error_reply(InternalError(f"{type(exc).__name__}: {exc}"))

    async def _end(self, session: _Session) -> None:
        """Free what a closed connection held: its room and its loans."""
        for reservation in session.reservations.values():
            self._unreserve(reservation)
            self.arena.abort_room(reservation.entries)
        session.reservations.clear()
        loans = list(session.loans.values())
        session.loans.clear()
        for loan in loans:
            await loan.end(self.arena)

    # ------------------------------------------------------------- operations

    async def _op_reserve(self, session: _Session, request: dict[str, Any]) -> dict[str, Any]:
        keys = [bytes(key) for key, _ in request["items"]]
        sizes = [int(size) for _, size in request["items"]]
        check_keys(keys, self.arena.name)
        if any(size < 0 for size in sizes):
            raise InvalidArgumentError("sizes must not be negative")
        cost = sum(self.tier.footprint(size) for size in sizes)
        await self._make_room(cost)
        try:
            entries = self.arena.reserve_room(
                list(zip(keys, sizes)), one_run=bool(request.get("one_run", False))
            )
        except BaseException:
            self.tier.reserved -= cost
            raise
        reservation_id = next(self._ids)
        session.reservations[reservation_id] = _Reservation(keys, sizes, entries, cost)
        rooms = [None if entry is None else entry.segments for entry in entries]
        return {"id": reservation_id, "rooms": rooms}

    async def _op_commit(self, session: _Session, request: dict[str, Any]) -> None:
        reservation = session.reservations.pop(int(request["id"]))
        self.arena.commit_room(reservation.keys, reservation.entries)
        self._unreserve(reservation)
        committed = [
            (key, size)
            for key, size, entry in zip(reservation.keys, reservation.sizes, reservation.entries)
            if entry is not None
        ]
        for key, size in committed:
            self.tier.record(key, self.tier.footprint(size))
        self.tier.stats.chunks_written += len(committed)
        self.tier.stats.bytes_written += sum(size for _, size in committed)
        await self.store.write_through_held([key for key, _ in committed])

    async def _op_abort(self, session: _Session, request: dict[str, Any]) -> None:
        reservation = session.reservations.pop(int(request["id"]), None)
        if reservation is not None:
            self._unreserve(reservation)
            self.arena.abort_room(reservation.entries)

    async def _op_lend(self, session: _Session, request: dict[str, Any]) -> dict[str, Any]:
        keys = self._keys(request)
        ledger = contextlib.AsyncExitStack()
        await ledger.enter_async_context(self.tier.borrow(keys))
        try:
            # Borrowed first, so promoting the absent keys evicts none of the others.
            held = await self.arena.contains_many(keys)
            await self._promote([key for key, there in zip(keys, held) if not there])
            entries = self.arena.lend(keys)
        except BaseException:
            await ledger.aclose()
            raise
        loan_id = next(self._ids)
        session.loans[loan_id] = _Loan(entries, ledger)
        for key, entry in zip(keys, entries):
            if entry is None:
                self.tier.stats.misses += 1
            else:
                self.tier.stats.hits += 1
                self.tier.stats.bytes_read += entry.size
                if key in self.tier.index:
                    self.tier.index.touch(key)
        values = [None if e is None else [e.size, e.segments] for e in entries]
        return {"id": loan_id, "values": values}

    async def _op_release(self, session: _Session, request: dict[str, Any]) -> None:
        loan = session.loans.pop(int(request["id"]), None)
        if loan is not None:
            await loan.end(self.arena)

    async def _op_contains(self, session: _Session, request: dict[str, Any]) -> list[bool]:
        """Held in the first tier, or in a tier below (a ``lend`` promotes it)."""
        keys = self._keys(request)
        held: list[bool] = await self.arena.contains_many(keys)
        for tier in self.store.tiers[1:]:
            absent = [key for key, there in zip(keys, held) if not there]
            if not absent:
                break
            found = set(await self._held_in(tier, absent))
            held = [there or key in found for key, there in zip(keys, held)]
        return held

    async def _op_delete(self, session: _Session, request: dict[str, Any]) -> list[bool]:
        """Delete from every tier; ``True`` where some tier held the key."""
        keys = self._keys(request)
        deleted = [False] * len(keys)
        for tier in self.store.tiers:
            try:
                done = await tier.delete(keys)
            except KVStoreError:
                if tier.position == 0:
                    raise
                continue
            deleted = [a or b for a, b in zip(deleted, done)]
        return deleted

    async def _op_list(self, session: _Session, request: dict[str, Any]) -> list[list[Any]]:
        return [[entry.key, entry.size] async for entry in self.arena.list()]

    async def _op_usage(self, session: _Session, request: dict[str, Any]) -> list[int]:
        usage = await self.arena.usage()
        return [usage.entries, usage.bytes, self.tier.capacity]

    async def _op_health(self, session: _Session, request: dict[str, Any]) -> list[dict[str, Any]]:
        return [dataclasses.asdict(health) for health in await self.store.health()]

    async def _op_stats(self, session: _Session, request: dict[str, Any]) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "sessions": len(self._sessions),
            "reserved_bytes": self.tier.reserved,
            "free_bytes": self.arena.free_bytes,
            "pinned_chunks": stats.pinned_chunks,
            "tiers": [
                {
                    "name": tier.name,
                    "entries": tier.entries,
                    "used_bytes": tier.used_bytes,
                    "capacity_bytes": tier.capacity_bytes,
                    "up": tier.up,
                    "hits": tier.stats.hits,
                    "misses": tier.stats.misses,
                    "evictions": tier.stats.evictions,
                    "chunks_written": tier.stats.chunks_written,
                }
                for tier in stats.tiers
            ],
        }

    # ------------------------------------------------------------------ room

    async def _make_room(self, cost: int) -> None:
        """Reserve ``cost`` bytes in the first tier through the store's own placement:
        it evicts in the tier's policy order, skips pinned and borrowed chunks, and
        hands write-back chunks down to the tier below; CapacityError if it cannot."""
        if not await self.store.reserve(self.tier, cost):
            raise CapacityError(
                f"{cost} bytes do not fit in the node tier of {self.tier.capacity} bytes",
                driver=self.arena.name,
            )

    async def _held_in(self, tier: Tier, keys: list[bytes]) -> list[bytes]:
        """The ``keys`` a tier below the first holds: by its index, and for a shared
        tier also by asking it; none while it is down or failing."""
        if tier.down is not None:
            return []
        held = [key for key in keys if key in tier.index]
        others = [key for key in keys if key not in tier.index]
        if tier.shared and others:
            try:
                there = await tier.call("contains_many", tier.driver.contains_many(others))
            except KVStoreError:
                return held
            held += [key for key, yes in zip(others, there) if yes]
        return held

    async def _promote(self, keys: list[bytes]) -> None:
        """Copy values of ``keys`` found in the tiers below into the first tier,
        fastest tier first, so they can be lent. The chunks are self-describing
        (codec stack in their header) and clients verify them as they read."""
        for tier in self.store.tiers[1:]:
            wanted = await self._held_in(tier, keys) if keys else []
            if not wanted:
                continue
            try:
                values = await tier.call("get_many", tier.driver.get_many(wanted))
            except KVStoreError:
                continue
            found = [(key, value) for key, value in zip(wanted, values) if value is not None]
            tier.stats.hits += len(found)
            tier.stats.misses += len(wanted) - len(found)
            if not found:
                continue
            cost = sum(self.tier.footprint(len(value)) for _, value in found)
            try:
                await self._make_room(cost)
            except CapacityError:
                return
            try:
                await self.arena.put_many(found)
            except KVStoreError:
                return
            finally:
                self.tier.reserved -= cost
            for key, value in found:
                self.tier.record(key, self.tier.footprint(len(value)))
            promoted = {key for key, _ in found}
            keys = [key for key in keys if key not in promoted]

    def _unreserve(self, reservation: _Reservation) -> None:
        self.tier.reserved -= reservation.cost

    def _keys(self, request: dict[str, Any]) -> list[bytes]:
        keys = [bytes(key) for key in request["keys"]]
        check_keys(keys, self.arena.name)
        return keys
