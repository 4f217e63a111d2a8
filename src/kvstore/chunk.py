"""The self-describing chunk format (docs/chunk-format.md, version 1).

Every tier stores a chunk as one value: a fixed-layout header, then the
payload. The header names the chunk's key, dtype, shape, codec stack, payload
length and a digest of the payload, and ends with a checksum of itself.
``decode_chunk`` verifies all of it before a byte of KV reaches the caller, so
corrupt, truncated or foreign bytes raise IntegrityError and are never
mistaken for KV.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from typing_extensions import Buffer

from kvstore.buffers import byte_view
from kvstore.codecs import ByteCodec, ChunkContext, Codec, KeyRing, TensorCodec, codec_by_id
from kvstore.codecs.base import check_order
from kvstore.digest import copy_with_digest, payload_digest, tensor_pieces
from kvstore.dtypes import DTYPE_CODES
from kvstore.errors import ConfigError, IntegrityError, InvalidArgumentError
from kvstore.host_copy import copy_into
from kvstore.layout import DTYPE_NAMES, DTYPES, KVLayout

MAGIC = b"KVSC"
FORMAT_VERSION = 1
HEADER_ALIGN = 64
FLAG_MLA = 1
FLAG_BLOCK_DIGEST = 2
"""The payload digest is over 1 MiB blocks (``kvstore.digest``); every chunk this
version writes sets it. Without it, the digest is the xxh3-128 of the payload."""
FLAG_UNHASHED = 4
"""The payload digest was not computed (the digest field is zero): only a raw
chunk in memory of the process that wrote it, on a tier that does not verify,
is written so; every copy of it to another tier computes the digest first
(``hashed_chunk``). A reader that verifies rejects it."""

# magic, version, header length, flags, dtype code, ndim, codec count, reserved,
# payload length, raw length, payload digest (xxh3-128), chunk key (32 bytes)
_FIXED = struct.Struct("<4sHHIBBBBQQ16s32s")
_CHECKSUM = struct.Struct("<I")

_DTYPE_BY_CODE = {code: name for name, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class ChunkHeader:
    """The decoded header of a chunk."""

    key: bytes
    dtype: str
    shape: tuple[int, ...]
    codec_ids: tuple[int, ...]
    payload_len: int
    raw_len: int
    digest: bytes
    mla: bool
    header_len: int
    block_digest: bool = True
    hashed: bool = True


def header_length(ndim: int, ncodecs: int) -> int:
    """Bytes of header for a tensor of ``ndim`` dims and ``ncodecs`` codecs."""
    used = _FIXED.size + 4 * ndim + 2 * ncodecs + _CHECKSUM.size
    return -(-used // HEADER_ALIGN) * HEADER_ALIGN


def _pack_header(
    buffer: memoryview,
    *,
    key: bytes,
    dtype: str,
    shape: Sequence[int],
    codec_ids: Sequence[int],
    payload_len: int,
    raw_len: int,
    digest: bytes | None,
    mla: bool,
) -> None:
    """Write a header into ``buffer``; ``digest=None`` marks the chunk unhashed."""
    size = len(buffer)
    flags = FLAG_BLOCK_DIGEST | (FLAG_MLA if mla else 0) | (FLAG_UNHASHED if digest is None else 0)
    buffer[:size] = bytes(size)
    _FIXED.pack_into(
        buffer,
        0,
        MAGIC,
        FORMAT_VERSION,
        size,
        flags,
        DTYPE_CODES[dtype],
        len(shape),
        len(codec_ids),
        0,
        payload_len,
        raw_len,
        bytes(16) if digest is None else digest,
        key,
    )
    struct.pack_into(f"<{len(shape)}I", buffer, _FIXED.size, *shape)
    struct.pack_into(f"<{len(codec_ids)}H", buffer, _FIXED.size + 4 * len(shape), *codec_ids)
    _CHECKSUM.pack_into(buffer, size - _CHECKSUM.size, xxhash.xxh32_intdigest(buffer[: size - 4]))


def raw_chunk_size(kv: torch.Tensor) -> int:
    """Bytes of a chunk of ``kv`` encoded with no codecs."""
    return header_length(kv.dim(), 0) + kv.numel() * kv.element_size()


def encode_chunk(
    key: bytes,
    kv: torch.Tensor,
    *,
    mla: bool = False,
    codecs: Sequence[Codec] = (),
    out: torch.Tensor | None = None,
    digest: bool = True,
) -> memoryview:
    """Serialise one chunk of KV (any strides, on CPU) with its header.

    With no codecs the payload is written straight from ``kv`` into ``out``
    (a uint8 tensor of at least ``raw_chunk_size(kv)`` bytes, e.g. from a
    BufferPool or room a driver lends; a new one when omitted), hashed block
    by block as it is copied: one pass over memory, on several threads. Device
    KV goes to ``out`` in one device-to-host copy (DMA, when ``out`` is pinned),
    then is hashed. The result is a view of the encoded bytes. A stack that
    starts with a quantizer also takes device KV: it is quantized there and
    only the codes cross to host. ``digest=False`` (raw chunks only) copies
    without hashing and marks the chunk unhashed (``FLAG_UNHASHED``): for a
    tier of this process's memory that does not verify, where the digest would
    be computed for nobody.
    """
    check_order(codecs)
    quantizer = codecs[0] if codecs and isinstance(codecs[0], TensorCodec) else None
    if kv.device.type != "cpu" and quantizer is None and (codecs or out is None):
        raise InvalidArgumentError(
            "encode_chunk takes device KV only into out or with a quantizer first"
        )
    if kv.dtype not in DTYPE_NAMES:
        raise InvalidArgumentError(f"unsupported KV dtype {kv.dtype}")
    dtype = DTYPE_NAMES[kv.dtype]
    shape = tuple(kv.shape)
    context = ChunkContext(key, dtype, shape, mla, tuple(c.id for c in codecs))
    raw_len = kv.numel() * kv.element_size()
    size = header_length(len(shape), len(codecs))
    if not digest and codecs:
        raise InvalidArgumentError("only a raw chunk (no codecs) is stored unhashed")
    payload_hash: bytes | None
    if not codecs:
        if out is None:
            out = torch.empty(size + raw_len, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() < size + raw_len or not out.is_contiguous():
            raise InvalidArgumentError(
                f"out must be a contiguous uint8 tensor of >= {size + raw_len} bytes"
            )
        view = byte_view(out)[: size + raw_len]
        payload: memoryview | bytes = view[size:]
        pieces = tensor_pieces(kv) if digest else None
        if pieces is None:
            if raw_len:
                copy_into(out[size : size + raw_len].view(kv.dtype).view(shape), kv)
            payload_hash = payload_digest(payload) if digest else None
        else:
            payload_hash = copy_with_digest(
                out[size : size + raw_len].numpy(), pieces, "into_payload"
            )
    else:
        data: Buffer = quantizer.encode_tensor(kv) if quantizer else byte_view(kv.contiguous())
        for codec in codecs[1:] if quantizer else codecs:
            assert isinstance(codec, ByteCodec)
            data = codec.encode(memoryview(data).cast("B"), context)
        payload = memoryview(data).cast("B")
        view = memoryview(bytearray(size + len(payload)))
        view[size:] = payload
        payload_hash = payload_digest(payload)
    _pack_header(
        view[:size],
        key=key,
        dtype=dtype,
        shape=shape,
        codec_ids=[c.id for c in codecs],
        payload_len=len(payload),
        raw_len=raw_len,
        digest=payload_hash,
        mla=mla,
    )
    return view


def hashed_chunk(value: memoryview, out: torch.Tensor) -> memoryview:
    """An unhashed chunk (``FLAG_UNHASHED``) copied into ``out`` (a contiguous
    uint8 tensor of at least ``len(value)`` bytes) with its digest computed in
    the same pass: the form in which it may leave the memory it was written to.
    Returns the view of ``out`` holding it."""
    header = read_header(value)
    if header.hashed:
        raise InvalidArgumentError("the chunk already carries its digest")
    if out.dtype != torch.uint8 or out.numel() < len(value) or not out.is_contiguous():
        raise InvalidArgumentError(
            f"out must be a contiguous uint8 tensor of >= {len(value)} bytes"
        )
    size = header.header_len
    view = byte_view(out)[: len(value)]
    source = np.frombuffer(value, dtype=np.uint8)[size:]
    digest = copy_with_digest(out[size : len(value)].numpy(), [source], "into_payload")
    _pack_header(
        view[:size],
        key=header.key,
        dtype=header.dtype,
        shape=header.shape,
        codec_ids=header.codec_ids,
        payload_len=header.payload_len,
        raw_len=header.raw_len,
        digest=digest,
        mla=header.mla,
    )
    return view


def read_header(data: memoryview) -> ChunkHeader:
    """Parse and check a chunk's header; IntegrityError if it is not a valid one."""
    if len(data) < _FIXED.size:
        raise IntegrityError(f"chunk of {len(data)} bytes is shorter than a header")
    (
        magic,
        version,
        size,
        flags,
        dtype_code,
        ndim,
        ncodecs,
        _reserved,
        payload_len,
        raw_len,
        digest,
        key,
    ) = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise IntegrityError("not a kvstore chunk (bad magic)")
    if version != FORMAT_VERSION:
        raise IntegrityError(f"chunk format version {version} is not supported")
    if size != header_length(ndim, ncodecs) or size > len(data):
        raise IntegrityError("chunk header length is inconsistent or truncated")
    (checksum,) = _CHECKSUM.unpack_from(data, size - _CHECKSUM.size)
    if checksum != xxhash.xxh32_intdigest(data[: size - _CHECKSUM.size]):
        raise IntegrityError("chunk header checksum mismatch")
    if dtype_code not in _DTYPE_BY_CODE:
        raise IntegrityError(f"chunk has unknown dtype code {dtype_code}")
    shape = struct.unpack_from(f"<{ndim}I", data, _FIXED.size)
    codec_ids = struct.unpack_from(f"<{ncodecs}H", data, _FIXED.size + 4 * ndim)
    return ChunkHeader(
        key=key,
        dtype=_DTYPE_BY_CODE[dtype_code],
        shape=tuple(shape),
        codec_ids=codec_ids,
        payload_len=payload_len,
        raw_len=raw_len,
        digest=digest,
        mla=bool(flags & FLAG_MLA),
        header_len=size,
        block_digest=bool(flags & FLAG_BLOCK_DIGEST),
        hashed=not flags & FLAG_UNHASHED,
    )


