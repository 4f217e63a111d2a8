"""redis-py clients for the redis driver and the translation of their errors.

Two things here are not redis-py defaults, both on purpose:

- The command packer. With hiredis installed redis-py packs every command
  with ``hiredis.pack_command``, which first turns memoryview arguments into
  ``bytes`` and then joins everything into one buffer: two copies of every
  value written. Its pure-Python packer sends a memoryview argument as it is
  (``sendall`` straight from the caller's memory), so connections here use
  that packer; replies are still parsed by hiredis.
- Retries. A command is retried once without delay after a connection error,
  which is what a pooled connection needs after the server restarted, and no
  more, so a dead server fails a call within about one timeout.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.exceptions as rx
from redis._parsers import Encoder
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import Connection, PythonRespSerializer, SSLConnection
from redis.retry import Retry

from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverTimeoutError,
    DriverUnavailableError,
    IntegrityError,
    KVStoreError,
    TransientError,
)

from .config import RedisConfig

READ_CHUNK_BYTES = 1 << 20
"""Bytes per ``recv`` when reading replies (redis-py reads 32 KiB by default, which
costs a Python-level loop turn per 32 KiB of a multi-MiB value)."""

_BUFFER_CUTOFF = 6000
"""Arguments longer than this are sent as separate buffers (redis-py's own cutoff)."""

_STAGING_EXPIRED = "KVSTORE_STAGING_EXPIRED"

Client = redis.Redis | RedisCluster


def connection_class(tls_options: dict[str, Any] | None) -> type[Connection]:
    """A Connection class that packs commands without copying large arguments, over
    TLS with ``tls_options`` (redis-py's ``ssl_*`` keyword arguments) when given.

    The TLS options are bound into the class because redis-py's cluster client
    forwards ``ssl_*`` options to its nodes only together with its own
    ``SSLConnection`` class."""
    encoder = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]
    packer = PythonRespSerializer(_BUFFER_CUTOFF, encoder.encode)
    if tls_options is None:

        class ZeroCopyConnection(Connection):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**{"command_packer": packer, **kwargs})  # type: ignore[no-untyped-call]

        return ZeroCopyConnection

    bound = dict(tls_options)

    class ZeroCopyTLSConnection(SSLConnection):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{"command_packer": packer, **bound, **kwargs})

    return ZeroCopyTLSConnection


def make_client(
    *,
    host: str,
    port: int,
    db: int,
    username: str | None,
    password: str | None,
    timeout: float,
    connect_timeout: float,
    max_connections: int,
    cluster: bool,
    tls_options: dict[str, Any] | None,
) -> Client:
    """A connected standalone or cluster client; raises redis-py's errors."""
    options: dict[str, Any] = {
        "username": username,
        "password": password,
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "socket_read_size": READ_CHUNK_BYTES,
        "connection_class": connection_class(tls_options),
        "retry": Retry(NoBackoff(), 1),
        "client_name": "kvstore",
    }
    if cluster:
        # Only a cluster client built from a URL builds its nodes' pools with our
        # connection class (otherwise it drops ``connection_class``); the URL carries
        # nothing but the startup node.
        node = f"[{host}]" if ":" in host else host
        return RedisCluster(
            url=f"redis://{node}:{port}",
            max_connections=max_connections,
            require_full_coverage=False,
            **options,
        )
    pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
        host=host, port=port, db=db, max_connections=max_connections, timeout=timeout, **options
    )
    standalone = redis.Redis(connection_pool=pool)
    try:
        standalone.ping()
    except BaseException:
        standalone.close()
        raise
    return standalone


def translate(exc: Exception, driver: str, server: str) -> KVStoreError | None:
    """The kvstore error for a redis-py (or socket) error; ``None`` for other exceptions.

    ``server`` names the server for messages; it never holds credentials."""
    if isinstance(exc, KVStoreError) or not isinstance(
        exc, (rx.RedisError, rx.RedisClusterException, OSError)
    ):
        return None
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)):
        return ConfigError(f"{server} refused the credentials ({detail})", driver=driver)
    if isinstance(exc, (rx.NoPermissionError, rx.AuthorizationError)):
        return ConfigError(f"{server} denied a command to this user ({detail})", driver=driver)
    if isinstance(exc, rx.TimeoutError):
        return DriverTimeoutError(f"{server} did not answer in time ({detail})", driver=driver)
    if isinstance(exc, rx.BusyLoadingError):
        return TransientError(f"{server} is loading its dataset ({detail})", driver=driver)
    if isinstance(exc, rx.MaxConnectionsError):
        return TransientError(f"no free connection to {server} ({detail})", driver=driver)
    if isinstance(exc, (rx.ConnectionError, OSError)):
        return DriverUnavailableError(f"cannot reach {server} ({detail})", driver=driver)
    if isinstance(exc, rx.OutOfMemoryError):
        return CapacityError(f"{server} is out of memory ({detail})", driver=driver)
    if isinstance(exc, (rx.ClusterDownError, rx.TryAgainError, rx.ReadOnlyError)):
        return TransientError(f"{server} cannot serve this now ({detail})", driver=driver)
    if isinstance(exc, rx.ResponseError) and _STAGING_EXPIRED in str(exc):
        return TransientError(f"a put took too long: {exc}", driver=driver)
    if isinstance(exc, rx.ResponseError) and "WRONGTYPE" in str(exc):
        return IntegrityError(
            f"a key under this prefix holds data that is not kvstore's ({detail})", driver=driver
        )
    return DriverUnavailableError(f"{server} failed a request ({detail})", driver=driver)


def client_for(config: RedisConfig) -> Client:
    """The redis-py client ``config`` describes (blocking: it connects and authenticates)."""
    return make_client(
        host=config.host,
        port=config.port,
        db=config.db,
        username=config.username,
        password=config.resolved_password(),
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
        max_connections=config.max_connections,
        cluster=config.cluster,
        tls_options=config.tls_options(),
    )
