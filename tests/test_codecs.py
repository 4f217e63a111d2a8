"""Chunk codecs: every stack round-trips, quantizers stay within their bounds,
order rules hold, encryption turns a wrong key into a miss, and the store runs
per-tier stacks (lossy and encrypted) against real tiers."""

from __future__ import annotations

import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvstore.chunk import decode_chunk, encode_chunk, read_header
from kvstore.cli import main as cli_main
from kvstore.codecs import (
    ENV_KEY,
    ENV_KEYS,
    AesGcmCodec,
    ChunkContext,
    KeyRing,
    ShuffleCodec,
    codec_by_id,
    codec_stack,
    lossy_spec,
    stack_spec,
)
from kvstore.config import StoreConfig
from kvstore.errors import ConfigError, IntegrityError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import AsyncKVStore
from kvstore.triton_kernels import QuantScheme, dequantize, error_bound, quantize

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
TOKENS = 40
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 132))).decode()
RING = KeyRing({"default": bytes(range(32)), "k2": bytes(range(16))})
LOSSLESS = ["raw", "lz4", "zstd", "zstd:9", "shuffle", "shuffle+zstd", "shuffle+lz4", "aesgcm"]
LOSSY = ["int8", "int8+zstd", "fp8", "kivi8", "kivi4", "kivi4+zstd", "kivi4:8+shuffle+zstd"]
ENCRYPTED_LOSSY = ["int8+zstd+aesgcm:k2", "kivi4+aesgcm"]
SCHEMES = {"int8": QuantScheme.INT8, "fp8": QuantScheme.FP8}
SCHEMES |= {"kivi8": QuantScheme.KIVI8, "kivi4": QuantScheme.KIVI4}


def sample_kv(layout: KVLayout = LAYOUT, tokens: int = TOKENS, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(tokens), generator=generator).to(layout.torch_dtype)


def round_trip(spec: str, kv: torch.Tensor, layout: KVLayout = LAYOUT) -> torch.Tensor:
    data = encode_chunk(KEY, kv, mla=layout.mla, codecs=codec_stack(spec, RING))
    return decode_chunk(data, key=KEY, layout=layout, tokens=kv.shape[2], keys=RING)


def reference(spec: str, kv: torch.Tensor) -> torch.Tensor:
    """What the quantizer of ``spec`` reconstructs, computed with the kernels directly."""
    name, _, group = spec.split("+")[0].partition(":")
    q = quantize(kv, SCHEMES[name], group_size=int(group or 32), backend="torch")
    return dequantize(q, backend="torch")


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("spec", LOSSLESS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_lossless_stacks_are_exact(spec: str, dtype: str) -> None:
    layout = KVLayout(2, 2, 16, dtype)
    kv = sample_kv(layout)
    assert torch.equal(round_trip(spec, kv, layout), kv)
    assert lossy_spec(codec_stack(spec)) == "raw"


@pytest.mark.parametrize("spec", LOSSY + ENCRYPTED_LOSSY)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_lossy_stacks_match_the_kernels(spec: str, dtype: str) -> None:
    layout = KVLayout(2, 2, 16, dtype)
    kv = sample_kv(layout)
    decoded = round_trip(spec, kv, layout)
    assert decoded.dtype == kv.dtype and decoded.shape == kv.shape
    assert torch.equal(decoded, reference(spec, kv))


@pytest.mark.parametrize("spec", ["int8+zstd", "kivi4+lz4", "fp8", "shuffle+zstd+aesgcm"])
def test_mla_chunks(spec: str) -> None:
    layout = KVLayout(2, 1, 32, "bfloat16", mla=True)
    kv = sample_kv(layout)
    decoded = round_trip(spec, kv, layout)
    expected = kv if spec.startswith("shuffle") else reference(spec, kv)
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("spec", ["int8", "fp8", "kivi8", "kivi4"])
def test_requantizing_decoded_kv_changes_nothing(spec: str) -> None:
    once = round_trip(spec, sample_kv(KVLayout(2, 2, 64), tokens=64), KVLayout(2, 2, 64))
    assert torch.equal(round_trip(spec, once, KVLayout(2, 2, 64)), once)


def test_decode_into_a_strided_out() -> None:
    whole = torch.zeros(LAYOUT.shape(3 * TOKENS), dtype=torch.float16)
    target = whole[:, :, TOKENS : 2 * TOKENS]
    kv = sample_kv()
    data = encode_chunk(KEY, kv, codecs=codec_stack("kivi8+zstd"))
    result = decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, out=target)
    assert result is target and torch.equal(target, reference("kivi8", kv))
    assert not whole[:, :, :TOKENS].any() and not whole[:, :, 2 * TOKENS :].any()


