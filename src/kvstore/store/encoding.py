"""Chunks encoded once and shared by the writes using them; recoding for another tier."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.chunk import decode_chunk, encode_chunk, hashed_chunk, raw_chunk_size, read_header
from kvstore.codecs import Codec, KeyRing, TensorCodec
from kvstore.errors import (
    IntegrityError,
    InvalidArgumentError,
)
from kvstore.keys import (
    chunk_key_of,
)
from kvstore.layout import KVLayout
from kvstore.store.encoded import EncodedChunk
from kvstore.store.pins import Pinning
from kvstore.tier import Tier


def verified_recode(
    key: bytes,
    value: memoryview,
    codecs: tuple[Codec, ...],
    keys: KeyRing,
    *,
    trusted: bool = False,
    staying: bool = False,
) -> memoryview:
    """Verify a stored chunk of any namespace (its header names its layout) and
    return it encoded with ``codecs``: ``value`` itself when it already is.
    ``keys`` decrypt encrypted chunks. ``trusted``: ``value`` comes from a tier
    that does not verify (memory this process wrote), so its digest is not
    checked and it may be unhashed; such a chunk gets its digest here unless it
    is ``staying`` in the tier it came from."""
    header = read_header(value)
    if len(header.shape) != 5:
        raise IntegrityError(f"chunk header has shape {header.shape}, not a KV chunk")
    layers, _planes, tokens, heads, dim = header.shape
    try:
        layout = KVLayout(layers, heads, dim, header.dtype, header.mla)
    except InvalidArgumentError as exc:
        raise IntegrityError(f"chunk header names no valid layout: {exc}") from None
    kv = decode_chunk(
        value, key=chunk_key_of(key), layout=layout, tokens=tokens, keys=keys, verify=not trusted
    )
    if tuple(header.codec_ids) == tuple(codec.id for codec in codecs) and (
        header.hashed or staying
    ):
        return value
    return encode_chunk(chunk_key_of(key), kv, mla=header.mla, codecs=codecs)


class Encoding(Pinning):
    """Encoding chunks for a tier's codec stack."""

    async def _encode(
        self, key: bytes, kv: torch.Tensor, codecs: tuple[Codec, ...]
    ) -> EncodedChunk:
        """One chunk encoded with ``codecs`` into a pooled buffer (a raw one) or
        memory of its own, on a codec thread (``_encoded``)."""
        return await self._run(self._encoded, key, kv, codecs)

    async def _encode_each(
        self, items: Sequence[tuple[bytes, torch.Tensor]], codecs: tuple[Codec, ...]
    ) -> list[EncodedChunk | BaseException]:
        """``_encode`` of each (key, KV) pair, as one run per core on the codec
        threads (``_run_each``); a chunk that fails to encode gives its
        exception in its place."""

        def encode(item: tuple[bytes, torch.Tensor]) -> EncodedChunk | BaseException:
            try:
                return self._encoded(*item, codecs)
            except Exception as exc:
                return exc

        return await self._run_each(encode, items)

    def _encoded(self, key: bytes, kv: torch.Tensor, codecs: tuple[Codec, ...]) -> EncodedChunk:
        """``_encode`` on the calling thread. Device KV crosses to the host once:
        straight into the pinned pooled buffer, or as quantized codes when the
        stack starts with a quantizer; other stacks copy it to the host first."""
        if codecs and kv.device.type != "cpu" and not isinstance(codecs[0], TensorCodec):
            kv = kv.cpu()
        if codecs:
            view = encode_chunk(chunk_key_of(key), kv, mla=self.layout.mla, codecs=codecs)
            return EncodedChunk(key, view, codecs, None, self._pool)
        buffer = self._pool.acquire(raw_chunk_size(kv))
        try:
            view = encode_chunk(chunk_key_of(key), kv, mla=self.layout.mla, out=buffer)
        except BaseException:
            self._pool.release(buffer)
            raise
        return EncodedChunk(key, view, codecs, buffer, self._pool)

    async def _recode(self, chunk: EncodedChunk, codecs: tuple[Codec, ...]) -> EncodedChunk:
        """The same chunk encoded with another tier's codec stack (its digest is
        checked on the way unless the chunk is ``trusted``), with its digest: an
        unhashed chunk is copied with it computed first."""
        if not read_header(chunk.view).hashed:
            hashed = await self._hashed(chunk)
            try:
                return await self._recode(hashed, codecs)
            finally:
                hashed.release()
        if chunk.codecs == codecs or [c.spec() for c in chunk.codecs] == [c.spec() for c in codecs]:
            return chunk.retain()
        kv = await self._run(
            decode_chunk,
            chunk.view,
            key=chunk_key_of(chunk.key),
            layout=self.layout,
            tokens=self.chunk_tokens,
            verify=not chunk.trusted,
            keys=self._keys,
        )
        return await self._encode(chunk.key, kv, codecs)

    async def _hashed(self, chunk: EncodedChunk) -> EncodedChunk:
        """An unhashed chunk copied into a pooled buffer with its digest computed
        (one pass), so that it may go to another tier."""
        buffer = self._pool.acquire(len(chunk.view))
        try:
            view = await self._run(hashed_chunk, chunk.view, buffer)
        except BaseException:
            self._pool.release(buffer)
            raise
        return EncodedChunk(chunk.key, view, chunk.codecs, buffer, self._pool)

    async def _recode_verified(
        self,
        tier: Tier,
        key: bytes,
        value: memoryview,
        codecs: tuple[Codec, ...],
        *,
        staying: bool = False,
    ) -> memoryview | None:
        """``verified_recode`` off the loop; ``None`` for a bad chunk, which is
        counted. ``staying``: the result goes back to ``tier``."""
        try:
            return await self._run(
                verified_recode,
                key,
                value,
                codecs,
                self._keys,
                trusted=not tier.verify,
                staying=staying,
            )
        except IntegrityError as exc:
            tier.stats.integrity_failures += 1
            tier.note_error("verify", exc)
            return None
