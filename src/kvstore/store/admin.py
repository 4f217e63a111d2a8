"""Admin operations over many chunks: clear, move, compress."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.codecs import Codec, codec_stack
from kvstore.errors import (
    InvalidArgumentError,
    KVStoreError,
)
from kvstore.keys import (
    Scope,
    TokenIds,
    default_scope,
    scope_prefix,
)
from kvstore.results import (
    CompressResult,
    MoveResult,
    Progress,
    ProgressCallback,
)
from kvstore.store.encoded import EncodedChunk
from kvstore.store.reads import ReadPipeline
from kvstore.tier import Tier


@dataclass
class Tally:
    """Progress of a long operation, reported through an optional callback."""

    total_chunks: int
    total_bytes: int
    callback: ProgressCallback | None
    done_chunks: int = 0
    done_bytes: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.advance(0, 0)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def advance(self, chunks: int, nbytes: int) -> None:
        self.done_chunks += chunks
        self.done_bytes += nbytes
        if self.callback is not None:
            self.callback(
                Progress(self.done_chunks, self.total_chunks, self.done_bytes, self.total_bytes)
            )


class AdminOperations(ReadPipeline):
    """clear, move and compress, by tokens or by scope."""

    def _resolve(self, scope: Scope | None) -> Scope:
        """``scope``, or the namespace's default (``keys.default_scope``)."""
        return default_scope(self.namespace) if scope is None else scope

    def _scope_prefix(self, scope: Scope | None) -> bytes:
        """What the storage keys of ``scope`` start with."""
        return scope_prefix(self._prefix, self._resolve(scope))

    async def _held(self, tier: Tier, prefix: bytes) -> dict[bytes, int]:
        """Every key ``tier`` holds that starts with ``prefix``, with its size:
        from the index, and from the driver's listing where it can list."""
        held = {key: size for key, size in tier.index.eviction_order() if key.startswith(prefix)}
        if tier.driver.capabilities.listable:
            async for entry in tier.driver.list():
                if entry.key.startswith(prefix):
                    held.setdefault(entry.key, entry.size)
        return held

    async def _selected(
        self, tier: Tier, tokens: TokenIds | None, scope: Scope | None
    ) -> dict[bytes, int]:
        """The chunks of ``tokens`` that ``tier`` holds, or every chunk of ``scope`` in it."""
        if tokens is None:
            return await self._held(tier, self._scope_prefix(scope))
        keys = self.keys(tokens)
        return {
            key: tier.index.size_of(key) or self._chunk_size
            for key, there in zip(keys, await self._in_tier(tier, keys))
            if there
        }

    def _batched(self, held: dict[bytes, int]) -> list[list[bytes]]:
        """Keys in batches of at most ``io_batch_bytes`` (one key at least)."""
        batches: list[list[bytes]] = []
        size = 0
        for key, nbytes in held.items():
            if not batches or size + nbytes > self.config.io_batch_bytes:
                batches.append([])
                size = 0
            batches[-1].append(key)
            size += nbytes
        return batches

    async def _read(self, tier: Tier, keys: list[bytes]) -> list[memoryview | None]:
        """Values of ``keys`` in ``tier``; a failed call reads as misses (and is counted)."""
        try:
            return await tier.call("get_many", tier.driver.get_many(keys))
        except KVStoreError:
            return [None] * len(keys)

    async def _drop(self, tier: Tier, keys: list[bytes]) -> None:
        """Delete ``keys`` from ``tier`` and its index."""
        if keys:
            await tier.delete(keys)

    async def clear(
        self,
        tier: str | None = None,
        *,
        scope: Scope | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Delete the chunks of ``scope`` from one tier (by name) or from all; entries deleted.

        scope: ``namespace``, ``tenant`` or ``all`` (see ``Scope``); by default
        ``tenant`` for a store with a tenant salt, else ``all``. Clearing every
        tier also drops the scope's pins.
        """
        targets = [self._tier(tier)] if tier is not None else self.tiers
        prefix = self._scope_prefix(scope)
        await self.flush()
        held = [(target, await self._held(target, prefix)) for target in targets]
        tally = Tally(
            sum(len(keys) for _, keys in held),
            sum(sum(keys.values()) for _, keys in held),
            progress,
        )
        deleted = 0
        for target, keys in held:
            ordered = list(keys)
            for start in range(0, len(ordered), 1024):
                batch = ordered[start : start + 1024]
                existed = await target.delete(batch)
                deleted += sum(existed)
                tally.advance(len(batch), sum(keys[key] for key in batch))
        if tier is None:
            self._pins.remove_prefix(prefix)
        return deleted

    async def move(
        self,
        source: str,
        target: str,
        tokens: TokenIds | None = None,
        *,
        migrate: bool = False,
        scope: Scope | None = None,
        progress: ProgressCallback | None = None,
    ) -> MoveResult:
        """Copy chunks from one tier to another (``migrate``: and delete them from the source).

        tokens: only the chunks of this prompt that ``source`` holds (e.g. warm
        a prefix from S3 into CPU memory before a burst); by default every chunk
        of ``scope`` in ``source``. Each chunk is verified and encoded with the
        target tier's codecs before it is written; a bad one is dropped from
        the source. The target makes room as for any write (evicting unpinned
        chunks), and a chunk it cannot take stays where it was.
        """
        src, dst = self._tier(source), self._tier(target)
        if src is dst:
            raise InvalidArgumentError("move needs two different tiers")
        held = await self._selected(src, tokens, scope)
        tally = Tally(len(held), sum(held.values()), progress)
        for batch in self._batched(held):
            values = await self._read(src, batch)
            fresh: list[EncodedChunk] = []
            bad: list[bytes] = []
            for key, value in zip(batch, values):
                if value is None:
                    tally.count("failed")
                elif key in dst.index:
                    tally.count("already_there")
                else:
                    encoded = await self._recode_verified(src, key, value, dst.codecs)
                    if encoded is None:
                        bad.append(key)
                    else:
                        fresh.append(EncodedChunk(key, encoded, dst.codecs, None, self._pool))
            await self._write(dst, fresh)
            landed = [chunk for chunk in fresh if chunk.key in dst.index]
            tally.count("copied", len(landed))
            tally.count("bytes_copied", sum(len(chunk.view) for chunk in landed))
            tally.count("failed", len(fresh) - len(landed))
            tally.count("corrupt", len(bad))
            await self._drop(src, bad)
            if migrate:
                moved = [
                    key
                    for key, value in zip(batch, values)
                    if value is not None and key in dst.index
                ]
                await self._drop(src, moved)
                tally.count("removed", len(moved))
            tally.advance(len(batch), sum(held[key] for key in batch))
        counts = tally.counts
        return MoveResult(
            chunks=len(held),
            copied=counts.get("copied", 0),
            already_there=counts.get("already_there", 0),
            corrupt=counts.get("corrupt", 0),
            failed=counts.get("failed", 0),
            removed=counts.get("removed", 0),
            bytes_copied=counts.get("bytes_copied", 0),
        )

    async def compress(
        self,
        tier: str,
        codecs: str,
        tokens: TokenIds | None = None,
        *,
        scope: Scope | None = None,
        progress: ProgressCallback | None = None,
    ) -> CompressResult:
        """Re-encode chunks held by ``tier`` with another codec stack (``zstd:9``, ``raw``).

        tokens / scope select the chunks as for ``move``. Only lossless codecs
        are accepted: a chunk's KV, and so its key, stays the same. Chunks
        already encoded with the stack's codecs are left as they are; the
        tier's configured codecs still apply to new writes.
        """
        target = self._tier(tier)
        stack = self.lossless_stack(codecs)
        held = await self._selected(target, tokens, scope)
        tally = Tally(len(held), sum(held.values()), progress)
        for batch in self._batched(held):
            values = await self._read(target, batch)
            changed: list[tuple[EncodedChunk, int]] = []
            bad: list[bytes] = []
            for key, value in zip(batch, values):
                if value is None:
                    tally.count("failed")
                    continue
                encoded = await self._recode_verified(target, key, value, stack, staying=True)
                if encoded is None:
                    bad.append(key)
                elif encoded is value:
                    tally.count("unchanged")
                else:
                    changed.append(
                        (EncodedChunk(key, encoded, stack, None, self._pool), len(value))
                    )
            for chunk, _ in changed:
                target.forget(chunk.key)
            await self._write(target, [chunk for chunk, _ in changed])
            for chunk, old_size in changed:
                if chunk.key in target.index:
                    tally.count("recoded")
                    tally.count("bytes_before", old_size)
                    tally.count("bytes_after", len(chunk.view))
                else:
                    target.index.add(chunk.key, target.footprint(old_size))
                    tally.count("failed")
            tally.count("corrupt", len(bad))
            await self._drop(target, bad)
            tally.advance(len(batch), sum(held[key] for key in batch))
        counts = tally.counts
        return CompressResult(
            chunks=len(held),
            recoded=counts.get("recoded", 0),
            unchanged=counts.get("unchanged", 0),
            corrupt=counts.get("corrupt", 0),
            failed=counts.get("failed", 0),
            bytes_before=counts.get("bytes_before", 0),
            bytes_after=counts.get("bytes_after", 0),
        )

    def lossless_stack(self, codecs: str) -> tuple[Codec, ...]:
        """The codec stack ``codecs`` names (with this store's encryption keys), which
        must not change KV: what ``compress`` takes."""
        stack = codec_stack(codecs, self._keys)
        lossy = [codec.spec() for codec in stack if not codec.lossless]
        if lossy:
            raise InvalidArgumentError(
                f"compress keeps KV unchanged and takes lossless codecs only, got {lossy}"
            )
        return stack