def test_header_records_the_stack() -> None:
    stack = codec_stack("int8+shuffle+zstd+aesgcm", RING)
    header = read_header(encode_chunk(KEY, sample_kv(), codecs=stack))
    assert header.codec_ids == (4, 3, 2, 8)
    assert header.dtype == "float16" and header.raw_len == LAYOUT.nbytes(TOKENS)
    assert [codec_by_id(i).name for i in (1, 2, 3, 4, 5, 6, 7)] == [
        "lz4",
        "zstd",
        "shuffle",
        "int8",
        "fp8",
        "kivi8",
        "kivi4",
    ]
    with pytest.raises(IntegrityError):
        codec_by_id(9)


def test_quantizers_shrink_kv() -> None:
    kv = sample_kv(KVLayout(2, 2, 128), tokens=64)
    sizes = {
        spec: len(encode_chunk(KEY, kv, codecs=codec_stack(spec)))
        for spec in ("raw", "int8", "kivi4")
    }
    assert sizes["int8"] < 0.6 * sizes["raw"] and sizes["kivi4"] < 0.35 * sizes["raw"]


# ------------------------------------------------------------- error bounds


kv_shapes = st.tuples(
    st.integers(1, 3),
    st.integers(1, 40),
    st.integers(1, 3),
    st.integers(1, 12).map(lambda d: 2 * d),
)


@settings(max_examples=40, deadline=None)
@given(
    shape=kv_shapes,
    mla=st.booleans(),
    seed=st.integers(0, 2**31),
    scale=st.floats(1e-3, 1e3),
)
@example(shape=(1, 14, 3, 16), mla=False, seed=3, scale=3.0)
def test_int8_is_within_half_a_step_per_token_and_head(
    shape: tuple[int, int, int, int], mla: bool, seed: int, scale: float
) -> None:
    layers, tokens, heads, dim = shape
    layout = KVLayout(layers, 1 if mla else heads, dim, "float32", mla=mla)
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(layout.shape(tokens), generator=generator) * scale
    data = encode_chunk(KEY, kv, mla=mla, codecs=codec_stack("int8+zstd"))
    decoded = decode_chunk(data, key=KEY, layout=layout, tokens=tokens)
    half_step = kv.abs().amax(dim=-1, keepdim=True) / 254
    fp32_rounding = (half_step + kv.abs()) * 2**-20
    assert ((decoded - kv).abs() <= half_step + fp32_rounding).all()


@settings(max_examples=30, deadline=None)
@given(
    shape=kv_shapes,
    seed=st.integers(0, 2**31),
    spec=st.sampled_from(["fp8", "kivi8", "kivi4", "kivi4:5", "kivi8:64"]),
)
def test_quantizers_meet_the_kernel_error_bounds(
    shape: tuple[int, int, int, int], seed: int, spec: str
) -> None:
    layers, tokens, heads, dim = shape
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, tokens, heads, dim, generator=generator) * 3
    out = torch.empty_like(kv)
    layout = KVLayout(layers, heads, dim, "float32")
    data = encode_chunk(KEY, kv, codecs=codec_stack(spec))
    decode_chunk(data, key=KEY, layout=layout, tokens=tokens, out=out)
    name, _, group = spec.partition(":")
    q = quantize(kv, SCHEMES[name], group_size=int(group or 32), backend="torch")
    assert ((out - kv).abs() <= error_bound(q, kv)).all()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), dtype=st.sampled_from(["float32", "float16", "int8"]))
def test_shuffle_is_a_permutation_of_any_length(data: bytes, dtype: str) -> None:
    context = ChunkContext(KEY, dtype, (len(data),), False, (3,))
    codec = ShuffleCodec()
    shuffled = bytes(codec.encode(memoryview(data), context))
    assert sorted(shuffled) == sorted(data)
    assert bytes(codec.decode(memoryview(shuffled), context)) == data


def test_shuffle_groups_byte_planes() -> None:
    values = np.array([0x0102, 0x0304, 0x0506], dtype="<u2").tobytes()
    context = ChunkContext(KEY, "float16", (3,), False, (3,))
    assert bytes(ShuffleCodec().encode(memoryview(values), context)) == bytes([2, 4, 6, 1, 3, 5])


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "spec",
    ["zstd+int8", "int8+kivi4", "aesgcm+zstd", "aesgcm+aesgcm:k2", "shuffle+fp8", "gzip"],
)
def test_bad_stacks_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        codec_stack(spec)
    with pytest.raises(ConfigError):
        StoreConfig.parse({"tiers": [{"url": "cpu://", "codecs": spec}]})


