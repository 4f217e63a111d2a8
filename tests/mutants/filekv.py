"""``filekv:///dir``: one file per key, written with blocking I/O off the event loop.

A small, correct, persistent driver, the worked example of
docs/driver-author-guide.md (a driver doing blocking I/O) and the base of the
persistent mutants. Each value is a file named by its key's SHA-256 (a key of
256 bytes is too long for a file name) that starts with the key itself; it is
written to a temporary file and renamed into place, so a reader sees the old
value or the new one, never a mix, in this process and in any other.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage, fill_into, usage_by_listing
from kvstore.errors import DriverUnavailableError, KVStoreError
from kvstore.threaded import DriverThreads

THREADS = 4
"""Worker threads doing the file I/O."""


class FileConfig(DriverConfig):
    """path: the directory holding one file per key."""

    scheme: ClassVar[str] = "filekv"
    location_field: ClassVar[str | None] = "path"

    path: str


class FileDriver(Driver[FileConfig]):
    """Values in files; every call's blocking work runs on the driver's worker
    threads (``DriverThreads``), so the event loop never waits on the disk. A call
    cancelled while its thread runs lets the thread finish before it ends: nothing
    it was given is touched after it returned."""

    config_type = FileConfig
    static_capabilities = Capabilities(persistent=True, listable=True)

    def __init__(self, config: FileConfig) -> None:
        super().__init__(config)
        self.root = Path(config.path)
        self._threads = DriverThreads(self.name, THREADS, self._disk_error)

    @classmethod
    async def open(cls, config: FileConfig) -> Self:
        driver = cls(config)
        await driver._threads.call(lambda: driver.root.mkdir(parents=True, exist_ok=True))
        return driver

    def path_of(self, key: bytes) -> Path:
        return self.root / hashlib.sha256(key).hexdigest()

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await self._threads.call(self._write_all, [(key, bytes(value)) for key, value in items])

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        values = await self._threads.call(self._read_all, keys)
        targets = into or [None] * len(keys)
        return [
            None if value is None else fill_into(value, target)
            for value, target in zip(values, targets)
        ]

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        return await self._threads.call(lambda: [self.path_of(key).exists() for key in keys])

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        return await self._threads.call(lambda: [self._unlink(self.path_of(key)) for key in keys])

    async def _list(self) -> AsyncIterator[KeyEntry]:
        for entry in await self._threads.call(self._scan):
            yield entry

    async def _usage(self) -> Usage:
        return await usage_by_listing(self._list())

    async def _close(self) -> None:
        """Nothing is held open between calls; wait for the threads still running."""
        await self._threads.close()

    def _disk_error(self, exc: Exception, operation: str) -> KVStoreError | None:
        """The driver's ErrorMap: an OSError becomes DriverUnavailableError."""
        if isinstance(exc, OSError):
            return DriverUnavailableError(f"{self.root}: {exc}", driver=self.name)
        return None

    def _write_all(self, items: list[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self._write(key, value)

    def _write(self, key: bytes, value: bytes) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=".put-")
        with os.fdopen(handle, "wb") as file:
            file.write(len(key).to_bytes(2, "big") + key)
            file.write(value)
        os.replace(temporary, self.path_of(key))

    def _read_all(self, keys: list[bytes]) -> list[bytes | None]:
        return [self._read(key) for key in keys]

    def _read(self, key: bytes) -> bytes | None:
        try:
            data = self.path_of(key).read_bytes()
        except FileNotFoundError:
            return None
        return data[2 + len(key) :]

    @staticmethod
    def _unlink(path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _scan(self) -> list[KeyEntry]:
        entries = []
        for path in self.root.iterdir():
            if path.name.startswith("."):
                continue
            try:
                with path.open("rb") as file:
                    key = file.read(int.from_bytes(file.read(2), "big"))
                    size = os.fstat(file.fileno()).st_size - 2 - len(key)
            except FileNotFoundError:
                continue
            entries.append(KeyEntry(key, size))
        return entries
