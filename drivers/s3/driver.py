"""The ``s3`` driver: each value one object in an S3-compatible object store.

``s3://bucket/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1`` keeps the
value of each key in the object ``<prefix>/<shard>/<hex key>`` (naming.py), through
botocore on a pool of ``io_threads`` threads (docs/drivers/s3.md). Values over
``part_size`` go up as multipart uploads with their parts in parallel and come
back as parallel ranged GETs.

A reader never sees a torn value: a PUT and a CompleteMultipartUpload replace an
object atomically, and every ranged GET after the first is pinned to the first
one's ETag with If-Match, so an overwrite between ranges (412) restarts the read
instead of mixing two versions.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import suppress
from enum import Enum
from functools import partial
from typing import Any, ClassVar, TypeVar

from botocore.exceptions import (
    ClientError,
)
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage, usage_by_listing
from kvstore.errors import (
    CapacityError,
    KVStoreError,
    TransientError,
)
from kvstore.inflight import gather_all
from kvstore.sizes import format_size
from kvstore.threaded import DriverThreads

from .client import (
    Body,
    client_errors,
    error_for_code,
    missing_key,
    open_client,
    status_of,
)
from .config import MAX_OBJECT_BYTES, MAX_PARTS, S3Config
from .naming import key_of, list_prefix, object_name

log = logging.getLogger(__name__)

T = TypeVar("T")


_READ_ATTEMPTS = 3
"""Reads of one value restarted because it was overwritten between its ranges."""
_DELETE_BATCH = 1000
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class _Range(Enum):
    """How one ranged GET of a value pinned to an ETag ended."""

    READ = "read"
    CHANGED = "changed"
    GONE = "gone"


class S3Driver(Driver[S3Config]):
    """Values as objects in an S3-compatible store; persistent, listable and shared."""

    config_type: ClassVar[type[DriverConfig]] = S3Config
    static_capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        listable=True,
        zero_copy=False,
        shared=True,
        details=(("transport", "botocore: multipart uploads and ETag-pinned ranged GETs"),),
    )

    def __init__(self, config: S3Config, *, client: Any, threads: DriverThreads) -> None:
        super().__init__(config)
        self._client = client
        self._threads = threads
        self._bucket = config.bucket
        self._prefix = config.prefix
        self._max_value = min(config.part_size * MAX_PARTS, MAX_OBJECT_BYTES)
        self._capabilities = Capabilities(
            persistent=True,
            listable=True,
            zero_copy=False,
            shared=True,
            max_value_bytes=self._max_value,
            details=(
                ("endpoint", client.meta.endpoint_url),
                ("bucket", self._bucket),
                ("prefix", self._prefix),
                ("part_size", format_size(config.part_size)),
            ),
        )

    @classmethod
    async def open(cls, config: S3Config) -> Self:
        """Build the client and check that the bucket is there (or create it)."""
        threads = DriverThreads(config.scheme, config.io_threads, partial(client_errors, config))
        try:
            client = await threads.run(open_client, config, operation="open")
        except BaseException:
            await threads.close()
            raise
        return cls(config, client=client, threads=threads)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # ------------------------------------------------------------ operations

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        values = dict(items)
        for value in values.values():
            if len(value) > self._max_value:
                raise CapacityError(
                    f"a value of {len(value)} bytes exceeds the largest object of "
                    f"{self._max_value} bytes ({MAX_PARTS} parts of part_size)",
                    driver=self.name,
                )
        await self._threads.complete(
            gather_all([self._put_one(key, value) for key, value in values.items()])
        )

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        targets: list[memoryview | None] = [None] * len(keys) if into is None else into
        return await self._threads.complete(
            gather_all([self._get_one(key, target) for key, target in zip(keys, targets)])
        )

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        return await self._threads.complete(
            gather_all(
                [
                    self._threads.run(self._exists, self._name(key), operation="contains")
                    for key in keys
                ]
            )
        )

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        return await self._threads.complete(self._delete_batch(keys))

    async def _list(self) -> AsyncIterator[KeyEntry]:
        token: str | None = None
        while True:
            objects, token = await self._threads.run(self._list_page, token, operation="list")
            for name, size in objects:
                key = key_of(self._prefix, name)
                if key is not None:
                    yield KeyEntry(key, size)
            if token is None:
                return

    async def _usage(self) -> Usage:
        return await usage_by_listing(self._list())

    async def _close(self) -> None:
        await self._threads.close()
        await asyncio.to_thread(self._client.close)

    # ------------------------------------------------------------- machinery

    def _name(self, key: bytes) -> str:
        return object_name(self._prefix, key)

    # ------------------------------------------------------------------ puts

    async def _put_one(self, key: bytes, value: memoryview) -> None:
        name = self._name(key)
        if len(value) <= self.config.part_size:
            await self._threads.run(self._put_object, name, value, operation="put")
        else:
            await self._put_multipart(name, value)

    def _put_object(self, name: str, value: memoryview) -> None:
        self._client.put_object(Bucket=self._bucket, Key=name, Body=Body.of(value))

    async def _put_multipart(self, name: str, value: memoryview) -> None:
        """Upload ``value`` in parallel parts; it becomes visible, whole, on completion."""
        upload_id = await self._threads.run(self._create_upload, name, operation="put")
        step = self.config.part_size
        parts = [value[start : start + step] for start in range(0, len(value), step)]
        try:
            etags = await gather_all(
                [
                    self._threads.run(
                        self._upload_part, name, upload_id, number, part, operation="put"
                    )
                    for number, part in enumerate(parts, start=1)
                ]
            )
            await self._threads.run(self._complete_upload, name, upload_id, etags, operation="put")
        except BaseException:
            with suppress(KVStoreError):
                await self._threads.run(self._abort_upload, name, upload_id, operation="put")
            raise

    def _create_upload(self, name: str) -> str:
        response = self._client.create_multipart_upload(Bucket=self._bucket, Key=name)
        upload_id: str = response["UploadId"]
        return upload_id

    def _upload_part(self, name: str, upload_id: str, number: int, part: memoryview) -> str:
        response = self._client.upload_part(
            Bucket=self._bucket,
            Key=name,
            UploadId=upload_id,
            PartNumber=number,
            Body=Body.of(part),
        )
        etag: str = response["ETag"]
        return etag

    def _complete_upload(self, name: str, upload_id: str, etags: list[str]) -> None:
        parts = [{"ETag": etag, "PartNumber": number} for number, etag in enumerate(etags, 1)]
        self._client.complete_multipart_upload(
            Bucket=self._bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )

    def _abort_upload(self, name: str, upload_id: str) -> None:
        with suppress(ClientError):
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=name, UploadId=upload_id)

    # ------------------------------------------------------------------ gets

    async def _get_one(self, key: bytes, target: memoryview | None) -> memoryview | None:
        """Read one value: its first part, then the rest in parallel, pinned to the
        first part's ETag; restarted when it changes in between, a miss when it
        keeps changing or is deleted."""
        name = self._name(key)
        for _ in range(_READ_ATTEMPTS):
            first = await self._threads.run(self._get_first, name, target, operation="get")
            if first is None:
                return None
            buffer, read, total, etag = first
            step = self.config.part_size
            outcomes = await gather_all(
                [
                    self._threads.run(
                        self._get_range,
                        name,
                        etag,
                        start,
                        min(start + step, total),
                        buffer,
                        operation="get",
                    )
                    for start in range(read, total, step)
                ]
            )
            if _Range.GONE in outcomes:
                return None
            if _Range.CHANGED not in outcomes:
                return buffer[:total]
            log.debug("s3: %s changed while it was read; reading it again", name)
        return None

    def _get_first(
        self, name: str, target: memoryview | None
    ) -> tuple[memoryview, int, int, str] | None:
        """GET the first part of an object into ``target`` (or a new buffer when the
        value does not fit): the buffer, bytes read, the value's size and its ETag."""
        try:
            response = self._client.get_object(
                Bucket=self._bucket, Key=name, Range=f"bytes=0-{self.config.part_size - 1}"
            )
        except ClientError as exc:
            if missing_key(exc):
                return None
            if status_of(exc) != 416:
                raise
            response = self._get_whole(name)
            if response is None:
                return None
        body = response["Body"]
        try:
            length: int = response["ContentLength"]
            content_range = response.get("ContentRange")
            total = length if content_range is None else self._parse_range(content_range)[2]
            buffer = (
                target
                if target is not None and len(target) >= total
                else memoryview(bytearray(total))
            )
            self._read_exactly(body, buffer[:length])
        finally:
            body.close()
        return buffer, length, total, response["ETag"]

    def _get_whole(self, name: str) -> Any:
        """A plain GET, for objects a range does not fit (zero-length ones)."""
        try:
            return self._client.get_object(Bucket=self._bucket, Key=name)
        except ClientError as exc:
            if missing_key(exc):
                return None
            raise

    def _get_range(self, name: str, etag: str, start: int, end: int, buffer: memoryview) -> _Range:
        """GET bytes ``[start, end)`` of the version ``etag`` of an object into ``buffer``."""
        try:
            response = self._client.get_object(
                Bucket=self._bucket, Key=name, Range=f"bytes={start}-{end - 1}", IfMatch=etag
            )
        except ClientError as exc:
            if status_of(exc) in (412, 416):
                return _Range.CHANGED
            if missing_key(exc):
                return _Range.GONE
            raise
        body = response["Body"]
        try:
            got_start, got_end, _ = self._parse_range(response.get("ContentRange") or "")
            if (got_start, got_end + 1) != (start, end) or response["ETag"] != etag:
                return _Range.CHANGED
            self._read_exactly(body, buffer[start:end])
        finally:
            body.close()
        return _Range.READ

    def _parse_range(self, content_range: str) -> tuple[int, int, int]:
        match = _CONTENT_RANGE.match(content_range)
        if match is None:
            raise TransientError(
                f"the service answered a ranged GET with Content-Range {content_range!r}",
                driver=self.name,
            )
        first, last, total = (int(group) for group in match.groups())
        return first, last, total

    def _read_exactly(self, body: Any, view: memoryview) -> None:
        """Fill ``view`` from a response body, or raise TransientError if it ends early."""
        filled = 0
        while filled < len(view):
            count: int = body.readinto(view[filled:])
            if not count:
                raise TransientError(
                    f"the response ended after {filled} of {len(view)} bytes", driver=self.name
                )
            filled += count

    # ----------------------------------------------------- contains, delete, list

    def _exists(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self._bucket, Key=name)
        except ClientError as exc:
            if missing_key(exc):
                return False
            raise
        return True

    async def _delete_batch(self, keys: list[bytes]) -> list[bool]:
        """Delete the keys that exist; ``True`` for the first mention of each of them."""
        names = list(dict.fromkeys(self._name(key) for key in keys))
        present = await gather_all(
            [self._threads.run(self._exists, name, operation="delete") for name in names]
        )
        doomed = [name for name, found in zip(names, present) if found]
        await gather_all(
            [
                self._threads.run(
                    self._delete_objects, doomed[start : start + _DELETE_BATCH], operation="delete"
                )
                for start in range(0, len(doomed), _DELETE_BATCH)
            ]
        )
        pending = set(doomed)
        removed: list[bool] = []
        for key in keys:
            name = self._name(key)
            removed.append(name in pending)
            pending.discard(name)
        return removed

    def _delete_objects(self, names: list[str]) -> None:
        response = self._client.delete_objects(
            Bucket=self._bucket,
            Delete={"Objects": [{"Key": name} for name in names], "Quiet": True},
        )
        failures = response.get("Errors") or []
        if failures:
            failure = failures[0]
            raise error_for_code(
                failure.get("Code", ""),
                0,
                f"{len(failures)} of {len(names)} deletes failed: {failure.get('Message', '')}",
                "delete",
                self.config,
            )

    def _list_page(self, token: str | None) -> tuple[list[tuple[str, int]], str | None]:
        """One ListObjectsV2 page under the prefix: names and sizes, and the next token."""
        options: dict[str, Any] = {"Bucket": self._bucket, "Prefix": list_prefix(self._prefix)}
        if token is not None:
            options["ContinuationToken"] = token
        response = self._client.list_objects_v2(**options)
        objects = [(item["Key"], int(item["Size"])) for item in response.get("Contents", [])]
        following = response.get("NextContinuationToken") if response.get("IsTruncated") else None
        return objects, following
