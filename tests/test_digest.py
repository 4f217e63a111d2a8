"""The block payload digest (docs/chunk-format.md) and the copies fused with it."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import xxhash

from kvstore import digest
from kvstore.chunk import FLAG_BLOCK_DIGEST, decode_chunk, encode_chunk, read_header
from kvstore.digest import (
    DIGEST_BLOCK,
    THREADS,
    copy_with_digest,
    payload_digest,
    side_by_side,
    tensor_pieces,
)
from kvstore.errors import IntegrityError
from kvstore.layout import KVLayout

LAYOUT = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128)
TOKENS = 512
KEY = bytes(range(32))


def spec_digest(payload: bytes) -> bytes:
    """The digest as docs/chunk-format.md defines it."""
    blocks = [payload[i : i + DIGEST_BLOCK] for i in range(0, len(payload), DIGEST_BLOCK)]
    return xxhash.xxh3_128_digest(b"".join(xxhash.xxh3_128_digest(b) for b in blocks or [b""]))


@pytest.mark.parametrize("size", [0, 1, DIGEST_BLOCK - 1, DIGEST_BLOCK, 9 * DIGEST_BLOCK + 7])
def test_digest_matches_the_spec_whatever_the_threads(size: int) -> None:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    expected = spec_digest(payload.tobytes())
    assert payload_digest(payload) == expected
    for threads in (1, 3):
        assert copy_with_digest(payload, [], "none", threads=threads) == expected
    pieces = [payload[: size // 3], payload[size // 3 : size // 2], payload[size // 2 :]]
    copied = np.empty_like(payload)
    assert copy_with_digest(copied, pieces, "into_payload", threads=2) == expected
    assert np.array_equal(copied, payload)
    back = np.zeros_like(payload)
    targets = [back[: size // 3], back[size // 3 : size // 2], back[size // 2 :]]
    assert copy_with_digest(copied, targets, "from_payload", threads=2) == expected
    assert np.array_equal(back, payload)


def test_a_part_run_side_by_side_stays_on_its_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One of ``THREADS`` parts copies and hashes on its own thread; alone, a big
    payload is shared out to the digest threads; the digest is the same."""
    payload = np.random.default_rng(1).integers(0, 256, 16 * DIGEST_BLOCK, dtype=np.uint8)
    expected = spec_digest(payload.tobytes())
    shared = []
    pool = digest._pool()

    def counted_pool() -> object:
        shared.append(1)
        return pool

    monkeypatch.setattr(digest, "_pool", counted_pool)
    copied = np.empty_like(payload)
    with side_by_side(THREADS):
        assert copy_with_digest(copied, [payload], "into_payload") == expected
        assert payload_digest(payload) == expected
    assert not shared
    assert np.array_equal(copied, payload)
    assert copy_with_digest(copied, [payload], "into_payload", threads=2) == expected
    assert shared, "threads=2 spreads 16 MiB over the digest threads"


def test_a_strided_chunk_is_encoded_and_decoded_in_one_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(LAYOUT.shape(3 * TOKENS), generator=generator).half()
    kv = wide[:, :, TOKENS : 2 * TOKENS]
    assert tensor_pieces(kv) is not None, "a token slice of 1 MiB slabs is copied slab by slab"
    assert tensor_pieces(wide[:, :, : TOKENS // 2]) is not None, "512 KiB slabs too"
    assert tensor_pieces(wide[:, :, : TOKENS // 8]) is None, "smaller slabs: one copy, then hash"
    data = encode_chunk(KEY, kv)
    header = read_header(memoryview(data))
    assert header.block_digest
    assert header.digest == spec_digest(bytes(data[header.header_len :]))
    out_wide = torch.zeros_like(wide)
    out = out_wide[:, :, :TOKENS]
    decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, out=out)
    assert torch.equal(out, kv)
    assert not out_wide[:, :, TOKENS:].any(), "nothing is written outside out"


def test_a_corrupt_payload_fails_the_fused_copy() -> None:
    kv = torch.randn(LAYOUT.shape(TOKENS)).half()
    data = bytearray(encode_chunk(KEY, kv))
    data[-5] ^= 0x10
    out = torch.zeros(LAYOUT.shape(2 * TOKENS)).half()[:, :, TOKENS:]
    with pytest.raises(IntegrityError, match="digest"):
        decode_chunk(bytes(data), key=KEY, layout=LAYOUT, tokens=TOKENS, out=out)
    decode_chunk(bytes(data), key=KEY, layout=LAYOUT, tokens=TOKENS, out=out, verify=False)


def test_chunks_with_a_whole_payload_digest_still_read() -> None:
    """A chunk written before block digests (flag bit 1 clear) verifies by the old rule."""
    kv = torch.randn(LAYOUT.shape(TOKENS)).half()
    data = bytearray(encode_chunk(KEY, kv))
    header = read_header(memoryview(data))
    (flags,) = struct.unpack_from("<I", data, 8)
    struct.pack_into("<I", data, 8, flags & ~FLAG_BLOCK_DIGEST)
    data[32:48] = xxhash.xxh3_128_digest(bytes(data[header.header_len :]))
    size = header.header_len
    data[size - 4 : size] = struct.pack("<I", xxhash.xxh32_intdigest(bytes(data[: size - 4])))
    assert not read_header(memoryview(data)).block_digest
    out = torch.zeros_like(kv)
    decode_chunk(bytes(data), key=KEY, layout=LAYOUT, tokens=TOKENS, out=out)
    assert torch.equal(out, kv)
    data[-1] ^= 1
    with pytest.raises(IntegrityError, match="digest"):
        decode_chunk(bytes(data), key=KEY, layout=LAYOUT, tokens=TOKENS, out=out)
