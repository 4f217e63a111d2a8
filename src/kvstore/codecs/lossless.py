"""Lossless byte codecs: LZ4, Zstandard, and a byte-plane shuffle that helps them on floats."""

from __future__ import annotations

import math
import threading

import lz4.block
import numpy as np
import zstandard
from typing_extensions import Buffer

from kvstore.codecs.base import ByteCodec, ChunkContext
from kvstore.errors import ConfigError, IntegrityError


def decode_limit(context: ChunkContext) -> int:
    """The most bytes any stage of a chunk's codec stack may decode to: room to spare
    over the raw KV for compressed or framed intermediates, far below what a corrupt
    or hostile size field can claim."""
    return 2 * context.itemsize * math.prod(context.shape) + 4096


class Lz4Codec(ByteCodec):
    """LZ4 block compression: fast, modest ratios on KV."""

    id = 1
    name = "lz4"

    def encode(self, data: memoryview, context: ChunkContext) -> Buffer:
        compressed: bytes = lz4.block.compress(data, store_size=True)
        return compressed

    def decode(self, data: memoryview, context: ChunkContext) -> Buffer:
        claimed = int.from_bytes(data[:4], "little")
        if len(data) < 4 or claimed > decode_limit(context):
            raise IntegrityError(f"lz4 payload claims {claimed} bytes, more than a chunk holds")
        try:
            decompressed: bytes = lz4.block.decompress(data)
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise IntegrityError(f"lz4 payload does not decode: {exc}") from None
        return decompressed


class ZstdCodec(ByteCodec):
    """Zstandard compression at a chosen level (the level is not needed to decode).

    zstandard's compressor and decompressor objects are not thread safe, and
    the store runs codecs on a thread pool: each thread gets its own pair.
    """

    id = 2
    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        if not -7 <= level <= 22:
            raise ConfigError(f"zstd level must be in [-7, 22], got {level}")
        self.level = level
        self._local = threading.local()

    @property
    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
            self._local.compressor = compressor
        return compressor

    @property
    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            self._local.decompressor = decompressor
        return decompressor

    def encode(self, data: memoryview, context: ChunkContext) -> Buffer:
        return self._compressor.compress(data)

    def decode(self, data: memoryview, context: ChunkContext) -> Buffer:
        limit = decode_limit(context)
        try:
            claimed = zstandard.frame_content_size(data)
            if claimed > limit:
                raise IntegrityError(
                    f"zstd payload claims {claimed} bytes, more than a chunk holds"
                )
            return self._decompressor.decompress(data, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd payload does not decode: {exc}") from None

    def spec(self) -> str:
        return f"zstd:{self.level}"


class ShuffleCodec(ByteCodec):
    """Byte-plane transpose by the chunk's element size (the header's dtype).

    The bytes of each element are regrouped so that all first bytes come
    first, then all second bytes, and so on. For float16 and bfloat16 KV the
    plane of high bytes (sign, exponent, top mantissa bits) is far more
    regular than the interleaved stream, so a compressor after it does
    better. Same size in and out; a tail shorter than one element stays put.
    One-byte dtypes pass through unchanged.
    """

    id = 3
    name = "shuffle"

    def encode(self, data: memoryview, context: ChunkContext) -> Buffer:
        size = context.itemsize
        if size == 1:
            return data
        whole = len(data) // size * size
        source = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(len(data), dtype=np.uint8)
        elements = source[:whole].reshape(-1, size)
        count = len(elements)
        for plane in range(size):  # one strided read per plane: faster than a 2-D transpose
            out[plane * count : (plane + 1) * count] = elements[:, plane]
        out[whole:] = source[whole:]
        return out.data

    def decode(self, data: memoryview, context: ChunkContext) -> Buffer:
        size = context.itemsize
        if size == 1:
            return data
        whole = len(data) // size * size
        source = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(len(data), dtype=np.uint8)
        elements = out[:whole].reshape(-1, size)
        count = len(elements)
        for plane in range(size):
            elements[:, plane] = source[plane * count : (plane + 1) * count]
        out[whole:] = source[whole:]
        return out.data