@pytest.mark.parametrize("spec", ["int8:4", "fp8:1", "kivi4:0", "kivi4:x", "lz4:1", "aesgcm:a b"])
def test_bad_codec_parameters(spec: str) -> None:
    with pytest.raises(ConfigError):
        codec_stack(spec)


def test_specs_are_canonical() -> None:
    assert stack_spec(codec_stack("KIVI4:32+zstd")) == "kivi4+zstd:3"
    assert stack_spec(codec_stack("kivi4:64 + aesgcm:k2")) == "kivi4:64+aesgcm:k2"
    assert lossy_spec(codec_stack("kivi4:64+zstd")) == "kivi4:64"
    assert stack_spec(codec_stack("raw")) == "raw"


@pytest.mark.parametrize("spec", ["lz4", "shuffle+zstd", "int8+zstd", "kivi4", "aesgcm"])
def test_corruption_is_detected(spec: str) -> None:
    data = bytearray(encode_chunk(KEY, sample_kv(), codecs=codec_stack(spec, RING)))
    header = read_header(memoryview(bytes(data)))
    data[header.header_len + 3] ^= 0x10
    with pytest.raises(IntegrityError):
        decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, keys=RING)


def test_quantized_frame_is_checked_without_the_digest() -> None:
    data = bytearray(encode_chunk(KEY, sample_kv(), codecs=codec_stack("int8")))
    header = read_header(memoryview(bytes(data)))
    data[header.header_len] = 9  # frame version
    with pytest.raises(IntegrityError, match="frame"):
        decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, verify=False)


# ---------------------------------------------------------------- encryption


def test_wrong_missing_or_moved_key_is_an_integrity_error() -> None:
    kv = sample_kv()
    data = encode_chunk(KEY, kv, codecs=codec_stack("zstd+aesgcm", RING))
    with pytest.raises(IntegrityError, match="no encryption key"):
        decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS)
    wrong = KeyRing({"default": bytes(range(1, 33))})
    with pytest.raises(IntegrityError, match="authenticate"):
        decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, keys=wrong)
    other = encode_chunk(OTHER_KEY, kv, codecs=codec_stack("zstd+aesgcm", RING))
    header = read_header(other)
    moved = bytes(other[: header.header_len]) + bytes(data[header.header_len :])
    with pytest.raises(IntegrityError, match="authenticate"):
        decode_chunk(moved, key=OTHER_KEY, layout=LAYOUT, tokens=TOKENS, keys=RING, verify=False)


def test_tampered_ciphertext_fails_even_without_digest() -> None:
    data = bytearray(encode_chunk(KEY, sample_kv(), codecs=codec_stack("aesgcm:k2", RING)))
    data[-20] ^= 1
    with pytest.raises(IntegrityError, match="authenticate"):
        decode_chunk(data, key=KEY, layout=LAYOUT, tokens=TOKENS, keys=RING, verify=False)


def test_every_encryption_uses_a_fresh_nonce() -> None:
    stack = codec_stack("aesgcm", RING)
    first, second = (bytes(encode_chunk(KEY, sample_kv(), codecs=stack)) for _ in range(2))
    assert first != second


def test_keyring_sources_and_secrecy() -> None:
    ring = KeyRing.load({"cfg": KEY_A}, {ENV_KEY: KEY_B, ENV_KEYS: f"k1={KEY_A}, k2={KEY_B}"})
    assert ring.ids == ("cfg", "default", "k1", "k2")
    assert KEY_A not in repr(ring) and KEY_B not in repr(ring)
    with pytest.raises(ConfigError) as excinfo:
        KeyRing.load({"default": KEY_A}, {ENV_KEY: KEY_B})
    assert KEY_A not in str(excinfo.value) and KEY_B not in str(excinfo.value)
    for bad in ("not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ConfigError) as excinfo:
            KeyRing.load({"k": bad}, {})
        assert bad not in str(excinfo.value)
    with pytest.raises(ConfigError):
        KeyRing.load({}, {ENV_KEYS: "no-separator"})
    with pytest.raises(ConfigError, match="no encryption key"):
        codec_stack("aesgcm:k9", ring)
    codec = AesGcmCodec("k1", ring)
    assert KEY_A not in repr(codec) and codec.spec() == "aesgcm:k1"
    config = StoreConfig.parse(
        {"tiers": [{"url": "cpu://", "codecs": "aesgcm:k1"}], "encryption_keys": {"k1": KEY_A}}
    )
    assert KEY_A not in repr(config) and KEY_A not in str(config.model_dump())
    assert config.keyring({}).ids == ("k1",)


# -------------------------------------------------------------------- store


CHUNK = 16
STORE_LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype="bfloat16")


