"""An engine's paged KV cache: its per-layer tensors, their layout, and slot mappings.

Engines keep KV in fixed-size blocks and name a token's place by its slot,
``block_id * block_size + offset``. Every layout below reduces, per layer and
plane (keys, values, or an MLA latent), to a strided view shaped
``[num_blocks, block_size, heads, head_dim]``; the kernels only use those
views' data pointers and strides, so permuted or sliced engine tensors (vLLM's
HND stride order, say) work without a copy.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TypeAlias

import torch

from kvstore.errors import InvalidArgumentError

from .formats import KV_DTYPES, QuantizedKV

LayerEntry: TypeAlias = torch.Tensor | Sequence[torch.Tensor]
"""One layer of an engine cache: a tensor, or a (key, value) pair for the split layouts."""


class PagedLayout(enum.Enum):
    """Where blocks, offsets, heads, channels and K/V sit in each layer's tensor.

    B blocks, N tokens a block, H kv heads, C channels a head.
    """

    FLASH_ATTN = "flash_attn"
    """``(2, B, N, H, C)``: vLLM's FlashAttention backend (vLLM <= 0.27)."""
    FLASHINFER = "flashinfer"
    """``(B, 2, N, H, C)``: vLLM's FlashInfer and Triton backends before 0.32."""
    CPU_JOINED = "cpu_joined"
    """``(B, H, N, 2*C)``, keys then values in the last dimension: vLLM 0.32's CUDA backends."""
    BHNC = "bhnc"
    """A (key, value) pair of ``(B, H, N, C)`` tensors a layer."""
    BNHC = "bnhc"
    """A (key, value) pair of ``(B, N, H, C)`` tensors a layer."""
    MLA = "mla"
    """``(B, 1, N, C)``: one latent vector a token (multi-head latent attention)."""


def _layer_planes(entry: LayerEntry, layout: PagedLayout) -> tuple[torch.Tensor, ...]:
    """The [B, N, H, C] views of one layer's planes, or InvalidArgumentError."""
    if layout in (PagedLayout.BHNC, PagedLayout.BNHC):
        parts = (entry,) if isinstance(entry, torch.Tensor) else tuple(entry)
        if len(parts) not in (1, 2) or any(
            not isinstance(part, torch.Tensor) or part.dim() != 4 for part in parts
        ):
            raise InvalidArgumentError(
                f"a {layout.value} layer is a (key, value) pair (or one latent) of 4-D tensors"
            )
        return tuple(part.transpose(1, 2) if layout is PagedLayout.BHNC else part for part in parts)
    if not isinstance(entry, torch.Tensor):
        raise InvalidArgumentError(f"a {layout.value} layer is one tensor, got {type(entry)}")
    shape = tuple(entry.shape)
    if layout is PagedLayout.FLASH_ATTN and entry.dim() == 5 and shape[0] == 2:
        return (entry[0], entry[1])
    if layout is PagedLayout.FLASHINFER and entry.dim() == 5 and shape[1] == 2:
        return (entry[:, 0], entry[:, 1])
    if layout is PagedLayout.CPU_JOINED and entry.dim() == 4 and shape[3] % 2 == 0:
        channels = shape[3] // 2
        return (
            entry[..., :channels].transpose(1, 2),
            entry[..., channels:].transpose(1, 2),
        )
    if layout is PagedLayout.MLA and entry.dim() == 4 and shape[1] == 1:
        return (entry.transpose(1, 2),)
    expected = {
        PagedLayout.FLASH_ATTN: "(2, B, N, H, C)",
        PagedLayout.FLASHINFER: "(B, 2, N, H, C)",
        PagedLayout.CPU_JOINED: "(B, H, N, 2*C)",
        PagedLayout.MLA: "(B, 1, N, C)",
    }[layout]
    raise InvalidArgumentError(f"a {layout.value} layer is {expected}, got {shape}")


