"""The node service's wire format: small msgpack messages over a Unix stream socket.

A message is a 4-byte little-endian length, then that many bytes of msgpack.
A request is a map with ``op`` and that operation's arguments; a reply is
``{"ok": result}`` or ``{"error": class name, "message": text}`` naming a
class of the closed error taxonomy (``kvstore.errors``). Values never cross
the socket: they move through the shared arena, at the offsets replies give.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

from kvstore import errors
from kvstore.errors import KVStoreError, TransientError

MAX_MESSAGE_BYTES = 256 << 20
"""The largest message either side accepts (a ``list`` of many keys is the largest)."""

_LENGTH = struct.Struct("<I")


class ConnectionClosed(ConnectionError):
    """The other side closed the socket (or died): no more messages will come."""


def frame(message: Any) -> bytes:
    """One message as it goes on the wire: its length, then its msgpack bytes."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


async def send_message(sock: socket.socket, message: Any) -> None:
    """Send one message on a non-blocking socket."""
    await asyncio.get_running_loop().sock_sendall(sock, frame(message))


async def receive_message(sock: socket.socket) -> Any:
    """The next message from a non-blocking socket; ConnectionClosed at its end."""
    (length,) = _LENGTH.unpack(await _receive_exactly(sock, _LENGTH.size))
    if length > MAX_MESSAGE_BYTES:
        raise ConnectionClosed(f"a message of {length} bytes is over the limit")
    return msgpack.unpackb(await _receive_exactly(sock, length), raw=False)


async def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = await loop.sock_recv_into(sock, view[received:])
        if not count:
            raise ConnectionClosed("the connection was closed")
        received += count
    return bytes(buffer)


def error_reply(exc: KVStoreError) -> dict[str, str]:
    """The reply that carries ``exc`` to the client."""
    return {"error": type(exc).__name__, "message": exc.message}


def raise_reply_error(reply: dict[str, Any], driver: str) -> None:
    """Raise the error a reply carries as the same taxonomy class (a name the
    client does not know is a TransientError)."""
    cls = getattr(errors, str(reply.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, KVStoreError)):
        cls = TransientError
    raise cls(f"node service: {reply.get('message', '')}", driver=driver)
