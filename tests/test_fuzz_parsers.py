"""Fuzzing of everything that parses outside input: chunks, driver URLs, store configs.

Whatever the bytes or text, the parsers answer with a value or one of the
typed errors they document, never another exception: chunks read from a
tier (IntegrityError), driver URLs (ConfigError, NotFoundError for an
unknown scheme), store configs from dicts and YAML files (ConfigError).

Examples are derandomized so CI runs the same cases every time; set
``KVSTORE_FUZZ_EXAMPLES`` (default 150 per test) to search further locally.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
import xxhash
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.chunk import decode_chunk, encode_chunk, header_length, read_header
from kvstore.codecs import codec_stack
from kvstore.config import StoreConfig, TierConfig
from kvstore.config_url import DriverConfig, redact_url
from kvstore.digest import payload_digest
from kvstore.errors import ConfigError, IntegrityError, InvalidArgumentError, NotFoundError
from kvstore.layout import KVLayout
from kvstore.registry import default_registry, parse_url

FUZZ = settings(
    max_examples=int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ------------------------------------------------------------------- chunks

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8)
TOKENS = 4
KEY = bytes(range(32))
STACKS = ("raw", "lz4", "zstd", "lz4+zstd", "shuffle+zstd", "int8+lz4", "kivi4")

# Fixed header fields (docs/chunk-format.md): offset and struct format.
HEADER_FIELDS = (
    (4, "<H"),  # format version
    (6, "<H"),  # header length
    (8, "<I"),  # flags
    (12, "<B"),  # dtype code
    (13, "<B"),  # ndim
    (14, "<B"),  # codec count
    (15, "<B"),  # reserved
    (16, "<Q"),  # payload length
    (24, "<Q"),  # raw length
    *((80 + 4 * dim, "<I") for dim in range(5)),  # shape
    (100, "<H"),  # first codec id (inside the shape's padding for raw chunks)
    (102, "<H"),  # second codec id
)


@functools.cache
def valid_chunk(stack: str) -> bytes:
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn(LAYOUT.shape(TOKENS), generator=generator).to(LAYOUT.torch_dtype)
    return bytes(encode_chunk(KEY, kv, codecs=codec_stack(stack)))


def reseal(chunk: bytearray, *, digest: bool) -> bytearray:
    """Make a tampered chunk's header checksum (and payload digest) right again, so
    that decoding gets past them to the checks behind."""
    (size,) = struct.unpack_from("<H", chunk, 6)
    if digest and 80 <= size <= len(chunk):
        chunk[32:48] = payload_digest(bytes(chunk[size:]))
    if 80 <= size <= len(chunk):
        struct.pack_into("<I", chunk, size - 4, xxhash.xxh32_intdigest(bytes(chunk[: size - 4])))
    return chunk


def decode_or_integrity_error(data: bytes) -> None:
    """Decode ``data`` as a chunk: the right KV, or a typed error; never anything else."""
    for out in (None, torch.empty(LAYOUT.shape(TOKENS), dtype=LAYOUT.torch_dtype)):
        try:
            kv = decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, out=out)
        except (IntegrityError, InvalidArgumentError):
            continue
        assert kv.shape == LAYOUT.shape(TOKENS) and kv.dtype == LAYOUT.torch_dtype
    with contextlib.suppress(IntegrityError):
        read_header(memoryview(data))


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    decode_or_integrity_error(data)
    decode_or_integrity_error(valid_chunk("raw")[:80] + data)


@FUZZ
@given(
    st.sampled_from(STACKS),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=8),
)
def test_flipped_bytes(stack: str, flips: list[tuple[int, int]]) -> None:
    chunk = bytearray(valid_chunk(stack))
    for position, mask in flips:
        chunk[position % len(chunk)] ^= mask
    decode_or_integrity_error(bytes(chunk))
    decode_or_integrity_error(bytes(reseal(chunk, digest=True)))


@FUZZ
@given(st.sampled_from(STACKS), st.integers(min_value=0), st.binary(max_size=64))
def test_truncated_and_padded(stack: str, cut: int, tail: bytes) -> None:
    chunk = valid_chunk(stack)
    decode_or_integrity_error(chunk[: cut % len(chunk)])
    decode_or_integrity_error(chunk + tail)


@FUZZ
@given(st.sampled_from(STACKS), st.data())
def test_header_fields_rewritten_and_resealed(stack: str, data: st.DataObject) -> None:
    """Every header field with any value, behind a checksum that matches."""
    chunk = bytearray(valid_chunk(stack))
    for _ in range(data.draw(st.integers(1, 3))):
        offset, fmt = data.draw(st.sampled_from(HEADER_FIELDS))
        value = data.draw(st.integers(0, (1 << (8 * struct.calcsize(fmt))) - 1))
        struct.pack_into(fmt, chunk, offset, value)
    decode_or_integrity_error(bytes(reseal(chunk, digest=data.draw(st.booleans()))))


@FUZZ
@given(st.sampled_from(STACKS), st.binary(max_size=600))
def test_foreign_payload_with_matching_digest(stack: str, payload: bytes) -> None:
    """Any payload, with its length and digest set to match: the codecs must refuse it."""
    chunk = bytearray(valid_chunk(stack))
    size = header_length(5, len(codec_stack(stack)))
    chunk = chunk[:size] + payload
    struct.pack_into("<Q", chunk, 16, len(payload))
    decode_or_integrity_error(bytes(reseal(chunk, digest=True)))


def test_fuzzed_chunks_start_valid() -> None:
    """The fuzzers mutate chunks that decode: so the checks they reach are the later ones."""
    for stack in STACKS:
        chunk = valid_chunk(stack)
        assert decode_chunk(chunk, key=KEY, layout=LAYOUT, tokens=TOKENS).shape == LAYOUT.shape(
            TOKENS
        )
        assert bytes(reseal(bytearray(chunk), digest=True)) == chunk


def zstd_frame_claiming(size: int) -> bytes:
    """A Zstandard frame header that announces ``size`` bytes of content."""
    single_segment_8_byte_size = 0b1110_0000
    return (
        bytes.fromhex("28b52ffd")
        + bytes([single_segment_8_byte_size])
        + struct.pack("<Q", size)
        + b"\x01\x00\x00"
    )


@pytest.mark.parametrize(
    ("stack", "payload"),
    [
        ("lz4", struct.pack("<I", 0xFFFF_FFFF) + bytes(16)),
        ("lz4", struct.pack("<I", 0x7FFF_FFFF) + bytes(16)),
        ("zstd", zstd_frame_claiming(1 << 40)),
        ("zstd", zstd_frame_claiming(1 << 62)),
    ],
    ids=["lz4-4GiB", "lz4-2GiB", "zstd-1TiB", "zstd-4EiB"],
)
def test_payloads_claiming_huge_sizes(stack: str, payload: bytes) -> None:
    """A payload whose codec framing claims far more bytes than the header's raw length
    is refused before anything that large is allocated."""
    chunk = bytearray(valid_chunk(stack))
    size = header_length(5, 1)
    chunk = chunk[:size] + payload
    struct.pack_into("<Q", chunk, 16, len(payload))
    with pytest.raises(IntegrityError):
        decode_chunk(bytes(reseal(chunk, digest=True)), key=KEY, layout=LAYOUT, tokens=TOKENS)


# -------------------------------------------------------------- driver URLs


@functools.cache
def url_schemes() -> dict[str, type[DriverConfig]]:
    """Every registered scheme (plus fsspec variants) and its config class."""
    registry = default_registry()
    schemes = {driver.info.scheme: driver.load().config_type for driver in registry.drivers()}
    schemes.update({f"fsspec+{p}": schemes["fsspec"] for p in ("memory", "file", "s3")})
    return schemes


URL_CHARS = st.text(
    alphabet=st.sampled_from("az09AZ.-_~:/@[]%?#&=+ ;,!$'()*") | st.characters(codec="utf-8"),
    max_size=30,
)
OPTION_VALUES = st.one_of(
    URL_CHARS,
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.sampled_from(["true", "false", "1", "0", "yes", "", "64GiB", "1.5KiB", "1e3", "nan"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(min_value=0, max_value=99).map(lambda n: "9" * n + "TiB"),
)


@st.composite
def driver_urls(draw: st.DrawFn) -> str:
    """``scheme://location?options``: real schemes and option names, any values."""
    scheme = draw(st.sampled_from(sorted(url_schemes())) | URL_CHARS)
    config_type = url_schemes().get(scheme)
    names = sorted(config_type.model_fields) if config_type is not None else []
    name = st.sampled_from(names) | URL_CHARS if names else URL_CHARS
    location = draw(
        st.one_of(
            URL_CHARS,
            st.sampled_from(
                ["", "/tmp/kv", "localhost:6379/0", "user:pw@host:1/2", "[::1]:6379", "bucket"]
            ),
        )
    )
    options = draw(st.lists(st.tuples(name, OPTION_VALUES), max_size=4))
    quoted = draw(st.booleans())
    query = "&".join(
        f"{quote(key) if quoted else key}={quote(value) if quoted else value}"
        for key, value in options
    )
    return f"{scheme}://{location}" + (f"?{query}" if query or draw(st.booleans()) else "")