def namespace(codec: str = "raw") -> Namespace:
    return Namespace("test-model", "rev", STORE_LAYOUT, chunk_tokens=CHUNK, codec=codec)


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randn(STORE_LAYOUT.shape(tokens), generator=generator)
    return ids, kv.to(STORE_LAYOUT.torch_dtype)


def store_config(*tiers: Any, **options: Any) -> StoreConfig:
    return StoreConfig.parse({"tiers": list(tiers), "chunk_tokens": CHUNK, **options})


async def test_raw_cpu_tier_over_quantized_nvme_tier(tmp_path: Path) -> None:
    config = store_config(
        "cpu://?capacity=16MiB",
        {"url": f"nvme://{tmp_path}?capacity=16MiB", "codecs": "int8+zstd"},
    )
    assert config.lossy_codec == "int8"
    store = await AsyncKVStore.open(config, namespace("int8"))
    try:
        ids, kv = prompt(1, 3 * CHUNK)
        await store.store(ids, kv)
        exact = await store.retrieve(ids)
        assert exact.kv is not None and torch.equal(exact.kv, kv)
        await store.flush()
        await store.clear(store.tiers[0].name)
        lossy = await store.retrieve(ids)
        assert lossy.chunk_tiers == (store.tiers[1].name,) * 3
        assert lossy.kv is not None and not torch.equal(lossy.kv, kv)
        amax = kv.float().abs().amax(dim=-1, keepdim=True)
        # int8's half step, plus half a bfloat16 ulp of the result
        bound = amax / 254 * 1.001 + lossy.kv.float().abs() * 2**-8
        assert ((lossy.kv.float() - kv.float()).abs() <= bound).all()
        await store.flush()  # the promotion into the raw tier
        promoted = await store.retrieve(ids)
        assert promoted.chunk_tiers == (store.tiers[0].name,) * 3
        assert promoted.kv is not None and torch.equal(promoted.kv, lossy.kv)
    finally:
        await store.close()


async def test_lossy_codec_must_be_in_the_namespace(tmp_path: Path) -> None:
    config = store_config("cpu://?capacity=1MiB", {"url": "cpu://?capacity=1MiB", "codecs": "fp8"})
    with pytest.raises(ConfigError, match="codec='fp8'"):
        await AsyncKVStore.open(config, namespace())
    with pytest.raises(ConfigError):
        await AsyncKVStore.open(store_config("cpu://?capacity=1MiB"), namespace("int8"))
    with pytest.raises(ConfigError, match="different lossy codecs"):
        store_config(
            {"url": "cpu://?capacity=1MiB", "codecs": "int8"},
            {"url": f"nvme://{tmp_path}?capacity=1MiB", "codecs": "kivi4+zstd"},
        )
    int8_layout = Namespace("m", "r", KVLayout(2, 2, 32, "int8"), chunk_tokens=CHUNK, codec="int8")
    with pytest.raises(ConfigError, match="quantizes"):
        await AsyncKVStore.open(
            store_config({"url": "cpu://?capacity=1MiB", "codecs": "int8"}), int8_layout
        )


async def test_lossy_and_raw_stores_never_share_keys(tmp_path: Path) -> None:
    url = f"nvme://{tmp_path}?capacity=16MiB"
    ids, kv = prompt(2, 2 * CHUNK)
    lossy = await AsyncKVStore.open(
        store_config({"url": url, "codecs": "kivi4"}), namespace("kivi4")
    )
    try:
        await lossy.store(ids, kv)
    finally:
        await lossy.close()
    raw = await AsyncKVStore.open(store_config(url), namespace())
    try:
        assert (await raw.lookup(ids)).tokens == 0
    finally:
        await raw.close()


def stored_bytes(directory: Path) -> bytes:
    """Every byte of every file under ``directory``."""
    return b"".join(path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file())


