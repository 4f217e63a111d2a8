"""Byte codecs for chunk payloads: lossless compression slots in the chunk format.

A chunk records the ids of the codecs applied to its payload, in the order
they were applied; decoding reverses them. Ids are part of the on-disk
format: never reuse one. Quantizing (lossy) codecs plug into the same table.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import lz4.block
import zstandard

from kvstore.errors import ConfigError, IntegrityError


class Codec(abc.ABC):
    """One reversible transform of payload bytes."""

    id: ClassVar[int]
    name: ClassVar[str]
    lossless: ClassVar[bool] = True

    @abc.abstractmethod
    def encode(self, data: memoryview) -> bytes: ...

    @abc.abstractmethod
    def decode(self, data: memoryview) -> bytes: ...

    def spec(self) -> str:
        """The string that ``codec_from_spec`` turns back into this codec."""
        return self.name


class Lz4Codec(Codec):
    """LZ4 block compression: fast, modest ratios on KV."""

    id = 1
    name = "lz4"

    def encode(self, data: memoryview) -> bytes:
        return bytes(lz4.block.compress(data, store_size=True))

    def decode(self, data: memoryview) -> bytes:
        try:
            return bytes(lz4.block.decompress(data))
        except lz4.block.LZ4BlockError as exc:
            raise IntegrityError(f"lz4 payload does not decode: {exc}") from None


class ZstdCodec(Codec):
    """Zstandard compression at a chosen level (the level is not needed to decode)."""

    id = 2
    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        if not -7 <= level <= 22:
            raise ConfigError(f"zstd level must be in [-7, 22], got {level}")
        self.level = level
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, data: memoryview) -> bytes:
        return self._compressor.compress(data)

    def decode(self, data: memoryview) -> bytes:
        try:
            return self._decompressor.decompress(data)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd payload does not decode: {exc}") from None

    def spec(self) -> str:
        return f"zstd:{self.level}"


_BY_NAME: dict[str, type[Codec]] = {cls.name: cls for cls in (Lz4Codec, ZstdCodec)}
_BY_ID: dict[int, Codec] = {cls.id: cls() for cls in (Lz4Codec, ZstdCodec)}


def codec_from_spec(spec: str) -> Codec:
    """``lz4``, ``zstd`` or ``zstd:9`` to a codec; ConfigError for anything else."""
    name, _, arg = spec.partition(":")
    cls = _BY_NAME.get(name.strip().lower())
    if cls is None:
        raise ConfigError(f"unknown codec {spec!r} (known: raw, {', '.join(_BY_NAME)})")
    if not arg:
        return cls()
    if cls is not ZstdCodec:
        raise ConfigError(f"codec {name!r} takes no parameter, got {spec!r}")
    try:
        return ZstdCodec(int(arg))
    except ValueError:
        raise ConfigError(f"zstd level must be an integer, got {spec!r}") from None


def codec_stack(specs: str | Sequence[str]) -> tuple[Codec, ...]:
    """Parse ``"raw"``, ``"lz4"``, ``"zstd:3"`` or ``["lz4", ...]`` (``+`` joins stacks)."""
    parts = specs.split("+") if isinstance(specs, str) else list(specs)
    return tuple(codec_from_spec(part) for part in parts if part.strip().lower() not in ("", "raw"))


def stack_spec(codecs: Sequence[Codec]) -> str:
    return "+".join(codec.spec() for codec in codecs) or "raw"


def codec_by_id(codec_id: int) -> Codec:
    """The decoder for an id found in a chunk header; IntegrityError if unknown."""
    try:
        return _BY_ID[codec_id]
    except KeyError:
        raise IntegrityError(f"chunk uses unknown codec id {codec_id}") from None
