"""The ``redis`` and ``rediss`` drivers: values in Redis or Redis Cluster via redis-py.

``redis://[user:password@]host:6379/0?prefix=kv&ttl=3600&part_size=8MiB`` keeps
each value under the key prefix ``prefix``; ``rediss://`` is the same over TLS.
Values up to ``part_size`` are one Redis string; larger ones are cut into
parts published atomically behind a small manifest (layout.py), so a reader
never sees half a value, whatever races it. Blocking redis-py calls run on
the driver's thread pool (as many threads as ``max_connections``) with
hiredis parsing replies; batches become pipelines, and the pipelines and
parts of one batch move in parallel over several connections. Values are
sent straight from the caller's memory (connection.py explains how).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar, TypeVar

from redis.cluster import RedisCluster
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage, fill_into, usage_by_listing
from kvstore.errors import IntegrityError, KVStoreError
from kvstore.inflight import gather_all
from kvstore.sizes import format_size
from kvstore.threaded import DriverThreads

from .config import RedisConfig, RedissConfig
from .connection import Client, client_for, translate
from .layout import (
    DELETE,
    DROP_IF_CURRENT,
    PUBLISH,
    SIZE,
    TIDY,
    KeyNames,
    Manifest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

PIPELINE_KEYS = 64
"""The most keys one pipeline carries; a batch's pipelines run in parallel."""

SPREAD_BYTES = 1 << 20
"""A batch gets one more parallel pipeline (up to the thread count) per this many bytes."""

_UNKNOWN_SIZE = SPREAD_BYTES
"""What a read without a buffer to hint its size is assumed to move, so such
batches spread over the threads too."""

SCAN_COUNT = 1000
_READ_ATTEMPTS = 4
_STAGING_TTL_MS = 300_000
"""Parts not yet published expire after this, so a writer that dies leaves nothing."""


@dataclass
class _Parted:
    """A parted value being read: where it goes and whether every part arrived."""

    index: int
    key: bytes
    manifest: Manifest
    raw: bytes
    destination: memoryview
    complete: bool = True


