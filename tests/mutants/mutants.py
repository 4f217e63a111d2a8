"""Deliberately broken drivers, each with one realistic bug against one promise of
docs/driver-protocol.md: the conformance suite must fail every one of them in
the area named here (tests/test_conformance_mutants.py checks it).

Most start from the example ``dictkv`` driver (tests/thirdparty_driver), the
persistent ones from ``filekv`` (filekv.py); each changes as little as its bug
needs. Not part of any installable package.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from filekv import FileConfig, FileDriver
from kvstore_dictdriver.driver import DictConfig, DictDriver

from kvstore.driver import Capabilities, Driver, KeyEntry, fill_into
from kvstore.errors import CapacityError
from kvstore.registry import DriverInfo, DriverRegistry, hookimpl

MiB = 1 << 20


@dataclass(frozen=True)
class Mutant:
    """One broken driver: its scheme, the promise it breaks, and the suite area
    that must catch it."""

    scheme: str
    driver: type[Driver[Any]]
    promise: str
    area: str

    def url(self, scratch: Path) -> str:
        """A URL of this mutant; file-based ones get a directory under ``scratch``."""
        if issubclass(self.driver, FileDriver):
            return f"{self.scheme}://{scratch / self.scheme}"
        return f"{self.scheme}://?capacity=64MiB"


MUTANTS: dict[str, Mutant] = {}
"""Every mutant by scheme."""

D = TypeVar("D", bound=type[Driver[Any]])


def mutant(scheme: str, area: str, promise: str) -> Callable[[D], D]:
    """Register the decorated driver class as a mutant of scheme ``scheme``, with a
    config class of its own (module-level, so configs pickle)."""

    def register(cls: D) -> D:
        base = cls.config_type
        name = f"{cls.__name__}Config"
        config = type(
            name,
            (base,),
            {
                "__annotations__": {"scheme": ClassVar[str]},
                "scheme": scheme,
                "__module__": __name__,
            },
        )
        globals()[name] = config
        cls.config_type = config
        MUTANTS[scheme] = Mutant(scheme, cls, promise, area)
        return cls

    return register


# --- core: values round-trip, misses, overwrite, delete, list, usage ----------


@mutant("wrongbytes", "core", "values round-trip exactly (a bit flipped past 1 MiB)")
class WrongBytes(DictDriver):
    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        values = await super()._get_many(keys, into)
        return [self._flip(value) for value in values]

    @staticmethod
    def _flip(value: memoryview | None) -> memoryview | None:
        if value is None or len(value) <= MiB:
            return value
        damaged = bytearray(value)
        damaged[MiB] ^= 1
        return memoryview(damaged)


@mutant("truncates16mib", "core", "values round-trip exactly (cut to 16 MiB, one request's limit)")
class TruncatesLarge(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many([(key, value[: 16 * MiB]) for key, value in items])


@mutant("stalelistsize", "core", "list reports each value's current size (kept the first one)")
class StaleListSize(DictDriver):
    def __init__(self, config: DictConfig) -> None:
        super().__init__(config)
        self.first_sizes: dict[bytes, int] = {}

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many(items)
        for key, value in items:
            self.first_sizes.setdefault(key, len(value))

    async def _list(self) -> AsyncIterator[KeyEntry]:
        for key in list(self._values):
            yield KeyEntry(key, self.first_sizes.get(key, len(self._values[key])))


@mutant("emptyismiss", "core", "a zero-length value is a hit, not a miss")
class EmptyIsMiss(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many([(key, value) for key, value in items if len(value)])


@mutant("deletealwaystrue", "core", "delete reports True only where a value was deleted")
class DeleteAlwaysTrue(DictDriver):
    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        await super()._delete_many(keys)
        return [True] * len(keys)


@mutant("containsbyprefix", "core", "contains is True only for keys holding a value")
class ContainsByPrefix(DictDriver):
    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        prefixes = {key[:20] for key in self._values}
        return [key[:20] in prefixes for key in keys]


@mutant("usagenotondelete", "core", "usage counts what is stored (delete forgot to subtract)")
class UsageNotOnDelete(DictDriver):
    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        held = self._bytes
        found = await super()._delete_many(keys)
        self._bytes = held
        return found


@mutant("aliasescaller", "core", "values are copied on put (kept a view of the caller's buffer)")
class AliasesCaller(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many(items)
        for key, value in items:
            self._values[key] = value  # type: ignore[assignment]


@mutant("lendsinternal", "core", "returned values stay valid after an overwrite")
class LendsInternal(DictDriver):
    """Keeps each value in a bytearray, overwritten in place, and returns views of it."""

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        for key, value in items:
            held = self._values.get(key)
            if isinstance(held, bytearray) and len(held) == len(value):
                held[:] = value
                continue
            await super()._put_many([(key, value)])
            self._values[key] = bytearray(self._values[key])  # type: ignore[assignment]

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        if into is not None:
            return await super()._get_many(keys, into)
        return [None if (v := self._values.get(key)) is None else memoryview(v) for key in keys]


@mutant("missraises", "core", "backend errors are translated (a miss raised KeyError)")
class MissRaises(DictDriver):
    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        targets = into or [None] * len(keys)
        return [fill_into(self._values[key], target) for key, target in zip(keys, targets)]


class DroppedQueryConfigBase(DictConfig):
    def to_url(self) -> str:
        return f"{self.scheme}://"


@mutant("droppedquery", "core", "a config round-trips through its URL (to_url drops the query)")
class DroppedQuery(DictDriver):
    config_type = DroppedQueryConfigBase


# --- keys ----------------------------------------------------------------------


@mutant(
    "keycut250", "keys", "keys of up to 256 bytes are distinct (cut to 250, a file name's limit)"
)
class KeyCut250(DictDriver):
    def _cut(self, keys: list[bytes]) -> list[bytes]:
        return [key[:250] for key in keys]

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many([(key[:250], value) for key, value in items])

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        return await super()._get_many(self._cut(keys), into)

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        return await super()._contains_many(self._cut(keys))

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        return await super()._delete_many(self._cut(keys))


@mutant("caseinsensitive", "keys", "keys differing only in letter case are distinct")
class CaseInsensitive(KeyCut250):
    def _cut(self, keys: list[bytes]) -> list[bytes]:
        return [key.lower() for key in keys]

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await DictDriver._put_many(self, [(key.lower(), value) for key, value in items])


# --- batch: order, repeats, into buffers -------------------------------------


@mutant("dropskeys", "batch", "every item of a batch is stored (only the first 32 were)")
class DropsKeys(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many(items[:32])


@mutant("firstrepeatwins", "batch", "the last of a key repeated in one put wins")
class FirstRepeatWins(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        first: dict[bytes, memoryview] = {}
        for key, value in items:
            first.setdefault(key, value)
        await super()._put_many(list(first.items()))


@mutant("repeatcountedtwice", "batch", "usage counts a key repeated in one put once")
class RepeatCountedTwice(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many(items)
        seen: set[bytes] = set()
        for key, value in items:
            if key in seen:
                self._bytes += len(value)
            seen.add(key)


@mutant(
    "wholeintobuffer", "batch", "a value read into a buffer is a view of its first len(value) bytes"
)
class WholeIntoBuffer(DictDriver):
    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        values = await super()._get_many(keys, into)
        targets = into or [None] * len(keys)
        return [
            target
            if value is not None
            and target is not None
            and len(value) > 0
            and value.obj is target.obj
            else value
            for value, target in zip(values, targets)
        ]


@mutant("intocopy", "batch", "a value that fits is returned as a view of its into buffer")
class IntoCopy(DictDriver):
    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        values = await super()._get_many(keys, into)
        return [None if value is None else memoryview(bytes(value)) for value in values]


@mutant("intoshifted", "batch", "into[i] belongs to keys[i] (hits took the buffers in turn)")
class IntoShifted(DictDriver):
    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        spare = iter(into or [])
        return [
            None
            if (value := self._values.get(key)) is None
            else fill_into(value, next(spare, None))
            for key in keys
        ]


@mutant("intotoosmall", "batch", "a value too large for its buffer still comes back whole")
class IntoTooSmall(DictDriver):
    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        targets = into or [None] * len(keys)
        results: list[memoryview | None] = []
        for key, target in zip(keys, targets):
            value = self._values.get(key)
            if value is not None and target is not None:
                size = min(len(value), len(target))
                target[:size] = value[:size]
                results.append(target[:size])
            else:
                results.append(None if value is None else memoryview(value))
        return results


# --- sustained reads --------------------------------------------------------


@mutant("rarebadread", "sustained", "every read returns the value written (one in 997 is stale)")
class RareBadRead(DictDriver):
    """A cache in front of the dict that, once every 997 reads, answers with the
    value its slot held before."""

    def __init__(self, config: DictConfig) -> None:
        super().__init__(config)
        self.reads = 0
        self.previous: dict[bytes, bytes] = {}

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        for key, _ in items:
            if key in self._values:
                self.previous[key] = self._values[key]
        await super()._put_many(items)

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        self.reads += 1
        if self.reads % 997 == 0 and keys[0] in self.previous:
            return [memoryview(self.previous[keys[0]]), *(await super()._get_many(keys[1:], None))]
        return await super()._get_many(keys, into)


# --- concurrency -------------------------------------------------------------


@mutant("tornwrites", "concurrency", "readers see whole values (a put wrote in two halves)")
class TornWrites(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        for key, value in items:
            current = self._values.get(key)
            if current is not None and len(current) == len(value):
                half = len(value) // 2
                await super()._put_many(
                    [(key, memoryview(value[:half].tobytes() + current[half:]))]
                )
                await asyncio.sleep(0)
            await super()._put_many([(key, value)])


@mutant("livelist", "concurrency", "list works while keys change (iterated the live dict)")
class LiveList(DictDriver):
    async def _list(self) -> AsyncIterator[KeyEntry]:
        for key, value in self._values.items():
            yield KeyEntry(key, len(value))


# --- loans ---------------------------------------------------------------------


class Lending(DictDriver):
    """Lends views of its values, held in bytearrays replaced on every put."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            persistent=False, listable=True, lends_views=True, capacity_bytes=self.config.capacity
        )

    def _borrow_many(
        self, keys: list[bytes]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        views: list[memoryview | None] = [
            None if (value := self._values.get(key)) is None else memoryview(value).toreadonly()
            for key in keys
        ]
        return contextlib.nullcontext(views)


@mutant("inplaceloans", "loans", "lent values stay intact for the whole loan (put wrote in place)")
class InPlaceLoans(Lending):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        for key, value in items:
            held = self._values.get(key)
            if isinstance(held, bytearray) and len(held) == len(value):
                held[:] = value
            else:
                await super()._put_many([(key, value)])
                self._values[key] = bytearray(self._values[key])  # type: ignore[assignment]


@mutant("lendsabsent", "loans", "a loan lends nothing for an absent key (lent an empty view)")
class LendsAbsent(Lending):
    def _borrow_many(
        self, keys: list[bytes]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        views = [memoryview(self._values.get(key, b"")).toreadonly() for key in keys]
        return contextlib.nullcontext(views)  # type: ignore[arg-type]


class RoomLending(DictDriver):
    """Lends writable room (bytearrays), put into the dict when the loan commits."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            persistent=False, listable=True, lends_room=True, capacity_bytes=self.config.capacity
        )

    def _lend_many(
        self, items: list[tuple[bytes, int]]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        return self._room(items)

    @contextlib.asynccontextmanager
    async def _room(self, items: list[tuple[bytes, int]]) -> AsyncIterator[list[memoryview | None]]:
        rooms = [bytearray(size) for _, size in items]
        yield [memoryview(room) for room in rooms]
        await self._put_many([(key, memoryview(room)) for (key, _), room in zip(items, rooms)])


@mutant("lendsvisible", "loans", "lent room is invisible until it commits (published at once)")
class LendsVisible(RoomLending):
    @contextlib.asynccontextmanager
    async def _room(self, items: list[tuple[bytes, int]]) -> AsyncIterator[list[memoryview | None]]:
        rooms = [bytearray(size) for _, size in items]
        for (key, _), room in zip(items, rooms):
            self._values[key] = room  # type: ignore[assignment]
        yield [memoryview(room) for room in rooms]


@mutant("commitsonabort", "loans", "an aborted loan publishes nothing (committed anyway)")
class CommitsOnAbort(RoomLending):
    @contextlib.asynccontextmanager
    async def _room(self, items: list[tuple[bytes, int]]) -> AsyncIterator[list[memoryview | None]]:
        rooms = [bytearray(size) for _, size in items]
        try:
            yield [memoryview(room) for room in rooms]
        finally:
            await self._put_many([(key, memoryview(room)) for (key, _), room in zip(items, rooms)])


# --- persistence -----------------------------------------------------------------


@mutant(
    "processlocal", "persistence", "values persist across processes (kept in this process only)"
)
class ProcessLocal(DictDriver):
    """Declares persistence but keeps values in a dict per config, in this process."""

    stores: ClassVar[dict[str, tuple[dict[bytes, bytes], list[int]]]] = {}

    @classmethod
    async def open(cls, config: DictConfig) -> ProcessLocal:
        driver = cls(config)
        values, total = cls.stores.setdefault(config.to_url(), ({}, [0]))
        driver._values = values
        driver.total = total
        driver._bytes = total[0]
        return driver

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=True, listable=True, capacity_bytes=self.config.capacity)

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await super()._put_many(items)
        self.total[0] = self._bytes

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        found = await super()._delete_many(keys)
        self.total[0] = self._bytes
        return found

    async def _close(self) -> None:
        """Keeps the values for the next open in this process."""


@mutant("indexeddelete", "persistence", "deletes persist (only the in-memory index forgot the key)")
class IndexedDelete(FileDriver):
    """Remembers deleted keys in memory and leaves their files on disk."""

    def __init__(self, config: FileConfig) -> None:
        super().__init__(config)
        self.deleted: set[bytes] = set()

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        self.deleted.difference_update(key for key, _ in items)
        await super()._put_many(items)

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        values = await super()._get_many(keys, into)
        return [None if key in self.deleted else value for key, value in zip(keys, values)]

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        found = await super()._contains_many(keys)
        return [hit and key not in self.deleted for key, hit in zip(keys, found)]

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        found = await self._contains_many(keys)
        self.deleted.update(keys)
        return found

    async def _list(self) -> AsyncIterator[KeyEntry]:
        async for entry in super()._list():
            if entry.key not in self.deleted:
                yield entry


@mutant("keptoldtail", "core", "the last write wins (rewrote the file in place, kept its tail)")
class KeptOldTail(FileDriver):
    def _write(self, key: bytes, value: bytes) -> None:
        path = self.path_of(key)
        with open(path, "r+b" if path.exists() else "wb") as file:
            file.write(len(key).to_bytes(2, "big") + key)
            file.write(value)


# --- capacity and errors ---------------------------------------------------------


@mutant("unnamederror", "capacity", "errors name their driver (CapacityError without driver=)")
class UnnamedError(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        try:
            await super()._put_many(items)
        except CapacityError as exc:
            raise CapacityError(exc.message) from None


@mutant(
    "evictsinstead", "capacity", "a put past capacity raises and loses nothing stored (evicted)"
)
class EvictsInstead(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        capacity = self.config.capacity or 0
        incoming = sum(len(value) for _, value in items)
        while self._values and self._bytes + incoming > capacity:
            await self._delete_many([next(iter(self._values))])
        await super()._put_many(items)


@mutant("leakedmemoryerror", "capacity", "a full driver raises CapacityError (leaked MemoryError)")
class LeakedMemoryError(DictDriver):
    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        try:
            await super()._put_many(items)
        except CapacityError:
            raise MemoryError("arena exhausted") from None


@mutant("fastpathcontains", "errors", "every call checks its keys and refuses a closed driver")
class FastPathContains(DictDriver):
    """Overrides the public ``contains_many`` for speed, skipping the base class's checks."""

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [key in self._values for key in keys]


class MutantPlugin:
    """A pluggy plugin object describing one mutant."""

    def __init__(self, mutant: Mutant) -> None:
        self.mutant = mutant

    @hookimpl
    def kvstore_driver(self) -> DriverInfo:
        cls = self.mutant.driver
        return DriverInfo(
            scheme=self.mutant.scheme,
            target=f"{__name__}:{cls.__name__}",
            summary=f"broken on purpose: {self.mutant.promise}",
        )


class FilePlugin:
    """The correct ``filekv`` driver the persistent mutants start from."""

    @hookimpl
    def kvstore_driver(self) -> DriverInfo:
        return DriverInfo(scheme="filekv", target="filekv:FileDriver", summary="values in files")


def register_mutants(registry: DriverRegistry) -> None:
    """Make ``filekv`` and every mutant openable through ``registry``."""
    registry.register(FilePlugin(), name="filekv", source="tests (example)")
    for scheme, broken in MUTANTS.items():
        registry.register(MutantPlugin(broken), name=scheme, source="tests (broken on purpose)")
