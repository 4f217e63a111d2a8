"""The driver protocol: one small async, bulk-first class every tier implements.

A driver maps keys (short byte strings) to values (byte buffers). It knows
nothing of tokens, tensors or chunk formats: that is the store's job. The
public methods below validate their arguments, refuse calls on a closed
driver, and delegate to the ``_``-prefixed methods a driver author writes, so
every driver gets the same argument checks and the same typed errors.

A miss is ``None`` from ``get_many`` and ``False`` from ``contains_many``;
it is never an exception.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar, Generic, TypeVar

from typing_extensions import Buffer, Self

from kvstore.config_url import DriverConfig
from kvstore.errors import DriverClosedError, InvalidArgumentError, InvalidKeyError

MAX_KEY_BYTES = 256
"""The longest key a driver must accept. The store's chunk keys are 32 bytes."""


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; the store and the conformance suite read these.

    persistent: values survive ``close`` and a fresh ``open`` of the same config.
    listable: ``list`` enumerates every stored key.
    zero_copy: ``get_many(into=...)`` writes straight into the caller's buffers
        with no intermediate copy.
    lends_views: ``borrow_many`` lends read-only views of values held in this
        process's memory, so a reader verifies and copies them with no staging copy.
    lends_room: ``lend_many`` lends writable room in this process's memory, so a
        writer encodes a value straight into the driver's storage; the value
        becomes visible when the loan commits.
    in_process: values live in this process's memory and only this process
        writes them: they never cross a process or device boundary, so a
        reader need not re-verify what it wrote (a tier's ``verify`` defaults
        to off on such a driver, and stays mandatory on every other one).
    shared: other processes or machines may write the same keys, so a
        store's own index of this tier is not the whole truth.
    max_value_bytes: the largest value ``put_many`` accepts (``None``: no limit
        short of capacity).
    capacity_bytes: a hard limit on the bytes values occupy (their ``footprint``);
        a put past it raises ``CapacityError`` (``None``: bounded only by the
        backing service).
    evicts_itself: the backing service makes room on its own when it is full
        (the node service evicts its least recently used values), so a store
        needs no ``max_bytes`` for the tier and never evicts from it.
    details: driver-specific facts for people, e.g. how memory is pinned.
    """

    persistent: bool
    listable: bool
    zero_copy: bool = False
    lends_views: bool = False
    lends_room: bool = False
    in_process: bool = False
    shared: bool = False
    max_value_bytes: int | None = None
    capacity_bytes: int | None = None
    evicts_itself: bool = False
    details: tuple[tuple[str, str], ...] = field(default=())

    def summary(self) -> list[str]:
        """Short labels for people: the true flags and the limits."""
        labels = [
            name
            for name in (
                "persistent",
                "listable",
                "zero_copy",
                "lends_views",
                "lends_room",
                "in_process",
                "shared",
                "evicts_itself",
            )
            if getattr(self, name)
        ]
        if self.max_value_bytes is not None:
            labels.append(f"max_value={self.max_value_bytes}")
        if self.capacity_bytes is not None:
            labels.append(f"capacity={self.capacity_bytes}")
        labels.extend(f"{name}={value}" for name, value in self.details)
        return labels

    def detail(self, name: str) -> str | None:
        """The value of one entry of ``details``, or ``None``."""
        return dict(self.details).get(name)


@dataclass(frozen=True)
class KeyEntry:
    """One stored key and the size of its value in bytes, as ``list`` yields it."""

    key: bytes
    size: int


@dataclass(frozen=True)
class Usage:
    """How much a driver holds: entries, bytes of values, and its hard capacity."""

    entries: int
    bytes: int
    capacity_bytes: int | None


ConfigT = TypeVar("ConfigT", bound=DriverConfig)


def check_keys(keys: Sequence[bytes], driver: str) -> None:
    """Raise InvalidKeyError unless every key is non-empty bytes within MAX_KEY_BYTES."""
    if isinstance(keys, (bytes, bytearray, str)):
        raise InvalidArgumentError("expected a sequence of keys, got a single key", driver=driver)
    for key in keys:
        if type(key) is not bytes:
            raise InvalidKeyError(f"keys must be bytes, got {type(key).__name__}", driver=driver)
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"keys must be 1 to {MAX_KEY_BYTES} bytes long, got {len(key)}", driver=driver
            )


def as_byte_view(value: object, driver: str) -> memoryview:
    """A flat, read-only byte view of a buffer, or InvalidArgumentError."""
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(
            f"values must be bytes-like buffers, got {type(value).__name__}", driver=driver
        ) from None
    if not view.contiguous:
        raise InvalidArgumentError("values must be contiguous buffers", driver=driver)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class Driver(abc.ABC, Generic[ConfigT]):
    """Base class of every kvstore driver.

    Open one with ``await DriverClass.open(config)`` (or through the registry
    from a URL); close it with ``await driver.close()`` or ``async with``.
    Subclasses set ``config_type`` and implement the ``_``-prefixed methods;
    they may assume arguments were validated.
    """

    config_type: ClassVar[type[DriverConfig]]
    static_capabilities: ClassVar[Capabilities]
    """What every instance can do, whatever its config (shown by ``kvstore drivers``)."""

    def __init__(self, config: ConfigT) -> None:
        self.config = config
        self._closed = False

    @property
    def name(self) -> str:
        """The driver's scheme, used in errors and reports."""
        return self.config.scheme

    @classmethod
    @abc.abstractmethod
    async def open(cls, config: ConfigT) -> Self:
        """Connect to or create the backing storage described by ``config``."""

    @property
    def capabilities(self) -> Capabilities:
        """What this driver can do, constant for its lifetime; drivers whose
        capabilities depend on the config or the machine override this."""
        return self.static_capabilities

    @property
    def closed(self) -> bool:
        return self._closed

    def footprint(self, nbytes: int) -> int:
        """Bytes a value of ``nbytes`` bytes occupies in this driver, pages, headers
        and padding included: the unit of ``capacity_bytes`` and of the store's
        capacity ledger. Never less than ``nbytes`` and never shrinking as
        ``nbytes`` grows; exact, so values whose footprints add up to at most
        ``capacity_bytes`` always fit. The default, ``nbytes``, suits drivers that
        store a value as its bytes; drivers that round or add a header override it.
        """
        return nbytes

    async def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        """Store each value under its key, replacing what was there.

        A batch that fails may have stored some of its items, never a partial
        value: a reader sees either the old value, the new one, or a miss.
        """
        self._check_open()
        if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], bytes):
            raise InvalidArgumentError(
                "put_many takes a sequence of (key, value) pairs, got a single pair",
                driver=self.name,
            )
        try:
            pairs = [(key, as_byte_view(value, self.name)) for key, value in items]
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InvalidArgumentError):
                raise
            raise InvalidArgumentError(
                f"put_many takes a sequence of (key, value) pairs: {exc}", driver=self.name
            ) from None
        check_keys([key for key, _ in pairs], self.name)
        if pairs:
            await self._put_many(pairs)

    async def get_many(
        self, keys: Sequence[bytes], into: Sequence[Buffer | None] | None = None
    ) -> list[memoryview | None]:
        """The value of each key, in order, or ``None`` where the key is absent.

        When ``into`` is given, ``into[i]`` is a writable buffer for the value of
        ``keys[i]``: a value that fits is written there and returned as a view of
        that buffer (its first ``len(value)`` bytes); one that does not fit is
        returned in a new buffer.
        """
        self._check_open()
        check_keys(keys, self.name)
        targets: list[memoryview | None] | None = None
        if into is not None:
            if len(into) != len(keys):
                raise InvalidArgumentError(
                    f"into has {len(into)} buffers for {len(keys)} keys", driver=self.name
                )
            targets = [None if buf is None else _writable_view(buf, self.name) for buf in into]
        if not keys:
            return []
        return await self._get_many(list(keys), targets)

    def borrow_many(
        self, keys: Sequence[bytes]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        """Read-only views of the values of ``keys``, valid inside ``async with``.

        ``None`` where a value is not lent (absent, or not held as one
        contiguous piece of this process's memory): read those with
        ``get_many``. Drivers that declare ``lends_views`` keep lent values
        intact until the block exits, whatever is written or deleted meanwhile;
        the views must not be used after it. The default lends nothing.
        """
        self._check_open()
        check_keys(keys, self.name)
        return self._borrow_many(list(keys))

    def lend_many(
        self, items: Sequence[tuple[bytes, int]]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        """Writable room for a value of each ``(key, size)``, valid inside ``async with``.

        The caller writes each value whole into its room. When the block exits
        normally every lent room is committed at once, as ``put_many`` would
        store it (replacing what was there); when it exits by an exception
        (cancellation included) nothing is committed and the room is freed.
        Until the commit no reader sees a lent value: a key reads as its old
        value, or a miss. ``None`` where no room is lent (drivers without
        ``lends_room``, or no contiguous room free): store those with
        ``put_many``. Raises ``CapacityError`` like ``put_many`` when the values
        cannot fit. The rooms must not be used after the block.
        """
        self._check_open()
        check_keys([key for key, _ in items], self.name)
        for _, size in items:
            if type(size) is not int or size < 0:
                raise InvalidArgumentError(
                    f"lend_many takes (key, size) pairs with sizes >= 0, got {size!r}",
                    driver=self.name,
                )
        return self._lend_many(list(items))

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key holds a value, in order."""
        self._check_open()
        check_keys(keys, self.name)
        return await self._contains_many(list(keys)) if keys else []

    async def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Delete each key; ``True`` where a value was there."""
        self._check_open()
        check_keys(keys, self.name)
        return await self._delete_many(list(keys)) if keys else []

    async def list(self) -> AsyncIterator[KeyEntry]:
        """Every stored key with its value's size, in no particular order."""
        self._check_open()
        async for entry in self._list():
            yield entry

    async def usage(self) -> Usage:
        """Entries and bytes stored, and the hard capacity if any."""
        self._check_open()
        return await self._usage()

    async def close(self) -> None:
        """Release connections, files and memory; later calls raise DriverClosedError."""
        if not self._closed:
            self._closed = True
            await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.redacted_url()}>"

    def _check_open(self) -> None:
        if self._closed:
            raise DriverClosedError("the driver is closed", driver=self.name)

    @abc.abstractmethod
    async def _put_many(self, items: builtins.list[tuple[bytes, memoryview]]) -> None: ...

    @abc.abstractmethod
    async def _get_many(
        self, keys: builtins.list[bytes], into: builtins.list[memoryview | None] | None
    ) -> builtins.list[memoryview | None]: ...

    def _borrow_many(
        self, keys: builtins.list[bytes]
    ) -> AbstractAsyncContextManager[builtins.list[memoryview | None]]:
        nothing: builtins.list[memoryview | None] = [None] * len(keys)
        return contextlib.nullcontext(nothing)

    def _lend_many(
        self, items: builtins.list[tuple[bytes, int]]
    ) -> AbstractAsyncContextManager[builtins.list[memoryview | None]]:
        nothing: builtins.list[memoryview | None] = [None] * len(items)
        return contextlib.nullcontext(nothing)

    @abc.abstractmethod
    async def _contains_many(self, keys: builtins.list[bytes]) -> builtins.list[bool]: ...

    @abc.abstractmethod
    async def _delete_many(self, keys: builtins.list[bytes]) -> builtins.list[bool]: ...

    @abc.abstractmethod
    def _list(self) -> AsyncIterator[KeyEntry]: ...

    @abc.abstractmethod
    async def _usage(self) -> Usage: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...


async def usage_by_listing(
    entries: AsyncIterator[KeyEntry], capacity_bytes: int | None = None
) -> Usage:
    """Usage counted from a full listing, for drivers with no cheaper source."""
    count = total = 0
    async for entry in entries:
        count += 1
        total += entry.size
    return Usage(count, total, capacity_bytes)


def _writable_view(buffer: Buffer, driver: str) -> memoryview:
    view = memoryview(buffer)
    if view.readonly or not view.contiguous:
        raise InvalidArgumentError("into buffers must be writable and contiguous", driver=driver)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def fill_into(value: Buffer, target: memoryview | None) -> memoryview:
    """Return ``value`` as a view of ``target`` when it fits there (copying once),
    else as a view of a fresh buffer. Drivers without a faster path use this."""
    source = memoryview(value).cast("B")
    if target is not None and len(source) <= len(target):
        target[: len(source)] = source
        return target[: len(source)]
    return source if isinstance(value, bytes) else memoryview(bytes(source))
