"""The torch reference implementations of kvstore.triton_kernels (the CPU path and the oracle).

Error bounds checked here (fp32 output, a few fp32 ulps of slack):
int8 ``|x - x'| <= scale / 2`` with ``scale = amax / 127`` per (layer, plane,
token, head); KIVI ``<= scale / 2`` with ``scale = (max - min) / levels`` per
key channel group or value row; fp8 ``<= |x| / 16 + scale * 2**-10`` with
``scale = amax / 448``.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.errors import InvalidArgumentError, NotSupportedError
from kvstore.triton_kernels import (
    Backend,
    PagedKVCache,
    PagedLayout,
    QuantizedKV,
    QuantScheme,
    dequantize,
    error_bound,
    gather,
    gather_quantize,
    quantize,
    scatter,
    scatter_dequantize,
)
from kvstore.triton_kernels import reference as ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def engine_layers(layout: PagedLayout, canonical: torch.Tensor) -> list[object]:
    """Per-layer engine tensors in ``layout`` from canonical [L, P, B, N, H, C] values.

    Built with plain permutes, independently of the package's own plane views.
    """
    layers: list[object] = []
    for layer in canonical:
        _, blocks, size, heads, dim = layer.shape
        if layout is PagedLayout.FLASH_ATTN:
            layers.append(layer.clone())
        elif layout is PagedLayout.FLASHINFER:
            layers.append(layer.permute(1, 0, 2, 3, 4).contiguous())
        elif layout is PagedLayout.CPU_JOINED:
            joined = layer.permute(1, 3, 2, 0, 4).reshape(blocks, heads, size, 2 * dim)
            layers.append(joined.contiguous())
        elif layout is PagedLayout.BHNC:
            layers.append(tuple(plane.transpose(1, 2).contiguous() for plane in layer))
        elif layout is PagedLayout.BNHC:
            layers.append(tuple(plane.clone() for plane in layer))
        else:
            layers.append(layer[0].permute(0, 2, 1, 3).contiguous())
    return layers


def canonical_values(
    layout: PagedLayout, *, layers: int = 2, blocks: int = 5, size: int = 3, heads: int = 3
) -> torch.Tensor:
    planes = 1 if layout is PagedLayout.MLA else 2
    heads = 1 if layout is PagedLayout.MLA else heads
    return torch.randn(layers, planes, blocks, size, heads, 6, dtype=torch.float32)


def kv_values(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, magnitude: float
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * magnitude
    values[..., ::5, :, :] = 0.0  # some all-zero rows
    values[..., 1::7, :, :] = magnitude  # some constant rows
    return values.to(dtype)


@st.composite
def quantization_cases(draw: st.DrawFn) -> tuple[torch.Tensor, QuantScheme, int]:
    scheme = draw(st.sampled_from(list(QuantScheme)))
    planes = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.integers(1, 6)) * 2 if scheme.packed else draw(st.integers(1, 12))
    shape = (
        draw(st.integers(1, 2)),
        planes,
        draw(st.integers(0, 40)),
        1 if planes == 1 else draw(st.integers(1, 3)),
        head_dim,
    )
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    kv = kv_values(shape, dtype, draw(st.integers(0, 2**16)), magnitude)
    return kv, scheme, draw(st.integers(1, 20))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quantization_cases())
def test_round_trip_within_error_bound(case: tuple[torch.Tensor, QuantScheme, int]) -> None:
    kv, scheme, group_size = case
    q = quantize(kv, scheme, group_size=group_size)
    restored = dequantize(q, torch.empty(kv.shape))
    error = (restored - kv.float()).abs()
    assert bool((error <= error_bound(q, kv)).all())
    assert q.shape == tuple(kv.shape)
    assert q.dtype == kv.dtype


def test_int8_scales_and_bound_are_per_token_head() -> None:
    kv = kv_values((2, 2, 9, 3, 16), torch.float32, 1, 5.0)
    q = quantize(kv, QuantScheme.INT8)
    amax = kv.abs().amax(dim=-1)
    assert torch.equal(q.params["scale"], amax / 127)
    assert q.data.dtype == torch.int8
    assert int(q.data.abs().max()) == 127
    error = (dequantize(q, torch.empty(kv.shape)) - kv).abs()
    assert bool((error <= q.params["scale"][..., None] * (0.5 + 1e-5)).all())


def test_fp8_scales_map_amax_to_448() -> None:
    kv = kv_values((1, 2, 7, 2, 8), torch.float16, 2, 3.0)
    q = quantize(kv, QuantScheme.FP8)
    assert q.data.dtype == torch.float8_e4m3fn
    assert torch.equal(q.params["scale"], kv.float().abs().amax(dim=-1) / 448)
    nonzero = q.params["scale"] > 0
    assert torch.equal(
        q.data.float().abs().amax(dim=-1)[nonzero],
        torch.full_like(q.params["scale"][nonzero], 448.0),
    )


@pytest.mark.parametrize("scheme", [QuantScheme.KIVI8, QuantScheme.KIVI4])
def test_kivi_keys_per_channel_groups_values_per_token(scheme: QuantScheme) -> None:
    tokens, group = 11, 4
    kv = kv_values((2, 2, tokens, 3, 8), torch.float32, 3, 2.0)
    q = quantize(kv, scheme, group_size=group)
    assert q.params["key_scale"].shape == (2, 3, 3, 8)  # ceil(11 / 4) groups
    for index, start in enumerate(range(0, tokens, group)):
        keys = kv[:, 0, start : start + group]
        low, high = keys.amin(dim=1), keys.amax(dim=1)
        assert torch.equal(q.params["key_zero"][:, index], low)
        assert torch.equal(q.params["key_scale"][:, index], (high - low) / scheme.levels)
    values = kv[:, 1]
    assert torch.equal(q.params["value_zero"], values.amin(dim=-1))
    assert torch.equal(q.params["value_scale"], (values.amax(-1) - values.amin(-1)) / scheme.levels)


def test_kivi4_packs_even_channel_in_low_nibble() -> None:
    row = torch.tensor([0.0, 15.0, 1.0, 14.0])  # value codes 0, 15, 1, 14 (scale 1, zero 0)
    kv = row.expand(1, 2, 1, 1, 4).clone()
    q = quantize(kv, QuantScheme.KIVI4)
    assert q.data.shape == (1, 2, 1, 1, 2)
    assert q.data[0, 1, 0, 0].tolist() == [0xF0, 0xE1]
    assert torch.equal(dequantize(q), kv)


def test_kivi4_rejects_odd_head_dim() -> None:
    with pytest.raises(InvalidArgumentError, match="even head_dim"):
        quantize(torch.zeros(1, 2, 3, 1, 5), QuantScheme.KIVI4)


@pytest.mark.parametrize("scheme", list(QuantScheme))
def test_mla_latent_quantizes_as_keys(scheme: QuantScheme) -> None:
    kv = kv_values((3, 1, 10, 1, 12), torch.bfloat16, 4, 1.0)
    q = quantize(kv, scheme, group_size=4)
    if not scheme.symmetric:
        assert q.params["value_scale"].shape == (3, 0, 1)
    error = (dequantize(q, torch.empty(kv.shape)) - kv.float()).abs()
    assert bool((error <= error_bound(q, kv)).all())


@pytest.mark.parametrize("tokens", [0, 1])
@pytest.mark.parametrize("scheme", list(QuantScheme))
def test_empty_and_single_token_chunks(tokens: int, scheme: QuantScheme) -> None:
    kv = torch.randn(2, 2, tokens, 2, 4, dtype=torch.float16)
    q = quantize(kv, scheme)
    restored = dequantize(q)
    assert restored.shape == kv.shape
    assert restored.dtype == torch.float16
    assert bool(((restored.float() - kv.float()).abs() <= error_bound(q, kv) + 1e-3).all())


def test_dequantize_into_strided_narrower_out() -> None:
    kv = kv_values((2, 2, 6, 3, 8), torch.float32, 5, 1.0)
    q = quantize(kv, QuantScheme.INT8)
    out = torch.empty(2, 2, 3, 6, 8, dtype=torch.bfloat16).transpose(2, 3)
    assert dequantize(q, out) is out
    assert torch.equal(out, dequantize(q, torch.empty(kv.shape)).to(torch.bfloat16))


def test_zero_and_constant_rows_are_exact() -> None:
    kv = torch.zeros(1, 2, 4, 2, 8)
    kv[0, :, 1] = 3.5
    for scheme in QuantScheme:
        assert torch.equal(dequantize(quantize(kv, scheme), torch.empty(kv.shape)), kv)


def test_bad_kv_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError):
        quantize(torch.zeros(2, 2, 3, 4), QuantScheme.INT8)
    with pytest.raises(InvalidArgumentError):
        quantize(torch.zeros(1, 3, 3, 1, 4), QuantScheme.INT8)
    with pytest.raises(InvalidArgumentError, match="float16"):
        quantize(torch.zeros(1, 2, 3, 1, 4, dtype=torch.int32), QuantScheme.INT8)
    with pytest.raises(InvalidArgumentError, match="group_size"):
        quantize(torch.zeros(1, 2, 3, 1, 4), QuantScheme.KIVI8, group_size=0)


def test_quantized_kv_validates_and_slices_layers() -> None:
    q = quantize(torch.randn(3, 2, 5, 2, 4), QuantScheme.KIVI8, group_size=2)
    layer = q.layer(1)
    assert layer.shape == (1, 2, 5, 2, 4)
    assert torch.equal(layer.data, q.data[1:2])
    assert layer.nbytes * 3 == q.nbytes
    params = dict(q.params)
    params["key_scale"] = params["key_scale"][:, :1]
    with pytest.raises(InvalidArgumentError, match="key_scale"):
        QuantizedKV(q.scheme, q.data, params, q.shape, q.dtype, q.group_size)
    with pytest.raises(InvalidArgumentError, match="codes"):
        QuantizedKV(q.scheme, q.data.to(torch.int8), q.params, q.shape, q.dtype, q.group_size)
    with pytest.raises(InvalidArgumentError, match="parameters"):
        QuantizedKV(QuantScheme.INT8, q.data.to(torch.int8), q.params, q.shape, q.dtype)


@pytest.mark.parametrize("layout", list(PagedLayout))
def test_gather_reads_the_slots_of_every_layout(layout: PagedLayout) -> None:
    canonical = canonical_values(layout)
    cache = PagedKVCache(engine_layers(layout, canonical), layout)
    slots = torch.tensor([4, 0, 14, 7, 9, 1], dtype=torch.int32)
    expected = canonical[:, :, slots // 3, slots % 3]
    assert torch.equal(gather(cache, slots), expected)


@pytest.mark.parametrize("layout", list(PagedLayout))
def test_scatter_writes_only_the_slots_of_every_layout(layout: PagedLayout) -> None:
    canonical = canonical_values(layout)
    cache = PagedKVCache(engine_layers(layout, torch.zeros_like(canonical)), layout)
    slots = torch.tensor([13, 2, 6, 10])
    chunk = canonical[:, :, slots // 3, slots % 3]
    scatter(chunk, cache, slots)
    expected = torch.zeros_like(canonical).flatten(2, 3)
    expected[:, :, slots] = chunk
    assert torch.equal(gather(cache, torch.arange(cache.num_slots)), expected)


@pytest.mark.parametrize("layout", list(PagedLayout))
@pytest.mark.parametrize(
    "runs",
    [
        [(3, 0, 32), (0, 0, 32), (4, 0, 32)],  # whole blocks, out of order
        [(1, 8, 24), (2, 0, 32), (5, 0, 20)],  # a prompt starting mid-block, a partial last one
        [(2, 0, 16), (2, 16, 16)],  # one block in two runs
    ],
)
def test_block_runs_copy_as_indexing_every_token_does(
    layout: PagedLayout, runs: list[tuple[int, int, int]]
) -> None:
    """Slots in runs within blocks take the run-by-run copies on the host; they
    read and write exactly what indexing each token does."""
    canonical = canonical_values(layout, blocks=6, size=32)
    slots = torch.cat([torch.arange(b * 32 + o, b * 32 + o + n) for b, o, n in runs])
    cache = PagedKVCache(engine_layers(layout, canonical), layout)
    assert ref._block_runs(cache, slots) is not None
    expected = canonical.flatten(2, 3)[:, :, slots]
    assert torch.equal(gather(cache, slots), expected)

    empty = PagedKVCache(engine_layers(layout, torch.zeros_like(canonical)), layout)
    scatter(expected, empty, slots)
    written = torch.zeros_like(canonical).flatten(2, 3)
    written[:, :, slots] = expected
    assert torch.equal(gather(empty, torch.arange(empty.num_slots)), written)


def test_scattered_slots_are_indexed_token_by_token() -> None:
    canonical = canonical_values(PagedLayout.BNHC, blocks=6, size=32)
    cache = PagedKVCache(engine_layers(PagedLayout.BNHC, canonical), PagedLayout.BNHC)
    assert ref._block_runs(cache, torch.arange(0, 96, 3)) is None, "runs of one token"
    assert ref._block_runs(cache, torch.arange(8)) is None, "too few tokens to bother"


def test_allocate_matches_engine_shapes() -> None:
    shapes = {
        PagedLayout.FLASH_ATTN: (2, 4, 16, 8, 64),
        PagedLayout.FLASHINFER: (4, 2, 16, 8, 64),
        PagedLayout.CPU_JOINED: (4, 8, 16, 128),
    }
    for layout, shape in shapes.items():
        cache = PagedKVCache.allocate(
            layout, num_layers=2, num_blocks=4, block_size=16, num_heads=8, head_dim=64
        )
        assert isinstance(cache.layers[0], torch.Tensor)
        assert tuple(cache.layers[0].shape) == shape
        assert cache.chunk_shape(3) == (2, 2, 3, 8, 64)
    mla = PagedKVCache.allocate(
        "mla", num_layers=1, num_blocks=2, block_size=4, num_heads=1, head_dim=576
    )
    assert mla.chunk_shape(1) == (1, 1, 1, 1, 576)
    with pytest.raises(InvalidArgumentError, match="one latent head"):
        PagedKVCache.allocate(
            "mla", num_layers=1, num_blocks=2, block_size=4, num_heads=2, head_dim=8
        )


def flash_cache(dtype: torch.dtype = torch.float32, head_dim: int = 5) -> PagedKVCache:
    """Two layers of 4 blocks of 3 tokens, 2 heads: 12 slots."""
    layers = [torch.randn(2, 4, 3, 2, head_dim, dtype=dtype) for _ in range(2)]
    return PagedKVCache(layers, "flash_attn")


@pytest.mark.parametrize("bad", [[0, 12], [-1, 3], [11, 12, 40]])
def test_out_of_range_slots_rejected_before_any_write(bad: list[int]) -> None:
    cache = flash_cache()
    before = [layer.clone() for layer in cache.layers]
    slots = torch.tensor(bad)
    chunk = torch.ones(cache.chunk_shape(len(bad)))
    q = quantize(chunk, QuantScheme.INT8)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 12\)"):
        gather(cache, slots)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 12\)"):
        scatter(chunk, cache, slots)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 12\)"):
        gather_quantize(cache, slots, QuantScheme.INT8)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 12\)"):
        scatter_dequantize(q, cache, slots)
    assert all(torch.equal(now, then) for now, then in zip(cache.layers, before))


def test_slot_mapping_must_be_a_1d_integer_tensor() -> None:
    cache = flash_cache()
    bad_mappings: tuple[Any, ...] = (torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0]), [0, 1])
    for bad in bad_mappings:
        with pytest.raises(InvalidArgumentError, match="slot_mapping"):
            gather(cache, bad)


def test_chunk_must_match_the_cache() -> None:
    cache = flash_cache()
    slots = torch.tensor([0, 1])
    with pytest.raises(InvalidArgumentError, match="chunk"):
        scatter(torch.zeros(2, 2, 3, 2, 5), cache, slots)
    with pytest.raises(InvalidArgumentError, match="float16"):
        scatter(torch.zeros(2, 2, 2, 2, 5, dtype=torch.float16), cache, slots)
    with pytest.raises(InvalidArgumentError, match="out"):
        gather(cache, slots, torch.zeros(2, 2, 3, 2, 5))


def test_empty_and_single_slot_mappings() -> None:
    cache = flash_cache()
    assert gather(cache, torch.tensor([], dtype=torch.int64)).shape == (2, 2, 0, 2, 5)
    scatter(torch.zeros(2, 2, 0, 2, 5), cache, torch.tensor([], dtype=torch.int64))
    one = gather(cache, torch.tensor([7]))
    assert torch.equal(one[1, 1, 0], cache.layers[1][1, 2, 1])


@pytest.mark.parametrize("scheme", list(QuantScheme))
def test_fused_paths_equal_their_compositions(scheme: QuantScheme) -> None:
    cache = flash_cache(torch.bfloat16, head_dim=6)
    slots = torch.tensor([11, 3, 5, 0, 8])
    fused = gather_quantize(cache, slots, scheme, group_size=2)
    composed = quantize(gather(cache, slots), scheme, group_size=2)
    assert torch.equal(fused.data.view(torch.uint8), composed.data.view(torch.uint8))
    assert all(torch.equal(fused.params[name], composed.params[name]) for name in fused.params)
    target, expected = flash_cache(torch.bfloat16, 6), flash_cache(torch.bfloat16, 6)
    for mine, theirs in zip(target.layers, expected.layers):
        mine.copy_(theirs)
    scatter_dequantize(fused, target, slots)
    scatter(dequantize(fused, torch.empty(fused.shape, dtype=torch.bfloat16)), expected, slots)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(target.layers, expected.layers))


def test_cache_validation() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown paged layout"):
        PagedKVCache([torch.zeros(2, 1, 1, 1, 1)], "vllm")
    with pytest.raises(InvalidArgumentError, match="at least one layer"):
        PagedKVCache([], PagedLayout.FLASH_ATTN)
    with pytest.raises(InvalidArgumentError, match=r"\(2, B, N, H, C\)"):
        PagedKVCache([torch.zeros(3, 1, 1, 1, 1)], PagedLayout.FLASH_ATTN)
    with pytest.raises(InvalidArgumentError, match="layer 1"):
        PagedKVCache([torch.zeros(2, 2, 4, 1, 8), torch.zeros(2, 3, 4, 1, 8)], "flash_attn")
    with pytest.raises(InvalidArgumentError, match="pair"):
        PagedKVCache([(torch.zeros(2, 1, 4, 8),) * 3], PagedLayout.BHNC)
    with pytest.raises(InvalidArgumentError, match="fp16"):
        PagedKVCache([torch.zeros(2, 2, 4, 1, 8, dtype=torch.int8)], "flash_attn")


def test_backend_selection_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = torch.randn(1, 2, 3, 1, 4)
    expected = ref.quantize(kv, QuantScheme.INT8)
    backends: tuple[Backend, ...] = ("auto", "torch")
    for backend in backends:
        assert torch.equal(quantize(kv, QuantScheme.INT8, backend=backend).data, expected.data)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotSupportedError, match="Triton"):
        quantize(kv, QuantScheme.INT8, backend="triton")
    with pytest.raises(InvalidArgumentError, match="backend"):
        quantize(kv, QuantScheme.INT8, backend=cast(Any, "cuda"))