@FUZZ
@given(driver_urls())
def test_driver_urls_parse_or_raise_config_errors(url: str) -> None:
    scheme = url.partition("://")[0].lower()
    try:
        config = parse_url(url)
    except NotFoundError:
        assert scheme not in url_schemes()
        return
    except ConfigError:
        return
    assert isinstance(config, DriverConfig)
    assert type(config).from_url(config.to_url()) == config
    redact_url(url, type(config).secret_fields)


@FUZZ
@given(st.text(max_size=80))
def test_any_text_as_url(text: str) -> None:
    with contextlib.suppress(ConfigError, NotFoundError):
        parse_url(text)
    redact_url(text, frozenset({"password", "secret"}))


# ------------------------------------------------------------ store configs

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats()
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
TIER_VALUES = st.one_of(
    JSON,
    driver_urls(),
    OPTION_VALUES,
    st.sampled_from(["lru", "fifo", "write-back", "zstd:3", "lz4+zstd", "int8", "zstd:99"]),
)


@st.composite
def tier_mappings(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON | driver_urls())
    names = sorted(TierConfig.model_fields)
    keys = draw(st.lists(st.sampled_from(names) | st.text(max_size=8), max_size=5))
    return {key: draw(TIER_VALUES) for key in ["url", *keys]}


