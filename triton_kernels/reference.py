"""Torch implementations of every kernel: the CPU path, and the oracle for the Triton kernels.

Each function has the signature of its Triton twin in ``.kernels`` and
computes the same fp32 arithmetic in the same order (divisions correctly
rounded, rounding as ``floor(x + 0.5)``), so integer codes match exactly.
Work is vectorised over tokens, heads and channels; the only Python loops
run over layers and planes, which also bounds temporaries to one layer, and,
for host caches whose slots come in runs within a block (whole blocks, as
engines lay out prompts), over those runs: a run is one slice copy, cheaper
than indexing every token.
"""

from __future__ import annotations

import torch

from .formats import (
    DEFAULT_GROUP_SIZE,
    FP8_LIMIT,
    INT8_LIMIT,
    QuantizedKV,
    QuantScheme,
    check_dequantize_out,
    check_kv,
    empty_quantized,
)
from .paged import PagedKVCache, check_slots

MIN_RUN_TOKENS = 16
"""Average tokens a run of slots needs for gather and scatter on the host to copy
run by run rather than index token by token."""

_FP32_SLACK = 2.0**-20
"""Relative slack for fp32 rounding in the error bounds (a few ulps of 2**-24)."""


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by ones, so an all-zero row divides cleanly to zero."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _token_groups(tokens: int, group_size: int, device: torch.device) -> torch.Tensor:
    return torch.div(torch.arange(tokens, device=device), group_size, rounding_mode="floor")


