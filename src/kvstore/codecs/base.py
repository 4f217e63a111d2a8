"""The codec interfaces: byte codecs, tensor codecs (quantizers) and what they see of a chunk.

A codec stack is applied in order on encode and in reverse on decode. Byte
codecs turn bytes into bytes; a tensor codec (a quantizer) turns the chunk's
KV tensor into bytes and back into a tensor of the header's dtype and shape,
so it can only be the first codec of a stack. Every codec sees the chunk's
``ChunkContext`` (its key, dtype, shape and codec ids, all from the header),
which lets a byte codec group bytes by element size (shuffle) or bind a
ciphertext to its chunk (AES-GCM).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from typing_extensions import Buffer

from kvstore.dtypes import DTYPE_SIZES
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from kvstore.layout import KVLayout


@dataclass(frozen=True)
class ChunkContext:
    """What a codec may know about the chunk it encodes or decodes (all from the header)."""

    key: bytes
    dtype: str
    shape: tuple[int, ...]
    mla: bool
    codec_ids: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


class Codec(abc.ABC):
    """One step of a codec stack. ``id`` is on-disk format: never reuse one.

    ``lossless`` is False for codecs that change KV (quantizers); ``cipher``
    marks encryption, which must be the last step of a stack.
    """

    id: int
    name: str
    lossless: ClassVar[bool] = True
    cipher: ClassVar[bool] = False

    def spec(self) -> str:
        """The canonical string that ``codec_stack`` turns back into this codec."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec()}>"


class ByteCodec(Codec):
    """A reversible transform of payload bytes."""

    @abc.abstractmethod
    def encode(self, data: memoryview, context: ChunkContext) -> Buffer: ...

    @abc.abstractmethod
    def decode(self, data: memoryview, context: ChunkContext) -> Buffer:
        """The bytes ``encode`` was given; IntegrityError if ``data`` is not an encoding."""


class TensorCodec(Codec):
    """A transform of the KV tensor itself into bytes (quantization): always lossy."""

    lossless: ClassVar[bool] = False

    @abc.abstractmethod
    def encode_tensor(self, kv: torch.Tensor) -> Buffer:
        """Encode a chunk ``[layers, planes, tokens, heads, dim]`` on any device to host bytes."""

    @abc.abstractmethod
    def decode_tensor(
        self, data: memoryview, context: ChunkContext, out: torch.Tensor | None
    ) -> torch.Tensor:
        """KV of the context's dtype and shape, written into ``out`` (any device) when given."""

    @abc.abstractmethod
    def check_layout(self, layout: KVLayout) -> None:
        """ConfigError if KV of ``layout`` cannot be encoded with this codec."""


def check_order(codecs: Sequence[Codec]) -> None:
    """ConfigError unless any quantizer comes first and any cipher last (one of each at most).

    A quantizer consumes the KV tensor, so nothing can run before it; the
    output of a cipher is incompressible, so nothing useful can run after it.
    """
    for position, codec in enumerate(codecs):
        if isinstance(codec, TensorCodec) and position != 0:
            raise ConfigError(
                f"quantizer {codec.spec()!r} must be the first codec of a stack, "
                f"got {'+'.join(c.spec() for c in codecs)!r}"
            )
        if codec.cipher and position != len(codecs) - 1:
            raise ConfigError(
                f"encryption {codec.spec()!r} must be the last codec of a stack "
                f"(ciphertext does not compress), got {'+'.join(c.spec() for c in codecs)!r}"
            )
