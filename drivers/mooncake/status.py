"""The status codes the Mooncake store client returns, sorted into what they mean to kvstore.

Every call of ``MooncakeDistributedStore`` answers with an int: a byte count or
0 on success, a negative ``ErrorCode`` (mooncake-store ``types.h``) on failure.
The driver turns each code into a result (a miss, a retry) or one of the typed
errors of ``kvstore.errors``; no raw code reaches a caller.
"""

from __future__ import annotations

from kvstore.errors import DriverUnavailableError, KVStoreError, TransientError

OK = 0
INTERNAL_ERROR = -1
BUFFER_OVERFLOW = -10
SEGMENT_NOT_FOUND = -101
CLIENT_NOT_FOUND = -103
NO_AVAILABLE_HANDLE = -200
INVALID_KEY = -400
INVALID_PARAMS = -600
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
LEASE_EXPIRED = -707
OBJECT_HAS_REPLICATION_TASK = -708
REPLICA_NOT_FOUND = -710
REPLICA_IS_GONE = -712
OBJECT_REPLICA_BUSY = -714
TRANSFER_FAIL = -800
RPC_FAIL = -900
RPC_TIMEOUT = -901

NAMES: dict[int, str] = {
    INTERNAL_ERROR: "INTERNAL_ERROR",
    BUFFER_OVERFLOW: "BUFFER_OVERFLOW",
    SEGMENT_NOT_FOUND: "SEGMENT_NOT_FOUND",
    CLIENT_NOT_FOUND: "CLIENT_NOT_FOUND",
    NO_AVAILABLE_HANDLE: "NO_AVAILABLE_HANDLE",
    INVALID_KEY: "INVALID_KEY",
    INVALID_PARAMS: "INVALID_PARAMS",
    REPLICA_IS_NOT_READY: "REPLICA_IS_NOT_READY",
    OBJECT_NOT_FOUND: "OBJECT_NOT_FOUND",
    OBJECT_ALREADY_EXISTS: "OBJECT_ALREADY_EXISTS",
    OBJECT_HAS_LEASE: "OBJECT_HAS_LEASE",
    LEASE_EXPIRED: "LEASE_EXPIRED",
    OBJECT_HAS_REPLICATION_TASK: "OBJECT_HAS_REPLICATION_TASK",
    REPLICA_NOT_FOUND: "REPLICA_NOT_FOUND",
    REPLICA_IS_GONE: "REPLICA_IS_GONE",
    OBJECT_REPLICA_BUSY: "OBJECT_REPLICA_BUSY",
    TRANSFER_FAIL: "TRANSFER_FAIL",
    RPC_FAIL: "RPC_FAIL",
    RPC_TIMEOUT: "RPC_TIMEOUT",
}

ABSENT = frozenset({OBJECT_NOT_FOUND, REPLICA_IS_NOT_READY, REPLICA_NOT_FOUND, REPLICA_IS_GONE})
"""A read finds no complete value: never written, deleted, evicted, or mid-write."""

RETRY = frozenset({LEASE_EXPIRED, OBJECT_REPLICA_BUSY, OBJECT_HAS_REPLICATION_TASK})
"""Worth repeating at once: a read outlived its lease, or readers or a copy task
hold the object a write wants to replace."""

UNREACHABLE = frozenset({RPC_FAIL, RPC_TIMEOUT})
"""The master cannot be reached."""

NO_ROOM = frozenset({NO_AVAILABLE_HANDLE, SEGMENT_NOT_FOUND, CLIENT_NOT_FOUND, BUFFER_OVERFLOW})
"""No segment can take the value now: the mounted memory is full of leased
objects, or the master has not (yet) seen this client's segment, as right after
it restarted."""


def name(code: int) -> str:
    """The ``ErrorCode`` name of ``code`` for messages, e.g. ``RPC_FAIL (-900)``."""
    return f"{NAMES.get(code, 'error')} ({code})"


def failure(code: int, what: str, *, master: str, driver: str) -> KVStoreError:
    """The typed error for a call that ended with the negative ``code``."""
    if code in UNREACHABLE:
        return DriverUnavailableError(
            f"{what}: the Mooncake master at {master} cannot be reached: {name(code)}",
            driver=driver,
        )
    if code in NO_ROOM:
        return TransientError(
            f"{what}: no Mooncake segment has room for it now ({name(code)}); the master "
            "evicts unleased objects past its high watermark, and remounts segments "
            "after a restart",
            driver=driver,
        )
    return TransientError(f"{what} failed: {name(code)}", driver=driver)