def _group_minmax(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of ``x`` [tokens, heads, dim] over ``group_size``-token groups."""
    tokens = x.shape[0]
    whole = tokens // group_size * group_size
    lows, highs = [], []
    if whole:
        low, high = torch.aminmax(x[:whole].reshape(-1, group_size, *x.shape[1:]), dim=1)
        lows.append(low)
        highs.append(high)
    if whole < tokens:
        low, high = torch.aminmax(x[whole:], dim=0, keepdim=True)
        lows.append(low)
        highs.append(high)
    if not lows:
        empty = x.new_empty((0, *x.shape[1:]))
        return empty, empty
    return torch.cat(lows), torch.cat(highs)


def _asymmetric_codes(
    x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, levels: int
) -> torch.Tensor:
    return torch.floor((x - zero) / _nonzero(scale) + 0.5).clamp_(0, levels)


def _store_codes(q: QuantizedKV, layer: int, plane: int, codes: torch.Tensor) -> None:
    """Write float codes into ``q.data``, two a byte for packed schemes (even channel low)."""
    target = q.data[layer, plane]
    if q.scheme.packed:
        low = codes[..., 0::2].to(torch.uint8)
        high = codes[..., 1::2].to(torch.uint8)
        target.copy_(low | (high << 4))
    else:
        target.copy_(codes)


def _codes(q: QuantizedKV, layer: int) -> torch.Tensor:
    """Layer ``layer``'s codes as fp32 [planes, tokens, heads, head_dim] (unpacked)."""
    data = q.data[layer]
    if q.scheme.packed:
        data = torch.stack((data & 15, data >> 4), dim=-1).flatten(-2)
    return data.float()


def _quantize_layer(x: torch.Tensor, q: QuantizedKV, layer: int) -> None:
    """Quantize one layer's KV ``x`` [planes, tokens, heads, dim] into ``q``'s layer ``layer``."""
    values = x.float()
    if q.scheme.symmetric:
        limit = INT8_LIMIT if q.scheme is QuantScheme.INT8 else FP8_LIMIT
        scale = values.abs().amax(dim=-1) / limit
        scaled = values / _nonzero(scale)[..., None]
        if q.scheme is QuantScheme.INT8:
            q.data[layer].copy_(torch.floor(scaled + 0.5).clamp_(-limit, limit))
        else:
            q.data[layer].copy_(scaled.clamp_(-limit, limit))
        q.params["scale"][layer].copy_(scale)
        return
    levels = q.scheme.levels
    keys = values[0]
    key_low, key_high = _group_minmax(keys, q.group_size)
    key_scale = (key_high - key_low) / levels
    groups = _token_groups(keys.shape[0], q.group_size, keys.device)
    _store_codes(q, layer, 0, _asymmetric_codes(keys, key_low[groups], key_scale[groups], levels))
    q.params["key_scale"][layer].copy_(key_scale)
    q.params["key_zero"][layer].copy_(key_low)
    if values.shape[0] == 2:
        low, high = torch.aminmax(values[1], dim=-1)
        scale = (high - low) / levels
        codes = _asymmetric_codes(values[1], low[..., None], scale[..., None], levels)
        _store_codes(q, layer, 1, codes)
        q.params["value_scale"][layer].copy_(scale)
        q.params["value_zero"][layer].copy_(low)


def _dequantize_layer(q: QuantizedKV, layer: int, out: torch.Tensor) -> None:
    """Dequantize ``q``'s layer ``layer`` into ``out`` [planes, tokens, heads, dim]."""
    codes = _codes(q, layer)
    if q.scheme.symmetric:
        out.copy_(codes * q.params["scale"][layer][..., None])
        return
    groups = _token_groups(codes.shape[1], q.group_size, codes.device)
    out[0].copy_(
        codes[0] * q.params["key_scale"][layer][groups] + q.params["key_zero"][layer][groups]
    )
    if codes.shape[0] == 2:
        value_scale = q.params["value_scale"][layer][..., None]
        out[1].copy_(codes[1] * value_scale + q.params["value_zero"][layer][..., None])


def _slot_positions(
    cache: PagedKVCache, slot_mapping: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids, offsets in block) for validated slots."""
    slots = slot_mapping.to(device=cache.device, dtype=torch.int64)
    return torch.div(slots, cache.block_size, rounding_mode="floor"), slots % cache.block_size


Run = tuple[int, int, int, int]
"""A run of consecutive slots within one block: block, offset in it, first token, tokens."""


def _block_runs(cache: PagedKVCache, slot_mapping: torch.Tensor) -> list[Run] | None:
    """The runs of ``slot_mapping`` (validated), when the cache is on the host and
    they average ``MIN_RUN_TOKENS`` tokens or more; else ``None``."""
    tokens = slot_mapping.numel()
    if cache.device.type != "cpu" or tokens < MIN_RUN_TOKENS:
        return None
    size = cache.block_size
    slots: list[int] = slot_mapping.tolist()
    runs: list[Run] = []
    first = 0
    for token in range(1, tokens + 1):
        if token == tokens or slots[token] != slots[token - 1] + 1 or slots[token] % size == 0:
            runs.append((slots[first] // size, slots[first] % size, first, token - first))
            if len(runs) * MIN_RUN_TOKENS > tokens:
                return None
            first = token
    return runs


def _gather_layer(
    cache: PagedKVCache, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor
) -> None:
    for plane, view in enumerate(cache.planes[layer]):
        out[plane] = view[blocks, offsets]


def _gather_runs(cache: PagedKVCache, layer: int, runs: list[Run], out: torch.Tensor) -> None:
    for plane, view in enumerate(cache.planes[layer]):
        for block, offset, first, count in runs:
            out[plane, first : first + count] = view[block, offset : offset + count]


def _scatter_layer(
    chunk: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    for plane, view in enumerate(cache.planes[layer]):
        view[blocks, offsets] = chunk[plane]


def _scatter_runs(chunk: torch.Tensor, cache: PagedKVCache, layer: int, runs: list[Run]) -> None:
    for plane, view in enumerate(cache.planes[layer]):
        for block, offset, first, count in runs:
            view[block, offset : offset + count] = chunk[plane, first : first + count]


def quantize(
    kv: torch.Tensor, scheme: QuantScheme, *, group_size: int = DEFAULT_GROUP_SIZE
) -> QuantizedKV:
    """Quantize a KV chunk [layers, planes, tokens, heads, dim] with ``scheme``."""
    q = empty_quantized(scheme, check_kv(kv), kv.dtype, kv.device, group_size)
    for layer in range(kv.shape[0]):
        _quantize_layer(kv[layer], q, layer)
    return q


def dequantize(q: QuantizedKV, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``q`` into ``out`` (any float dtype, any strides) or a new tensor."""
    target = check_dequantize_out(q, out)
    for layer in range(q.shape[0]):
        _dequantize_layer(q, layer, target[layer])
    return target


def gather(
    cache: PagedKVCache, slot_mapping: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the tokens at ``slot_mapping`` out of ``cache`` into a contiguous-layout chunk."""
    check_slots(slot_mapping, cache.num_slots)
    tokens = slot_mapping.numel()
    if out is None:
        out = torch.empty(cache.chunk_shape(tokens), dtype=cache.dtype, device=cache.device)
    else:
        cache.check_chunk(out, tokens, "out")
    runs = _block_runs(cache, slot_mapping)
    if runs is not None:
        for layer in range(cache.num_layers):
            _gather_runs(cache, layer, runs, out[layer])
        return out
    blocks, offsets = _slot_positions(cache, slot_mapping)
    for layer in range(cache.num_layers):
        _gather_layer(cache, layer, blocks, offsets, out[layer])
    return out


def scatter(chunk: torch.Tensor, cache: PagedKVCache, slot_mapping: torch.Tensor) -> None:
    """Write ``chunk``'s tokens into ``cache`` at ``slot_mapping`` (ids must be distinct)."""
    check_slots(slot_mapping, cache.num_slots)
    cache.check_chunk(chunk, slot_mapping.numel())
    runs = _block_runs(cache, slot_mapping)
    if runs is not None:
        for layer in range(cache.num_layers):
            _scatter_runs(chunk[layer], cache, layer, runs)
        return
    blocks, offsets = _slot_positions(cache, slot_mapping)
    for layer in range(cache.num_layers):
        _scatter_layer(chunk[layer], cache, layer, blocks, offsets)


def gather_quantize(
    cache: PagedKVCache,
    slot_mapping: torch.Tensor,
    scheme: QuantScheme,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> QuantizedKV:
    """``quantize(gather(cache, slot_mapping), scheme)``, one layer at a time."""
    check_slots(slot_mapping, cache.num_slots)
    shape = cache.chunk_shape(slot_mapping.numel())
    q = empty_quantized(scheme, shape, cache.dtype, cache.device, group_size)
    staging = torch.empty(shape[1:], dtype=cache.dtype, device=cache.device)
    blocks, offsets = _slot_positions(cache, slot_mapping)
    for layer in range(cache.num_layers):
        _gather_layer(cache, layer, blocks, offsets, staging)
        _quantize_layer(staging, q, layer)
    return q


def scatter_dequantize(q: QuantizedKV, cache: PagedKVCache, slot_mapping: torch.Tensor) -> None:
    """``scatter(dequantize(q), cache, slot_mapping)`` in the cache's dtype, one layer at a time."""
    check_slots(slot_mapping, cache.num_slots)
    cache.check_quantized(q, slot_mapping.numel())
    staging = torch.empty(q.shape[1:], dtype=cache.dtype, device=cache.device)
    blocks, offsets = _slot_positions(cache, slot_mapping)
    for layer in range(cache.num_layers):
        _dequantize_layer(q, layer, staging)
        _scatter_layer(staging, cache, layer, blocks, offsets)


def error_bound(q: QuantizedKV, kv: torch.Tensor) -> torch.Tensor:
    """Per-element bound on ``|kv - dequantize(q)|`` with an fp32 ``out``.

    INT8 and KIVI: half a quantization step (``scale / 2``); FP8: one part in
    16 of the value plus half the smallest subnormal step (``scale * 2**-10``).
    Each adds a few fp32 ulps of slack. A narrower ``out`` dtype adds its own
    rounding (half an ulp of float16 or bfloat16) on top.
    """
    magnitude = kv.float().abs()
    if q.scheme.symmetric:
        scale = q.params["scale"][..., None].expand(q.shape)
        if q.scheme is QuantScheme.INT8:
            return scale * (0.5 + _FP32_SLACK) + magnitude * _FP32_SLACK
        return magnitude * (2.0**-4 + _FP32_SLACK) + scale * 2.0**-10
    groups = _token_groups(q.shape[2], q.group_size, q.device)
    scale = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    zero = torch.empty_like(scale)
    scale[:, 0] = q.params["key_scale"][:, groups]
    zero[:, 0] = q.params["key_zero"][:, groups]
    if q.shape[1] == 2:
        scale[:, 1] = q.params["value_scale"][..., None]
        zero[:, 1] = q.params["value_zero"][..., None]
    spread = magnitude + zero.abs() + scale * q.scheme.levels
    return scale * (0.5 + _FP32_SLACK) + spread * _FP32_SLACK