class RedisDriver(Driver[RedisConfig]):
    """Values in Redis (or a Redis Cluster), shared by every client of the same prefix."""

    config_type: ClassVar[type[DriverConfig]] = RedisConfig
    static_capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False,
        listable=True,
        zero_copy=False,
        shared=True,
        details=(
            ("persistent", "only with persistent=true (a Redis cache may evict)"),
            ("large values", "cut into parts published atomically behind a manifest"),
        ),
    )

    def __init__(self, config: RedisConfig, client: Client, threads: DriverThreads) -> None:
        super().__init__(config)
        self._client = client
        self._threads = threads
        self._names = KeyNames(config.prefix)
        self._server = config.server
        self._ttl_ms = 0 if config.ttl is None else config.ttl * 1000
        self._capabilities = Capabilities(
            persistent=config.persistent,
            listable=True,
            zero_copy=False,
            shared=True,
            details=(
                ("server", self._server),
                ("tls", "on" if config.tls else "off"),
                ("prefix", config.prefix),
                ("part_size", format_size(config.part_size)),
                ("ttl", "none" if config.ttl is None else f"{config.ttl} s"),
            ),
        )

    @classmethod
    async def open(cls, config: RedisConfig) -> Self:
        """Connect (and authenticate) to the server or cluster; raise if it cannot be reached."""
        threads = DriverThreads(
            config.scheme,
            config.max_connections,
            lambda exc, _: translate(exc, config.scheme, config.server),
        )
        try:
            client = await threads.run(client_for, config, operation="connect")
        except BaseException:
            await threads.close()
            raise
        return cls(config, client, threads)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # ------------------------------------------------------------------ protocol

    async def _put_many(self, items: builtins.list[tuple[bytes, memoryview]]) -> None:
        await self._threads.complete(self._write(dict(items)))

    async def _get_many(
        self, keys: builtins.list[bytes], into: builtins.list[memoryview | None] | None
    ) -> builtins.list[memoryview | None]:
        targets: builtins.list[memoryview | None] = [None] * len(keys) if into is None else into
        return await self._threads.complete(self._read(keys, targets))

    async def _contains_many(self, keys: builtins.list[bytes]) -> builtins.list[bool]:
        commands = [("EXISTS", self._names.value(key), self._names.manifest(key)) for key in keys]
        replies = await self._pipelines(commands)
        return [bool(reply) for reply in replies]

    async def _delete_many(self, keys: builtins.list[bytes]) -> builtins.list[bool]:
        replies = await self._threads.complete(
            self._pipelines([self._delete_command(k) for k in keys])
        )
        return [bool(reply) for reply in replies]

    async def _list(self) -> AsyncIterator[KeyEntry]:
        names = iter(self._client.scan_iter(match=self._names.scan_pattern(), count=SCAN_COUNT))
        seen: set[bytes] = set()
        while True:
            page = await self._threads.run(_take, names, SCAN_COUNT)
            if not page:
                return
            keys: builtins.list[bytes] = []
            for name in page:
                key = self._names.entry_key(name)
                if key is not None and key not in seen:
                    seen.add(key)
                    keys.append(key)
            sizes = await self._pipelines(
                [
                    ("EVAL", SIZE, 2, self._names.value(key), self._names.manifest(key))
                    for key in keys
                ]
            )
            for key, size in zip(keys, sizes):
                if size >= 0:
                    yield KeyEntry(key, size)

    async def _usage(self) -> Usage:
        return await usage_by_listing(self._list())

    async def _close(self) -> None:
        await self._threads.close()
        await asyncio.to_thread(self._client.close)

    # --------------------------------------------------------------- machinery

    def _execute(self, commands: builtins.list[tuple[Any, ...]]) -> builtins.list[Any]:
        """Send ``commands`` as one pipeline (no MULTI) and return the replies in order.

        A cluster pipeline is told each command's node: left to itself, redis-py asks
        the server (``COMMAND GETKEYS``, a round trip on another connection) where
        every EVAL goes. A stale node is corrected by the usual MOVED redirection."""
        pipeline = self._client.pipeline(transaction=False)
        if isinstance(self._client, RedisCluster):
            for command in commands:
                key = command[3] if command[0] == "EVAL" else command[1]
                node = self._client.get_node_from_key(key)  # type: ignore[no-untyped-call]
                pipeline.execute_command(*command, target_nodes=node)
        else:
            for command in commands:
                pipeline.execute_command(*command)
        return pipeline.execute()

    async def _pipelines(self, commands: builtins.list[tuple[Any, ...]]) -> builtins.list[Any]:
        """Run ``commands`` as pipelines of PIPELINE_KEYS in parallel; replies in order."""
        groups = [
            commands[start : start + PIPELINE_KEYS]
            for start in range(0, len(commands), PIPELINE_KEYS)
        ]
        replies = await gather_all([self._threads.run(self._execute, group) for group in groups])
        return [reply for group in replies for reply in group]

    def _delete_command(self, key: bytes) -> tuple[Any, ...]:
        return (
            "EVAL",
            DELETE,
            2,
            self._names.value(key),
            self._names.manifest(key),
            self._names.part_prefix(key),
        )

    # ------------------------------------------------------------------- write

    async def _write(self, values: dict[bytes, memoryview]) -> None:
        """Inline values as SET (+TIDY) pipelines, parted values as staged parts and a
        publish; everything of one batch in parallel."""
        part_size = self.config.part_size
        inline = [(key, value) for key, value in values.items() if len(value) <= part_size]
        parted = [
            (key, value, Manifest.plan(len(value), part_size))
            for key, value in values.items()
            if len(value) > part_size
        ]
        jobs = [self._threads.run(self._execute, group) for group in self._inline_pipelines(inline)]
        staged = [self._stage(key, value, manifest) for key, value, manifest in parted]
        outcomes = await asyncio.gather(*jobs, *staged, return_exceptions=True)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        staged_ok = [
            entry
            for entry, outcome in zip(parted, outcomes[len(jobs) :])
            if not isinstance(outcome, BaseException)
        ]
        abandoned = [
            name
            for (key, _, manifest), outcome in zip(parted, outcomes[len(jobs) :])
            if isinstance(outcome, BaseException)
            for name in manifest.part_keys(self._names.part_prefix(key))
        ]
        if abandoned:
            await self._discard(abandoned)
        if staged_ok:
            publish = [self._publish_command(key, manifest) for key, _, manifest in staged_ok]
            try:
                await self._pipelines(publish)
            except KVStoreError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def _discard(self, part_names: builtins.list[bytes]) -> None:
        """Delete the parts of puts that failed half way, so they do not hold memory
        until their staging expiry (best effort: that expiry removes what this misses)."""
        with contextlib.suppress(KVStoreError):
            await self._pipelines([("DEL", name) for name in part_names])

    def _inline_pipelines(
        self, items: builtins.list[tuple[bytes, memoryview]]
    ) -> builtins.list[builtins.list[tuple[Any, ...]]]:
        """SET and TIDY commands of inline values, in pipelines spread over the threads."""
        expiry = ("PX", self._ttl_ms) if self._ttl_ms else ()
        pipelines: builtins.list[builtins.list[tuple[Any, ...]]] = []
        for group in _spread([len(value) for _, value in items], self.config.max_connections):
            commands: builtins.list[tuple[Any, ...]] = []
            for key, value in (items[position] for position in group):
                name = self._names.value(key)
                commands.append(("SET", name, value, *expiry))
                commands.append(
                    ("EVAL", TIDY, 2, name, self._names.manifest(key), self._names.part_prefix(key))
                )
            pipelines.append(commands)
        return pipelines

    async def _stage(self, key: bytes, value: memoryview, manifest: Manifest) -> None:
        """Write the parts of one value under its new version, in parallel, each with
        the staging expiry that PUBLISH lifts."""
        names = manifest.part_keys(self._names.part_prefix(key))
        commands = [
            ("SET", name, value[offset : offset + length], "PX", _STAGING_TTL_MS)
            for name, (offset, length) in zip(names, manifest.spans())
        ]
        await gather_all([self._threads.run(self._execute, [command]) for command in commands])

    def _publish_command(self, key: bytes, manifest: Manifest) -> tuple[Any, ...]:
        parts = manifest.part_keys(self._names.part_prefix(key))
        return (
            "EVAL",
            PUBLISH,
            2 + len(parts),
            self._names.value(key),
            self._names.manifest(key),
            *parts,
            manifest.encode(),
            self._ttl_ms,
            self._names.part_prefix(key),
        )

    # -------------------------------------------------------------------- read

    async def _read(
        self, keys: builtins.list[bytes], targets: builtins.list[memoryview | None]
    ) -> builtins.list[memoryview | None]:
        """Heads first (inline values, or manifests), then the parts of parted values;
        a parted value whose parts vanished under a concurrent overwrite is read again."""
        results: builtins.list[memoryview | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        broken_before: dict[int, bytes] = {}
        for _ in range(_READ_ATTEMPTS):
            parted = await self._read_heads(keys, targets, pending, results)
            if not parted:
                return results
            await self._read_parts(parted)
            pending = []
            for entry in parted:
                if entry.complete:
                    results[entry.index] = entry.destination
                elif broken_before.get(entry.index) == entry.raw:
                    await self._drop_broken(entry.key, entry.raw)
                else:
                    broken_before[entry.index] = entry.raw
                    pending.append(entry.index)
            if not pending:
                return results
        return results

    async def _read_heads(
        self,
        keys: builtins.list[bytes],
        targets: builtins.list[memoryview | None],
        indices: builtins.list[int],
        results: builtins.list[memoryview | None],
    ) -> builtins.list[_Parted]:
        """Fetch inline value and manifest of each key in one MGET; inline values land
        in ``results`` (in their target buffers), parted ones come back to be read."""
        part_size = self.config.part_size
        weights = [
            _UNKNOWN_SIZE if target is None else len(target) if len(target) <= part_size else 0
            for target in (targets[index] for index in indices)
        ]
        groups = [
            [indices[position] for position in group]
            for group in _spread(weights, self.config.max_connections)
        ]
        found = await gather_all(
            [
                self._threads.run(
                    self._fetch_heads, [keys[i] for i in group], [targets[i] for i in group]
                )
                for group in groups
            ]
        )
        parted: builtins.list[_Parted] = []
        for group, heads in zip(groups, found):
            for index, head in zip(group, heads):
                if not isinstance(head, bytes):
                    results[index] = head
                elif entry := await self._plan_parted(index, keys[index], head, targets[index]):
                    parted.append(entry)
        return parted

    def _fetch_heads(
        self, keys: builtins.list[bytes], targets: builtins.list[memoryview | None]
    ) -> builtins.list[memoryview | bytes | None]:
        """On a worker thread: MGET value+manifest per key; an inline value is copied
        into its target here; a manifest comes back as its raw bytes."""
        replies = self._execute(
            [("MGET", self._names.value(key), self._names.manifest(key)) for key in keys]
        )
        heads: builtins.list[memoryview | bytes | None] = []
        for (inline, manifest), target in zip(replies, targets):
            if inline is not None:
                heads.append(fill_into(inline, target))
            else:
                heads.append(manifest)
        return heads

    async def _plan_parted(
        self, index: int, key: bytes, raw: bytes, target: memoryview | None
    ) -> _Parted | None:
        """Where a parted value will be read to; ``None`` (a miss, the entry dropped)
        when its manifest is not one of ours."""
        try:
            manifest = Manifest.parse(raw, self.name)
        except IntegrityError as exc:
            log.warning("%s: dropping %r: %s", self._server, key, exc)
            await self._drop_broken(key, raw)
            return None
        if target is not None and len(target) >= manifest.length:
            destination = target[: manifest.length]
        else:
            destination = memoryview(bytearray(manifest.length))
        return _Parted(index, key, manifest, raw, destination)

    async def _read_parts(self, parted: builtins.list[_Parted]) -> None:
        """Fetch every part of every parted value in parallel, one part per pipeline,
        straight into each value's destination; mark values with a missing part."""
        jobs = [
            (entry, name, span)
            for entry in parted
            for name, span in zip(
                entry.manifest.part_keys(self._names.part_prefix(entry.key)),
                entry.manifest.spans(),
            )
        ]
        arrived = await gather_all(
            [
                self._threads.run(self._fetch_part, name, entry.destination, span)
                for entry, name, span in jobs
            ]
        )
        for (entry, _, _), ok in zip(jobs, arrived):
            entry.complete = entry.complete and ok

    def _fetch_part(self, name: bytes, destination: memoryview, span: tuple[int, int]) -> bool:
        """On a worker thread: GET one part into its place; False if absent or the wrong size."""
        offset, length = span
        (part,) = self._execute([("GET", name)])
        if part is None or len(part) != length:
            return False
        destination[offset : offset + length] = part
        return True

    async def _drop_broken(self, key: bytes, raw_manifest: bytes) -> None:
        """Remove an entry whose manifest is unreadable or whose parts are gone (evicted
        or expired), unless a writer replaced it meanwhile; the read is a miss."""
        command = (
            "EVAL",
            DROP_IF_CURRENT,
            1,
            self._names.manifest(key),
            raw_manifest,
            self._names.part_prefix(key),
        )
        await self._pipelines([command])


class RedissDriver(RedisDriver):
    """The ``rediss://`` driver: the same over TLS."""

    config_type: ClassVar[type[DriverConfig]] = RedissConfig


def _spread(weights: builtins.list[int], threads: int) -> builtins.list[builtins.list[int]]:
    """Positions ``0..len(weights)-1`` cut into consecutive groups of about equal weight
    (bytes), one pipeline each: one group per SPREAD_BYTES of weight, at most one per
    thread, and at least enough that no group holds more than PIPELINE_KEYS positions."""
    count = len(weights)
    total = sum(weights)
    groups = max(-(-count // PIPELINE_KEYS), min(threads, count, -(-total // SPREAD_BYTES)), 1)
    share = (total + count) / groups
    cuts: builtins.list[builtins.list[int]] = [[]]
    filled = 0.0
    for position, weight in enumerate(weights):
        if cuts[-1] and (filled >= share * len(cuts) or len(cuts[-1]) >= PIPELINE_KEYS):
            cuts.append([])
        cuts[-1].append(position)
        filled += weight + 1
    return cuts


def _take(names: Iterator[bytes], count: int) -> builtins.list[bytes]:
    return list(islice(names, count))
