"""The chunk format: round trips, and every kind of bad bytes is an IntegrityError."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.chunk import decode_chunk, encode_chunk, hashed_chunk, raw_chunk_size, read_header
from kvstore.codecs import codec_stack
from kvstore.errors import ConfigError, IntegrityError, InvalidArgumentError
from kvstore.layout import KVLayout

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16)
KEY = bytes(range(32))
TOKENS = 8


def sample_kv(layout: KVLayout = LAYOUT, tokens: int = TOKENS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(layout.shape(tokens), generator=generator).to(layout.torch_dtype)


@pytest.mark.parametrize("codecs", ["raw", "lz4", "zstd", "zstd:9", "lz4+zstd"])
def test_round_trip(codecs: str) -> None:
    kv = sample_kv()
    data = encode_chunk(KEY, kv, codecs=codec_stack(codecs))
    assert torch.equal(decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS), kv)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn", "int8"])
def test_dtypes(dtype: str) -> None:
    layout = KVLayout(2, 2, 8, dtype)
    kv = torch.randn(layout.shape(4)).to(layout.torch_dtype)
    data = encode_chunk(KEY, kv)
    decoded = decode_chunk(data, key=KEY, layout=layout, tokens=4)
    assert torch.equal(decoded.view(torch.uint8), kv.view(torch.uint8))


def test_mla_layout() -> None:
    layout = KVLayout(2, 1, 24, "bfloat16", mla=True)
    kv = sample_kv(layout, 4)
    data = encode_chunk(KEY, kv, mla=True)
    assert read_header(data).mla
    assert torch.equal(decode_chunk(data, key=KEY, layout=layout, tokens=4), kv)
    with pytest.raises(IntegrityError):
        decode_chunk(data, key=KEY, layout=KVLayout(2, 1, 24, "bfloat16"), tokens=4)


def test_strided_source_and_out_buffer() -> None:
    whole = sample_kv(tokens=3 * TOKENS)
    piece = whole[:, :, TOKENS : 2 * TOKENS]
    assert not piece.is_contiguous()
    out = torch.zeros(raw_chunk_size(piece) + 100, dtype=torch.uint8)
    data = encode_chunk(KEY, piece, out=out)
    target = torch.zeros(LAYOUT.shape(TOKENS), dtype=LAYOUT.torch_dtype)
    result = decode_chunk(bytes(data), key=KEY, layout=LAYOUT, tokens=TOKENS, out=target)
    assert result is target and torch.equal(target, piece)


def test_header_is_aligned() -> None:
    data = encode_chunk(KEY, sample_kv())
    assert read_header(data).header_len % 64 == 0


def test_foreign_key_is_rejected() -> None:
    data = encode_chunk(KEY, sample_kv())
    with pytest.raises(IntegrityError, match="another key"):
        decode_chunk(data, key=bytes(32), layout=LAYOUT, tokens=TOKENS)


def test_wrong_layout_is_rejected() -> None:
    data = encode_chunk(KEY, sample_kv())
    with pytest.raises(IntegrityError):
        decode_chunk(data, key=KEY, layout=KVLayout(3, 2, 16, "bfloat16"), tokens=TOKENS)
    with pytest.raises(IntegrityError):
        decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS * 2)


def test_truncated_and_extended_are_rejected() -> None:
    data = bytes(encode_chunk(KEY, sample_kv()))
    for bad in (data[:-1], data[:100], data[:10], b"", data + b"\0"):
        with pytest.raises(IntegrityError):
            decode_chunk(bad, key=KEY, layout=LAYOUT, tokens=TOKENS)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_bit_flip_is_caught(position: int, bit: int) -> None:
    data = bytearray(encode_chunk(KEY, sample_kv(), codecs=codec_stack("lz4")))
    data[position % len(data)] ^= 1 << bit
    with pytest.raises(IntegrityError):
        decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_decode(blob: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode_chunk(blob, key=KEY, layout=LAYOUT, tokens=TOKENS)


def test_verify_off_still_checks_structure() -> None:
    data = bytearray(encode_chunk(KEY, sample_kv()))
    data[-1] ^= 1
    decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, verify=False)
    with pytest.raises(IntegrityError):
        decode_chunk(data[:-1], key=KEY, layout=LAYOUT, tokens=TOKENS, verify=False)


def test_an_unhashed_chunk_is_read_unverified_only_and_hashed_to_leave() -> None:
    whole = sample_kv(tokens=3 * TOKENS)
    piece = whole[:, :, TOKENS : 2 * TOKENS]
    room = torch.zeros(raw_chunk_size(piece), dtype=torch.uint8)
    unhashed = encode_chunk(KEY, piece, out=room, digest=False)
    assert not read_header(unhashed).hashed
    target = torch.zeros(LAYOUT.shape(TOKENS), dtype=LAYOUT.torch_dtype)
    decode_chunk(unhashed, key=KEY, layout=LAYOUT, tokens=TOKENS, out=target, verify=False)
    assert torch.equal(target, piece)
    with pytest.raises(IntegrityError, match="no payload digest"):
        decode_chunk(unhashed, key=KEY, layout=LAYOUT, tokens=TOKENS)

    hashed = hashed_chunk(unhashed, torch.zeros(len(unhashed) + 64, dtype=torch.uint8))
    assert bytes(hashed) == bytes(encode_chunk(KEY, piece)), "the same bytes as hashed on store"
    assert torch.equal(decode_chunk(hashed, key=KEY, layout=LAYOUT, tokens=TOKENS), piece)
    with pytest.raises(InvalidArgumentError):
        hashed_chunk(hashed, torch.zeros(len(hashed), dtype=torch.uint8))
    with pytest.raises(InvalidArgumentError):
        encode_chunk(KEY, piece, codecs=codec_stack("lz4"), digest=False)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        encode_chunk(KEY, sample_kv(), out=torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ConfigError):
        codec_stack("gzip")
    with pytest.raises(ConfigError):
        codec_stack("zstd:99")


def test_the_dtype_table_agrees_with_torch() -> None:
    from kvstore.dtypes import KV_DTYPES

    assert len({dtype.code for dtype in KV_DTYPES}) == len(KV_DTYPES)
    for dtype in KV_DTYPES:
        assert getattr(torch, dtype.name).itemsize == dtype.itemsize, dtype.name