def decode_chunk(
    data: Buffer,
    *,
    key: bytes,
    layout: KVLayout,
    tokens: int,
    out: torch.Tensor | None = None,
    verify: bool = True,
    keys: KeyRing | None = None,
) -> torch.Tensor:
    """Verify a stored chunk and return its KV, ``[layers, 2, tokens, heads, dim]``.

    The chunk must carry ``key`` and match ``layout`` and ``tokens``; its
    payload must match its digest (skipped with ``verify=False``, for tiers
    whose bytes never leave this process). With ``out``, the KV is copied into
    it (a quantized chunk is dequantized straight into it, on its device) and
    ``out`` is returned; otherwise the result may be a view of ``data``. A raw
    chunk is verified block by block as it is copied into a host ``out``, so
    ``out`` holds garbage when this raises. ``keys`` decrypt encrypted chunks.
    Raises IntegrityError on any mismatch, a missing or wrong key included.
    """
    header, payload = _checked(data, key, layout, tokens)
    pieces = None
    fused = verify and header.block_digest and header.hashed
    if fused and out is not None and not header.codec_ids and out.dtype == DTYPES[header.dtype]:
        pieces = tensor_pieces(out)
    if pieces is not None and header.raw_len == len(payload) == layout.nbytes(tokens):
        digest = copy_with_digest(np.frombuffer(payload, dtype=np.uint8), pieces, "from_payload")
        _check_digest(header, payload, digest, verify=verify)
        assert out is not None
        return out
    _check_digest(header, payload, None, verify=verify)
    codecs = [codec_by_id(codec_id, keys) for codec_id in header.codec_ids]
    try:
        check_order(codecs)
    except ConfigError as exc:
        raise IntegrityError(f"chunk has an invalid codec stack: {exc}") from None
    quantizer = codecs[0] if codecs and isinstance(codecs[0], TensorCodec) else None
    context = ChunkContext(key, header.dtype, header.shape, header.mla, header.codec_ids)
    raw: memoryview = payload
    for codec in reversed(codecs[1:] if quantizer else codecs):
        assert isinstance(codec, ByteCodec)
        raw = memoryview(codec.decode(raw, context)).cast("B")
    if header.raw_len != layout.nbytes(tokens) or (
        quantizer is None and len(raw) != header.raw_len
    ):
        raise IntegrityError("decoded chunk has the wrong length")
    if quantizer is not None:
        return quantizer.decode_tensor(raw, context, out)
    dtype = DTYPES[header.dtype]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        source = (
            torch.frombuffer(raw, dtype=torch.uint8)
            if len(raw)
            else torch.empty(0, dtype=torch.uint8)
        )
    kv = source.view(dtype).view(header.shape)
    if out is not None:
        copy_into(out, kv)
        return out
    return kv if not raw.readonly else kv.clone()


