"""Who may use the node service: the socket's place and mode, and peer credentials.

The socket is created owner-only (0600), or 0660 with a group, and every
connection's peer is checked with ``SO_PEERCRED``: the kernel's word for the
uid and gid of the process at the other end, which it cannot forge. A peer is
served when its uid is the service's, or it belongs to the configured group.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import ConfigError

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a Unix socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/kvstore/node.sock``, else ``/run/kvstore/node.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime or "/run") / "kvstore" / "node.sock"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of the peer of a connected Unix socket (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def group_id(group: str | int) -> int:
    """The gid of a group name or number; ConfigError if there is no such group."""
    try:
        return grp.getgrgid(group).gr_gid if isinstance(group, int) else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"no group {group!r} on this host") from None


def peer_allowed(peer: PeerCredentials, owner_uid: int, group_gid: int | None) -> bool:
    """Whether the service (run by ``owner_uid``) serves ``peer``: the same uid, or
    a member of ``group_gid`` (its primary group or a supplementary one)."""
    if peer.uid == owner_uid:
        return True
    if group_gid is None:
        return False
    if peer.gid == group_gid:
        return True
    try:
        return pwd.getpwuid(peer.uid).pw_name in grp.getgrgid(group_gid).gr_mem
    except KeyError:
        return False


def listening_socket(path: Path, group_gid: int | None) -> socket.socket:
    """A non-blocking Unix socket listening at ``path``: mode 0600, or 0660 owned
    by ``group_gid``. Its directory is made (0700, or 0750 for a group); a stale
    socket file left by a service that died is replaced."""
    path.parent.mkdir(mode=0o750 if group_gid is not None else 0o700, parents=True, exist_ok=True)
    if path.is_socket():
        if _answers(path):
            raise ConfigError(f"a node service is already serving {path}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        previous = os.umask(0o177 if group_gid is None else 0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous)
        if group_gid is not None:
            os.chown(path, -1, group_gid)
            os.chmod(path, 0o660)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc}") from exc
    return sock


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
