"""Chunk codecs: the transforms a chunk's payload goes through, and their stacks.

A chunk records the ids of the codecs applied to its payload, in the order
they were applied; decoding reverses them. Ids are part of the on-disk
format: never reuse one (docs/codecs.md has the table).

A stack is written ``name[:arg]`` joined by ``+``, e.g. ``int8+zstd:3`` or
``shuffle+zstd+aesgcm:k1``; ``raw`` is the empty stack. A quantizer
(``int8``, ``fp8``, ``kivi8``, ``kivi4[:group]``) may only come first and
encryption (``aesgcm[:key id]``) only last. Quantizers are imported on first
use, so parsing a config does not import torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from kvstore.codecs.base import (
    ByteCodec,
    ChunkContext,
    Codec,
    TensorCodec,
    check_order,
)
from kvstore.codecs.encrypt import DEFAULT_KEY_ID, ENV_KEY, ENV_KEYS, AesGcmCodec, KeyRing
from kvstore.codecs.lossless import Lz4Codec, ShuffleCodec, ZstdCodec
from kvstore.dtypes import DTYPE_SIZES
from kvstore.errors import ConfigError, IntegrityError

QUANTIZERS = ("int8", "fp8", "kivi8", "kivi4")
"""Names of the quantizing (lossy) codecs, ids 4 to 7 in that order."""


def _lossless(cls: type[ByteCodec]) -> Callable[[str], Codec]:
    def build(arg: str) -> Codec:
        if arg:
            raise ConfigError(f"codec {cls.name!r} takes no parameter, got {cls.name}:{arg}")
        return cls()

    return build


def _zstd(arg: str) -> Codec:
    if not arg:
        return ZstdCodec()
    try:
        return ZstdCodec(int(arg))
    except ValueError:
        raise ConfigError(f"zstd level must be an integer, got {arg!r}") from None


def _quantizer(name: str) -> Callable[[str], Codec]:
    def build(arg: str) -> Codec:
        from kvstore.codecs.quantize import QuantizeCodec

        return QuantizeCodec.from_spec(name, arg)

    return build


def _aesgcm(arg: str) -> Codec:
    return AesGcmCodec(arg or DEFAULT_KEY_ID)


_BUILDERS: dict[str, Callable[[str], Codec]] = {
    "lz4": _lossless(Lz4Codec),
    "zstd": _zstd,
    "shuffle": _lossless(ShuffleCodec),
    **{name: _quantizer(name) for name in QUANTIZERS},
    "aesgcm": _aesgcm,
}
_LOSSLESS_BY_ID: dict[int, Codec] = {
    codec.id: codec for codec in (Lz4Codec(), ZstdCodec(), ShuffleCodec())
}
_QUANTIZER_IDS = range(4, 8)


def codec_from_spec(spec: str, keys: KeyRing | None = None) -> Codec:
    """One codec from ``name`` or ``name:arg``; ConfigError for anything unknown.

    ``keys`` binds an ``aesgcm`` codec to a key ring (ConfigError if its key
    id is not there); without it the spec is only checked.
    """
    name, _, arg = spec.strip().partition(":")
    build = _BUILDERS.get(name.strip().lower())
    if build is None:
        raise ConfigError(f"unknown codec {spec!r} (known: raw, {', '.join(_BUILDERS)})")
    codec = build(arg.strip())
    if isinstance(codec, AesGcmCodec) and keys is not None:
        return codec.bind(keys)
    return codec


def codec_stack(specs: str | Sequence[str], keys: KeyRing | None = None) -> tuple[Codec, ...]:
    """Parse ``"raw"``, ``"int8+zstd:3"`` or ``["lz4", ...]``; ConfigError on a bad order."""
    parts = specs.split("+") if isinstance(specs, str) else list(specs)
    stack = tuple(
        codec_from_spec(part, keys) for part in parts if part.strip().lower() not in ("", "raw")
    )
    check_order(stack)
    return stack


def stack_spec(codecs: Sequence[Codec]) -> str:
    return "+".join(codec.spec() for codec in codecs) or "raw"


def lossy_spec(codecs: Sequence[Codec]) -> str:
    """The spec of the stack's quantizer (what ``Namespace.codec`` must name), or ``raw``."""
    return next((codec.spec() for codec in codecs if not codec.lossless), "raw")


@functools.cache
def _quantizer_decoder(codec_id: int) -> Codec:
    from kvstore.codecs.quantize import QuantizeCodec

    return QuantizeCodec.for_id(codec_id)


def codec_by_id(codec_id: int, keys: KeyRing | None = None) -> Codec:
    """The decoder for an id found in a chunk header; IntegrityError if unknown.

    ``keys`` are what an ``aesgcm`` payload may be decrypted with.
    """
    if codec_id in _LOSSLESS_BY_ID:
        return _LOSSLESS_BY_ID[codec_id]
    if codec_id in _QUANTIZER_IDS:
        return _quantizer_decoder(codec_id)
    if codec_id == AesGcmCodec.id:
        return AesGcmCodec(keys=keys)
    raise IntegrityError(f"chunk uses unknown codec id {codec_id}")


__all__ = [
    "DEFAULT_KEY_ID",
    "DTYPE_SIZES",
    "ENV_KEY",
    "ENV_KEYS",
    "QUANTIZERS",
    "AesGcmCodec",
    "ByteCodec",
    "ChunkContext",
    "Codec",
    "KeyRing",
    "Lz4Codec",
    "ShuffleCodec",
    "TensorCodec",
    "ZstdCodec",
    "codec_by_id",
    "codec_from_spec",
    "codec_stack",
    "lossy_spec",
    "stack_spec",
]