def chunk_view(
    data: Buffer, *, key: bytes, layout: KVLayout, tokens: int, verify: bool = True
) -> torch.Tensor | None:
    """The KV of a raw stored chunk as a tensor over ``data`` itself (no copy),
    checked as ``decode_chunk`` checks it; ``None`` for a chunk with codecs,
    which only ``decode_chunk`` can read. Read-only: ``data`` may be memory a
    tier lends, which must not be written."""
    header, payload = _checked(data, key, layout, tokens)
    if header.codec_ids:
        return None
    _check_digest(header, payload, None, verify=verify)
    if header.raw_len != len(payload):
        raise IntegrityError("decoded chunk has the wrong length")
    array = np.frombuffer(payload, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(array) if len(array) else torch.empty(0, dtype=torch.uint8)
    return raw.view(DTYPES[header.dtype]).view(header.shape)


def _checked(
    data: Buffer, key: bytes, layout: KVLayout, tokens: int
) -> tuple[ChunkHeader, memoryview]:
    """A stored chunk's header and payload, once its header, key, layout, token
    count and length are checked (IntegrityError otherwise); the digest is not."""
    view = memoryview(data).cast("B")
    header = read_header(view)
    if header.key != key:
        raise IntegrityError("chunk belongs to another key (foreign or misplaced bytes)")
    expected_shape = layout.shape(tokens)
    if header.dtype != layout.dtype or header.shape != expected_shape or header.mla != layout.mla:
        raise IntegrityError(
            f"chunk holds {header.dtype} {header.shape} (mla={header.mla}), expected "
            f"{layout.dtype} {expected_shape} (mla={layout.mla})"
        )
    end = header.header_len + header.payload_len
    if len(view) != end:
        raise IntegrityError(f"chunk is {len(view)} bytes, its header says {end}")
    return header, view[header.header_len :]


def _check_digest(
    header: ChunkHeader, payload: memoryview, computed: bytes | None, *, verify: bool
) -> None:
    """IntegrityError if ``verify`` and the payload does not match its digest
    (``computed``, else computed here as the header's flags say)."""
    if not verify:
        return
    if not header.hashed:
        raise IntegrityError("chunk carries no payload digest to verify")
    if computed is None:
        computed = (
            payload_digest(payload) if header.block_digest else xxhash.xxh3_128_digest(payload)
        )
    if computed != header.digest:
        raise IntegrityError("chunk payload digest mismatch")