class PagedKVCache:
    """An engine's KV cache: one entry per layer (vLLM keeps one tensor a layer) plus its layout."""

    def __init__(self, layers: Sequence[LayerEntry], layout: PagedLayout | str) -> None:
        try:
            self.layout = PagedLayout(layout)
        except ValueError:
            known = ", ".join(member.value for member in PagedLayout)
            raise InvalidArgumentError(f"unknown paged layout {layout!r} ({known})") from None
        self.layers = tuple(layers)
        if not self.layers:
            raise InvalidArgumentError("a paged KV cache needs at least one layer")
        self.planes = tuple(_layer_planes(entry, self.layout) for entry in self.layers)
        first = self.planes[0][0]
        for index, planes in enumerate(self.planes):
            for plane in planes:
                if len(planes) != len(self.planes[0]) or plane.shape != first.shape:
                    raise InvalidArgumentError(f"layer {index} does not match layer 0's shape")
                if plane.dtype != first.dtype or plane.device != first.device:
                    raise InvalidArgumentError(
                        f"layer {index} differs from layer 0 in dtype/device"
                    )
        if first.dtype not in KV_DTYPES:
            raise InvalidArgumentError(f"paged KV must be fp16, bf16 or fp32: {first.dtype}")
        self.num_blocks, self.block_size, self.num_heads, self.head_dim = first.shape
        if self.block_size == 0 or self.num_heads == 0 or self.head_dim == 0:
            raise InvalidArgumentError(f"empty block, head or channel dimension: {first.shape}")

    @classmethod
    def allocate(
        cls,
        layout: PagedLayout | str,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A zero-filled cache in ``layout``, shaped as an engine would allocate it."""
        layout = PagedLayout(layout)
        if layout is PagedLayout.MLA and num_heads != 1:
            raise InvalidArgumentError(f"an MLA cache has one latent head, not {num_heads}")
        blocks, size, heads, dim = num_blocks, block_size, num_heads, head_dim
        shapes: dict[PagedLayout, tuple[tuple[int, ...], ...]] = {
            PagedLayout.FLASH_ATTN: ((2, blocks, size, heads, dim),),
            PagedLayout.FLASHINFER: ((blocks, 2, size, heads, dim),),
            PagedLayout.CPU_JOINED: ((blocks, heads, size, 2 * dim),),
            PagedLayout.BHNC: ((blocks, heads, size, dim), (blocks, heads, size, dim)),
            PagedLayout.BNHC: ((blocks, size, heads, dim), (blocks, size, heads, dim)),
            PagedLayout.MLA: ((blocks, 1, size, dim),),
        }
        layers: list[LayerEntry] = []
        for _ in range(num_layers):
            tensors = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes[layout]]
            layers.append(tuple(tensors) if len(tensors) > 1 else tensors[0])
        return cls(layers, layout)

    @property
    def num_layers(self) -> int:
        return len(self.planes)

    @property
    def num_planes(self) -> int:
        """2 (keys and values) or 1 (an MLA latent)."""
        return len(self.planes[0])

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.planes[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.planes[0][0].device

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """The contiguous chunk shape ``[layers, planes, tokens, heads, head_dim]``."""
        return (self.num_layers, self.num_planes, tokens, self.num_heads, self.head_dim)

    def check_chunk(self, chunk: torch.Tensor, tokens: int, what: str = "chunk") -> None:
        """Raise InvalidArgumentError unless ``chunk`` holds ``tokens`` tokens of this cache."""
        want = self.chunk_shape(tokens)
        if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != want:
            shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise InvalidArgumentError(f"{what} must be {want} for this cache, got {shape}")
        if chunk.dtype != self.dtype or chunk.device != self.device:
            raise InvalidArgumentError(
                f"{what} is {chunk.dtype} on {chunk.device}; cache is {self.dtype} on {self.device}"
            )

    def check_quantized(self, q: QuantizedKV, tokens: int) -> None:
        """Raise InvalidArgumentError unless ``q`` holds ``tokens`` tokens of this cache."""
        if q.shape != self.chunk_shape(tokens) or q.device != self.device:
            raise InvalidArgumentError(
                f"quantized chunk {q.shape} on {q.device} does not fit this cache: "
                f"{self.chunk_shape(tokens)} on {self.device}"
            )


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Raise InvalidArgumentError unless every slot id lies in ``[0, num_slots)``.

    Runs before any kernel writes, so a bad mapping never leaves a half-written
    cache. On a GPU this reads the mapping's min and max back to the host.
    """
    if (
        not isinstance(slot_mapping, torch.Tensor)
        or slot_mapping.dim() != 1
        or slot_mapping.dtype not in (torch.int32, torch.int64)
    ):
        raise InvalidArgumentError("slot_mapping must be a 1-D int32 or int64 tensor")
    if slot_mapping.numel() == 0:
        return
    low, high = (int(value) for value in torch.aminmax(slot_mapping))
    if low < 0 or high >= num_slots:
        raise InvalidArgumentError(
            f"slot ids must lie in [0, {num_slots}) (num_blocks * block_size); "
            f"got min {low}, max {high}"
        )
