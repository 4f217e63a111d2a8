# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton kernels for quantize/dequantize and paged gather/scatter (the CUDA path).

Three kernels do all the work; each public function is one or two launches:

* ``_gather_rows`` reads tokens through a slot mapping and writes them to a
  dense chunk as they are, symmetric-quantized (int8, fp8) or asymmetric-
  quantized per token and head (KIVI values);
* ``_gather_channel_groups`` reads the same way and quantizes per channel
  over groups of tokens (KIVI keys);
* ``_scatter_rows`` reads dense rows, dequantizes them if asked, and writes
  them through a slot mapping.

Every (layer, plane) pair is one entry of a table of data pointers, so all
layers go in one launch whatever the engine's per-layer tensors are; strides
come from the tensors, so any layout or view works without a copy. A dense
chunk is the case ``block_size == 1`` with the identity slot mapping.

The arithmetic matches ``.reference`` step for step: ``div_rn`` is the
correctly rounded division torch uses, and launches disable FMA contraction
so ``code * scale + zero`` rounds twice, as in torch. Plane addresses are
hinted to be as aligned as they are (up to 16 bytes), so the compiler emits
128-bit loads and stores.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvstore.errors import InvalidArgumentError

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
from .ops import interpreter_enabled
from .paged import PagedKVCache, check_slots

_COPY = tl.constexpr(0)
"""Both row kernels: move values as they are."""
_INT8 = tl.constexpr(1)
"""``_gather_rows``: symmetric int8 codes."""
_FP8 = tl.constexpr(2)
"""``_gather_rows``: symmetric float8 e4m3 codes."""
_ASYMMETRIC = tl.constexpr(3)
"""``_gather_rows``: asymmetric codes per row (KIVI values)."""
_SCALE = tl.constexpr(1)
"""``_scatter_rows``: write ``code * scale``."""
_SCALE_ZERO = tl.constexpr(2)
"""``_scatter_rows``: write ``code * scale + zero``."""

_TILE = 1 << 16 if interpreter_enabled() else 4096
"""Elements a program handles: small on a GPU (registers), large in the slow interpreter."""

_MAX_ALIGN = 16
"""Bytes of the widest vector load a plane's address alignment is checked for."""

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.int8: tl.int8,
    torch.uint8: tl.uint8,
    torch.float8_e4m3fn: tl.float8e4nv,
}


@triton.jit
def _plane_pointer(table, plane, dtype: tl.constexpr, ALIGN: tl.constexpr = 1):
    """Entry ``plane`` of a pointer table as a typed pointer, ALIGN bytes aligned (for vectors)."""
    pointer = tl.load(table + plane).to(tl.pointer_type(dtype))
    if ALIGN > 1:
        pointer = tl.multiple_of(pointer, ALIGN)
    return pointer