async def test_encrypted_tier_with_the_wrong_key_is_a_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiers = ({"url": f"nvme://{tmp_path}?capacity=16MiB", "codecs": "shuffle+zstd+aesgcm:k1"},)
    ids, kv = prompt(3, 3 * CHUNK)
    writer = await AsyncKVStore.open(
        store_config(*tiers, encryption_keys={"k1": KEY_A}), namespace()
    )
    try:
        await writer.store(ids, kv)
        loaded = await writer.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await writer.close()
    assert kv.view(torch.uint8).numpy().tobytes()[:64] not in stored_bytes(tmp_path)
    monkeypatch.setenv(ENV_KEYS, f"k1={KEY_B}")
    reader = await AsyncKVStore.open(store_config(*tiers), namespace())
    try:
        assert (await reader.lookup(ids)).tokens == 3 * CHUNK
        with caplog.at_level(logging.WARNING):
            missed = await reader.retrieve(ids)
        assert missed.tokens == 0 and missed.kv is None
        assert reader.tiers[0].stats.integrity_failures >= 1
        assert "authenticate" in caplog.text
        assert KEY_A not in caplog.text and KEY_B not in caplog.text
    finally:
        await reader.close()


async def test_encrypted_tier_needs_its_key_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEYS, raising=False)
    config = store_config({"url": "cpu://?capacity=1MiB", "codecs": "aesgcm"})
    with pytest.raises(ConfigError, match="no encryption key"):
        await AsyncKVStore.open(config, namespace())
    monkeypatch.setenv(ENV_KEY, KEY_B)
    store = await AsyncKVStore.open(config, namespace())
    try:
        ids, kv = prompt(4, CHUNK)
        await store.store(ids, kv)
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.equal(loaded.kv, kv)
    finally:
        await store.close()


# --------------------------------------------------------------------- bench


def test_bench_codecs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "codecs.json"
    stacks = "raw,shuffle+zstd,int8+zstd,kivi4,aesgcm"
    code = cli_main(["bench", "codecs", "--quick", "--stacks", stacks, "--json", str(path)])
    assert code == 0
    report = json.loads(path.read_text())
    rows = {row["stack"]: row for row in report["results"]}
    assert list(rows) == stacks.split(",")
    assert rows["raw"]["k_max_err"] == 0 and rows["raw"]["attn_rel_change"] == 0
    assert rows["shuffle+zstd"]["ratio"] > rows["raw"]["ratio"]
    assert rows["kivi4"]["ratio"] > rows["int8+zstd"]["ratio"] > 1.5
    assert 0 < rows["int8+zstd"]["v_rms_err"] < rows["kivi4"]["v_rms_err"]
    assert all(row["encode_gbps"] > 0 and row["decode_gbps"] > 0 for row in rows.values())
    assert "shuffle+zstd" in capsys.readouterr().out


@pytest.mark.gpu
def test_quantizers_run_on_cuda() -> None:
    kv = sample_kv(KVLayout(4, 8, 128, "bfloat16"), tokens=256).cuda()
    layout = KVLayout(4, 8, 128, "bfloat16")
    for spec in ("int8+zstd", "fp8", "kivi8", "kivi4+zstd"):
        stack = codec_stack(spec)
        on_gpu = encode_chunk(KEY, kv, codecs=stack)
        on_cpu = encode_chunk(KEY, kv.cpu(), codecs=stack)
        out = torch.empty_like(kv)
        decode_chunk(on_gpu, key=KEY, layout=layout, tokens=256, out=out)
        expected = decode_chunk(on_cpu, key=KEY, layout=layout, tokens=256)
        # one bfloat16 ulp; fp8 codes may round one e4m3 step apart
        step = 2**-3 if spec == "fp8" else 2**-7
        tolerance = expected.float().abs() * step + 1e-6
        assert ((out.cpu().float() - expected.float()).abs() <= tolerance).all(), spec


def test_one_zstd_codec_serves_many_threads_at_once() -> None:
    """zstandard's objects are not thread safe; the store runs one codec on many threads."""
    codecs = codec_stack("shuffle+zstd")
    layout = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype="float16")
    samples = [sample_kv(layout, tokens=256, seed=seed) for seed in range(8)]

    def round_trips(kv: torch.Tensor) -> bool:
        for _ in range(4):
            data = encode_chunk(KEY, kv, codecs=codecs)
            restored = decode_chunk(data, key=KEY, layout=layout, tokens=256)
            if not torch.equal(restored, kv):
                return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(round_trips, samples))