@st.composite
def store_mappings(draw: st.DrawFn) -> Any:
    names = [name for name in sorted(StoreConfig.model_fields) if name != "tiers"]
    keys = draw(st.lists(st.sampled_from(names) | st.text(max_size=8), max_size=4))
    mapping: dict[str, Any] = {key: draw(TIER_VALUES) for key in keys}
    if draw(st.integers(0, 9)):
        mapping["tiers"] = draw(st.lists(tier_mappings(), max_size=3) | JSON)
    return mapping


@FUZZ
@given(store_mappings())
def test_store_config_from_mappings(data: dict[str, Any]) -> None:
    try:
        config = StoreConfig.parse(data)
    except ConfigError:
        return
    assert StoreConfig.parse(config.model_dump()) == config


@FUZZ
@given(store_mappings() | JSON, st.integers(min_value=0), st.booleans())
def test_store_config_from_yaml_files(tmp_path: Path, data: Any, cut: int, truncate: bool) -> None:
    text = yaml.safe_dump(data)
    if truncate:
        text = text[: cut % (len(text) + 1)]
    path = tmp_path / "store.yaml"
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        StoreConfig.from_yaml(path)


@FUZZ
@given(st.text(max_size=120))
def test_any_text_as_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "store.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    with contextlib.suppress(ConfigError):
        StoreConfig.from_yaml(path)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        StoreConfig.from_yaml(tmp_path / "absent.yaml")