@triton.jit
def _slot_rows(slots, token, num_tokens, block_size, block_stride, offset_stride):
    """Element offsets of each token's row in a paged plane, and which tokens exist."""
    valid = token < num_tokens
    slot = tl.load(slots + token, mask=valid, other=0)
    return (slot // block_size) * block_stride + (slot % block_size) * offset_stride, valid


@triton.jit
def _nonzero(scale):
    return tl.where(scale > 0, scale, 1.0)


@triton.jit
def _store_codes(
    dst,
    rows,
    rows_ok,
    codes,
    dim_stride,
    HEAD_DIM: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr,
):
    """Store a [A, B, D] tile of float codes at ``dst + rows``, two a byte when PACKED."""
    if PACKED:
        low, high = tl.split(tl.reshape(codes.to(tl.uint8), [BLOCK_A, BLOCK_B, BLOCK_D // 2, 2]))
        half = tl.arange(0, BLOCK_D // 2)[None, None, :]
        mask = rows_ok & (half < HEAD_DIM // 2)
        tl.store(dst + rows + half * dim_stride, low | (high << 4), mask=mask)
    else:
        channel = tl.arange(0, BLOCK_D)[None, None, :]
        mask = rows_ok & (channel < HEAD_DIM)
        tl.store(dst + rows + channel * dim_stride, codes.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _gather_rows(
    src_table,
    dst_table,
    scale_table,
    zero_table,
    slots,
    num_tokens,
    block_size,
    src_block_stride,
    src_offset_stride,
    src_head_stride,
    src_dim_stride,
    dst_token_stride,
    dst_head_stride,
    dst_dim_stride,
    param_token_stride,
    param_head_stride,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    SRC_ALIGN: tl.constexpr,
    DST_DTYPE: tl.constexpr,
    DST_ALIGN: tl.constexpr,
    MODE: tl.constexpr,
    LIMIT: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (token blocks, planes, head blocks): slot-addressed rows to dense (quantized) rows."""
    plane = tl.program_id(1)
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    channel = tl.arange(0, BLOCK_D)[None, None, :]
    src_rows, token_ok = _slot_rows(
        slots, token, num_tokens, block_size, src_block_stride, src_offset_stride
    )
    row_ok = token_ok[:, None] & (head < NUM_HEADS)[None, :]
    rows_ok = row_ok[:, :, None]
    mask = rows_ok & (channel < HEAD_DIM)
    src = _plane_pointer(src_table, plane, SRC_DTYPE, SRC_ALIGN)
    offsets = src_rows[:, None, None] + head[None, :, None] * src_head_stride
    x = tl.load(src + offsets + channel * src_dim_stride, mask=mask, other=0.0)
    dst = _plane_pointer(dst_table, plane, DST_DTYPE, DST_ALIGN)
    dst_rows = token[:, None, None] * dst_token_stride + head[None, :, None] * dst_head_stride
    if MODE == _COPY:
        tl.store(dst + dst_rows + channel * dst_dim_stride, x, mask=mask)
    else:
        values = x.to(tl.float32)
        params = token[:, None] * param_token_stride + head[None, :] * param_head_stride
        scale_ptr = _plane_pointer(scale_table, plane, tl.float32)
        if MODE == _ASYMMETRIC:
            low = tl.min(tl.where(mask, values, float("inf")), axis=2)
            high = tl.max(tl.where(mask, values, float("-inf")), axis=2)
            low = tl.where(row_ok, low, 0.0)
            scale = tl.math.div_rn(tl.where(row_ok, high, 0.0) - low, LIMIT)
            shifted = tl.math.div_rn(values - low[:, :, None], _nonzero(scale)[:, :, None])
            codes = tl.minimum(tl.maximum(tl.floor(shifted + 0.5), 0.0), LIMIT)
            zero_ptr = _plane_pointer(zero_table, plane, tl.float32)
            tl.store(zero_ptr + params, low, mask=row_ok)
        else:
            scale = tl.math.div_rn(tl.max(tl.abs(values), axis=2), LIMIT)
            scaled = tl.math.div_rn(values, _nonzero(scale)[:, :, None])
            if MODE == _INT8:
                scaled = tl.floor(scaled + 0.5)
            codes = tl.minimum(tl.maximum(scaled, -LIMIT), LIMIT)
        tl.store(scale_ptr + params, scale, mask=row_ok)
        _store_codes(
            dst,
            dst_rows,
            rows_ok,
            codes,
            dst_dim_stride,
            HEAD_DIM,
            BLOCK_T,
            BLOCK_H,
            BLOCK_D,
            PACKED,
        )


@triton.jit
def _gather_channel_groups(
    src_table,
    dst_table,
    scale_table,
    zero_table,
    slots,
    num_tokens,
    block_size,
    group_size,
    src_block_stride,
    src_offset_stride,
    src_head_stride,
    src_dim_stride,
    dst_token_stride,
    dst_head_stride,
    dst_dim_stride,
    param_group_stride,
    param_head_stride,
    param_dim_stride,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    SRC_ALIGN: tl.constexpr,
    DST_ALIGN: tl.constexpr,
    LEVELS: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (token groups, planes, head blocks): per-channel asymmetric codes of a group."""
    group = tl.program_id(0)
    plane = tl.program_id(1)
    member = tl.arange(0, BLOCK_G)
    token = group * group_size + member
    head = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    channel = tl.arange(0, BLOCK_D)
    src_rows, token_ok = _slot_rows(
        slots, token, num_tokens, block_size, src_block_stride, src_offset_stride
    )
    token_ok = token_ok & (member < group_size)
    rows_ok = (token_ok[:, None] & (head < NUM_HEADS)[None, :])[:, :, None]
    mask = rows_ok & (channel < HEAD_DIM)[None, None, :]
    src = _plane_pointer(src_table, plane, SRC_DTYPE, SRC_ALIGN)
    offsets = src_rows[:, None, None] + head[None, :, None] * src_head_stride
    x = tl.load(src + offsets + channel[None, None, :] * src_dim_stride, mask=mask, other=0.0)
    values = x.to(tl.float32)
    columns_ok = (head < NUM_HEADS)[:, None] & (channel < HEAD_DIM)[None, :]
    low = tl.where(columns_ok, tl.min(tl.where(mask, values, float("inf")), axis=0), 0.0)
    high = tl.where(columns_ok, tl.max(tl.where(mask, values, float("-inf")), axis=0), 0.0)
    scale = tl.math.div_rn(high - low, LEVELS)
    shifted = tl.math.div_rn(values - low[None, :, :], _nonzero(scale)[None, :, :])
    codes = tl.minimum(tl.maximum(tl.floor(shifted + 0.5), 0.0), LEVELS)
    params = (
        group * param_group_stride
        + head[:, None] * param_head_stride
        + channel[None, :] * param_dim_stride
    )
    tl.store(_plane_pointer(scale_table, plane, tl.float32) + params, scale, mask=columns_ok)
    tl.store(_plane_pointer(zero_table, plane, tl.float32) + params, low, mask=columns_ok)
    dst = _plane_pointer(dst_table, plane, tl.uint8, DST_ALIGN)
    dst_rows = token[:, None, None] * dst_token_stride + head[None, :, None] * dst_head_stride
    _store_codes(
        dst, dst_rows, rows_ok, codes, dst_dim_stride, HEAD_DIM, BLOCK_G, BLOCK_H, BLOCK_D, PACKED
    )


@triton.jit
def _scatter_rows(
    src_table,
    scale_table,
    zero_table,
    dst_table,
    slots,
    num_tokens,
    block_size,
    group_size,
    src_token_stride,
    src_head_stride,
    src_dim_stride,
    param_token_stride,
    param_head_stride,
    param_dim_stride,
    dst_block_stride,
    dst_offset_stride,
    dst_head_stride,
    dst_dim_stride,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    SRC_ALIGN: tl.constexpr,
    DST_DTYPE: tl.constexpr,
    DST_ALIGN: tl.constexpr,
    MODE: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (token blocks, planes, head blocks): dense (dequantized) rows to slot-addressed rows."""
    plane = tl.program_id(1)
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    channel = tl.arange(0, BLOCK_D)[None, None, :]
    dst_rows, token_ok = _slot_rows(
        slots, token, num_tokens, block_size, dst_block_stride, dst_offset_stride
    )
    rows_ok = (token_ok[:, None] & (head < NUM_HEADS)[None, :])[:, :, None]
    mask = rows_ok & (channel < HEAD_DIM)
    src = _plane_pointer(src_table, plane, SRC_DTYPE, SRC_ALIGN)
    src_rows = token[:, None, None] * src_token_stride + head[None, :, None] * src_head_stride
    if PACKED:
        half = tl.arange(0, BLOCK_D // 2)[None, None, :]
        half_mask = rows_ok & (half < HEAD_DIM // 2)
        pairs = tl.load(src + src_rows + half * src_dim_stride, mask=half_mask, other=0)
        x = tl.reshape(tl.join(pairs & 15, pairs >> 4), [BLOCK_T, BLOCK_H, BLOCK_D])
    else:
        x = tl.load(src + src_rows + channel * src_dim_stride, mask=mask)
    if MODE == _COPY:
        values = x
    else:
        params = (
            (token // group_size)[:, None, None] * param_token_stride
            + head[None, :, None] * param_head_stride
            + channel * param_dim_stride
        )
        scale = tl.load(_plane_pointer(scale_table, plane, tl.float32) + params, mask=mask)
        values = x.to(tl.float32) * scale
        if MODE == _SCALE_ZERO:
            zero = tl.load(_plane_pointer(zero_table, plane, tl.float32) + params, mask=mask)
            values = values + zero
    dst = _plane_pointer(dst_table, plane, DST_DTYPE, DST_ALIGN)
    offsets = dst_rows[:, None, None] + head[None, :, None] * dst_head_stride
    tl.store(dst + offsets + channel * dst_dim_stride, values.to(DST_DTYPE), mask=mask)


@dataclass(frozen=True)
class _Planes:
    """A table of plane data pointers (one per program row) and the planes' shared strides."""

    table: torch.Tensor
    strides: tuple[int, ...]
    dtype: torch.dtype
    align: int
    """The largest power of two up to 16 dividing every plane's address, in bytes."""

    @classmethod
    def of(cls, views: Sequence[torch.Tensor]) -> _Planes:
        first = views[0]
        if any(view.stride() != first.stride() for view in views):
            raise InvalidArgumentError("the Triton kernels need every layer to share its strides")
        addresses = [view.data_ptr() for view in views]
        table = torch.tensor(addresses, dtype=torch.int64)
        if first.is_cuda:
            table = table.pin_memory().to(first.device, non_blocking=True)
        align = functools.reduce(math.gcd, addresses, _MAX_ALIGN)
        return cls(table, tuple(first.stride()), first.dtype, align)

    @property
    def tl_dtype(self) -> tl.dtype:
        return _TL_DTYPES[self.dtype]

    def param_strides(self) -> tuple[int, int, int]:
        """(token or group, head, channel) strides; channel 0 for per-row parameters."""
        if len(self.strides) == 2:
            return (self.strides[0], self.strides[1], 0)
        return (self.strides[0], self.strides[1], self.strides[2])


@dataclass(frozen=True)
class _Paged:
    """The slot-addressed side of a launch: planes shaped [blocks, block_size, heads, dim]."""

    planes: _Planes
    slots: torch.Tensor
    block_size: int

    @property
    def tokens(self) -> int:
        return self.slots.numel()


PlanePicker = Callable[[Sequence[int]], _Planes]
"""Given plane ids (0 keys, 1 values), the table of those planes of every layer."""

_CACHE_TABLES: weakref.WeakKeyDictionary[PagedKVCache, dict[tuple[int, ...], _Planes]] = (
    weakref.WeakKeyDictionary()
)


def _cache_planes(cache: PagedKVCache) -> PlanePicker:
    """A picker over ``cache``'s [blocks, block_size, heads, dim] planes; tables built once."""

    def pick(plane_ids: Sequence[int]) -> _Planes:
        tables = _CACHE_TABLES.setdefault(cache, {})
        key = tuple(plane_ids)
        if key not in tables:
            tables[key] = _Planes.of([layer[plane] for layer in cache.planes for plane in key])
        return tables[key]

    return pick


def _chunk_planes(chunk: torch.Tensor) -> PlanePicker:
    """A picker over a dense chunk's planes as blocks of one token (slot = token index)."""

    def pick(plane_ids: Sequence[int]) -> _Planes:
        return _Planes.of([layer[plane].unsqueeze(1) for layer in chunk for plane in plane_ids])

    return pick


def _layer_params(tensor: torch.Tensor, plane: int | None = None) -> _Planes:
    """Per-layer views of a parameter tensor whose first dimension is the layer."""
    return _Planes.of([layer if plane is None else layer[plane] for layer in tensor])


def _tiles(tokens: int, heads: int, head_dim: int) -> tuple[int, int, int]:
    """(token, head, channel) block sizes: whole rows, as many heads and tokens as fit a tile."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(heads), max(1, _TILE // block_d))
    block_t = min(triton.next_power_of_2(tokens), max(1, _TILE // (block_h * block_d)))
    return block_t, block_h, block_d


def _launch_gather_rows(
    source: _Paged,
    dst: _Planes,
    heads: int,
    head_dim: int,
    *,
    mode: tl.constexpr = _COPY,
    scale: _Planes | None = None,
    zero: _Planes | None = None,
    limit: float = 0.0,
    packed: bool = False,
) -> None:
    scale = scale or dst
    zero = zero or scale
    block_t, block_h, block_d = _tiles(source.tokens, heads, head_dim)
    grid = (triton.cdiv(source.tokens, block_t), dst.table.numel(), triton.cdiv(heads, block_h))
    _gather_rows[grid](
        source.planes.table,
        dst.table,
        scale.table,
        zero.table,
        source.slots,
        source.tokens,
        source.block_size,
        *source.planes.strides,
        *dst.strides,
        *scale.param_strides()[:2],
        NUM_HEADS=heads,
        HEAD_DIM=head_dim,
        SRC_DTYPE=source.planes.tl_dtype,
        SRC_ALIGN=source.planes.align,
        DST_DTYPE=dst.tl_dtype,
        DST_ALIGN=dst.align,
        MODE=int(mode),
        LIMIT=limit,
        PACKED=packed,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        enable_fp_fusion=False,
    )


def _launch_channel_groups(
    source: _Paged,
    dst: _Planes,
    scale: _Planes,
    zero: _Planes,
    heads: int,
    head_dim: int,
    *,
    group_size: int,
    levels: int,
    packed: bool,
) -> None:
    block_g = triton.next_power_of_2(min(group_size, source.tokens))
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(heads), max(1, _TILE // (block_g * block_d)))
    groups = triton.cdiv(source.tokens, group_size)
    grid = (groups, dst.table.numel(), triton.cdiv(heads, block_h))
    _gather_channel_groups[grid](
        source.planes.table,
        dst.table,
        scale.table,
        zero.table,
        source.slots,
        source.tokens,
        source.block_size,
        group_size,
        *source.planes.strides,
        *dst.strides,
        *scale.param_strides(),
        NUM_HEADS=heads,
        HEAD_DIM=head_dim,
        SRC_DTYPE=source.planes.tl_dtype,
        SRC_ALIGN=source.planes.align,
        DST_ALIGN=dst.align,
        LEVELS=float(levels),
        PACKED=packed,
        BLOCK_G=block_g,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        enable_fp_fusion=False,
    )


def _launch_scatter_rows(
    src: _Planes,
    target: _Paged,
    heads: int,
    head_dim: int,
    *,
    mode: tl.constexpr = _COPY,
    scale: _Planes | None = None,
    zero: _Planes | None = None,
    group_size: int = 1,
    packed: bool = False,
) -> None:
    scale = scale or src
    zero = zero or scale
    block_t, block_h, block_d = _tiles(target.tokens, heads, head_dim)
    grid = (triton.cdiv(target.tokens, block_t), src.table.numel(), triton.cdiv(heads, block_h))
    _scatter_rows[grid](
        src.table,
        scale.table,
        zero.table,
        target.planes.table,
        target.slots,
        target.tokens,
        target.block_size,
        group_size,
        *src.strides,
        *scale.param_strides(),
        *target.planes.strides,
        NUM_HEADS=heads,
        HEAD_DIM=head_dim,
        SRC_DTYPE=src.tl_dtype,
        SRC_ALIGN=src.align,
        DST_DTYPE=target.planes.tl_dtype,
        DST_ALIGN=target.planes.align,
        MODE=int(mode),
        PACKED=packed,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        enable_fp_fusion=False,
    )


def _quantize_into(
    q: QuantizedKV, planes: PlanePicker, slots: torch.Tensor, block_size: int
) -> None:
    """Quantize the tokens at ``slots`` of ``planes`` into ``q`` (one launch a plane kind)."""
    layers, count, tokens, heads, head_dim = q.shape
    if tokens == 0:
        return

    def source(plane_ids: Sequence[int]) -> _Paged:
        return _Paged(planes(plane_ids), slots, block_size)

    if q.scheme.symmetric:
        every = range(count)
        codes = _Planes.of([q.data[layer, plane] for layer in range(layers) for plane in every])
        scales = _Planes.of(
            [q.params["scale"][layer, plane] for layer in range(layers) for plane in every]
        )
        int8 = q.scheme is QuantScheme.INT8
        _launch_gather_rows(
            source(every),
            codes,
            heads,
            head_dim,
            mode=_INT8 if int8 else _FP8,
            scale=scales,
            limit=INT8_LIMIT if int8 else FP8_LIMIT,
        )
        return
    _launch_channel_groups(
        source([0]),
        _layer_params(q.data, 0),
        _layer_params(q.params["key_scale"]),
        _layer_params(q.params["key_zero"]),
        heads,
        head_dim,
        group_size=q.group_size,
        levels=q.scheme.levels,
        packed=q.scheme.packed,
    )
    if count == 2:
        _launch_gather_rows(
            source([1]),
            _layer_params(q.data, 1),
            heads,
            head_dim,
            mode=_ASYMMETRIC,
            scale=_layer_params(q.params["value_scale"]),
            zero=_layer_params(q.params["value_zero"]),
            limit=float(q.scheme.levels),
            packed=q.scheme.packed,
        )


def _dequantize_into(
    q: QuantizedKV, planes: PlanePicker, slots: torch.Tensor, block_size: int
) -> None:
    """Dequantize ``q`` into the tokens at ``slots`` of ``planes`` (one launch a plane kind)."""
    layers, count, tokens, heads, head_dim = q.shape
    if tokens == 0:
        return

    def target(plane_ids: Sequence[int]) -> _Paged:
        return _Paged(planes(plane_ids), slots, block_size)

    if q.scheme.symmetric:
        every = range(count)
        codes = _Planes.of([q.data[layer, plane] for layer in range(layers) for plane in every])
        scales = _Planes.of(
            [q.params["scale"][layer, plane] for layer in range(layers) for plane in every]
        )
        _launch_scatter_rows(codes, target(every), heads, head_dim, mode=_SCALE, scale=scales)
        return
    _launch_scatter_rows(
        _layer_params(q.data, 0),
        target([0]),
        heads,
        head_dim,
        mode=_SCALE_ZERO,
        scale=_layer_params(q.params["key_scale"]),
        zero=_layer_params(q.params["key_zero"]),
        group_size=q.group_size,
        packed=q.scheme.packed,
    )
    if count == 2:
        _launch_scatter_rows(
            _layer_params(q.data, 1),
            target([1]),
            heads,
            head_dim,
            mode=_SCALE_ZERO,
            scale=_layer_params(q.params["value_scale"]),
            zero=_layer_params(q.params["value_zero"]),
            packed=q.scheme.packed,
        )


def _device_slots(slot_mapping: torch.Tensor, device: torch.device) -> torch.Tensor:
    return slot_mapping.to(device=device, dtype=torch.int64)


def _identity_slots(tokens: int, device: torch.device) -> torch.Tensor:
    return torch.arange(tokens, dtype=torch.int64, device=device)


def quantize(
    kv: torch.Tensor, scheme: QuantScheme, *, group_size: int = DEFAULT_GROUP_SIZE
) -> QuantizedKV:
    """Quantize a KV chunk [layers, planes, tokens, heads, dim] with ``scheme`` (any strides)."""
    shape = check_kv(kv)
    q = empty_quantized(scheme, shape, kv.dtype, kv.device, group_size)
    _quantize_into(q, _chunk_planes(kv), _identity_slots(shape[2], kv.device), 1)
    return q


def dequantize(q: QuantizedKV, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``q`` straight into ``out`` (any float dtype, any strides) or a new tensor."""
    target = check_dequantize_out(q, out)
    _dequantize_into(q, _chunk_planes(target), _identity_slots(q.shape[2], q.device), 1)
    return target


def gather(
    cache: PagedKVCache, slot_mapping: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the tokens at ``slot_mapping`` out of ``cache``, all layers in one launch."""
    check_slots(slot_mapping, cache.num_slots)
    tokens = slot_mapping.numel()
    if out is None:
        out = torch.empty(cache.chunk_shape(tokens), dtype=cache.dtype, device=cache.device)
    else:
        cache.check_chunk(out, tokens, "out")
    if tokens:
        every = range(cache.num_planes)
        slots = _device_slots(slot_mapping, cache.device)
        source = _Paged(_cache_planes(cache)(every), slots, cache.block_size)
        dst = _Planes.of([plane for layer in out for plane in layer])
        _launch_gather_rows(source, dst, cache.num_heads, cache.head_dim)
    return out


def scatter(chunk: torch.Tensor, cache: PagedKVCache, slot_mapping: torch.Tensor) -> None:
    """Write ``chunk``'s tokens into ``cache`` at ``slot_mapping``, all layers in one launch."""
    check_slots(slot_mapping, cache.num_slots)
    tokens = slot_mapping.numel()
    cache.check_chunk(chunk, tokens)
    if tokens:
        every = range(cache.num_planes)
        slots = _device_slots(slot_mapping, cache.device)
        target = _Paged(_cache_planes(cache)(every), slots, cache.block_size)
        src = _Planes.of([plane for layer in chunk for plane in layer])
        _launch_scatter_rows(src, target, cache.num_heads, cache.head_dim)


def gather_quantize(
    cache: PagedKVCache,
    slot_mapping: torch.Tensor,
    scheme: QuantScheme,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> QuantizedKV:
    """Gather and quantize in one pass: no full-precision copy of the chunk is made."""
    check_slots(slot_mapping, cache.num_slots)
    shape = cache.chunk_shape(slot_mapping.numel())
    q = empty_quantized(scheme, shape, cache.dtype, cache.device, group_size)
    slots = _device_slots(slot_mapping, cache.device)
    _quantize_into(q, _cache_planes(cache), slots, cache.block_size)
    return q


def scatter_dequantize(q: QuantizedKV, cache: PagedKVCache, slot_mapping: torch.Tensor) -> None:
    """Dequantize ``q`` straight into ``cache`` at ``slot_mapping`` in the cache's dtype."""
    check_slots(slot_mapping, cache.num_slots)
    cache.check_quantized(q, slot_mapping.numel())
    slots = _device_slots(slot_mapping, cache.device)
    _dequantize_into(q, _cache_planes(cache), slots, cache.block_size)
