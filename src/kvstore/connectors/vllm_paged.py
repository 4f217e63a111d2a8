"""vLLM's per-layer KV cache tensors as ``PagedKVCache`` views, one adapter per backend.

vLLM 0.32 hands a connector one tensor a layer, shaped ``[B, H, N, S]``
(blocks, kv heads, tokens a block, bytes of state a token as elements); what
the attention kernels keep inside a block differs by backend:

* ``cpu``: the CPU attention backend (ISAs ``vec``, ``vec16``, ``neon``) sees
  a layer as ``[B, H, N, 2*C]`` but stores, for each (block, head), the keys
  transposed as ``[C, N]`` and then the values as ``[N, C]``;
* ``joined``: the CUDA backends (FlashAttention, Triton, FlashInfer) keep a
  token's key then value in the last dimension, ``[..., :C]`` and ``[..., C:]``
  (in whatever stride order the KV cache layout sets);
* ``mla``: one latent vector a token, ``[B, 1, N, C]``.

Each adapter returns strided views of the engine's memory, never a copy, so
``kvstore.triton_kernels.gather``/``scatter`` read and write the cache in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from kvstore.errors import InvalidArgumentError
from kvstore.triton_kernels import PagedKVCache, PagedLayout

Backend = Literal["cpu", "joined", "mla"]
BACKENDS: tuple[Backend, ...] = ("cpu", "joined", "mla")


def cpu_attention_planes(layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value ``[B, N, H, C]`` views of one layer of vLLM's CPU attention cache."""
    if layer.dim() != 4 or layer.shape[3] % 2:
        raise InvalidArgumentError(
            f"a CPU attention layer is [blocks, heads, block_size, 2*head_dim], got "
            f"{tuple(layer.shape)}"
        )
    blocks, heads, size, joined = layer.shape
    dim = joined // 2
    block_stride, head_stride, token_stride, channel_stride = layer.stride()
    if channel_stride != 1 or token_stride != joined:
        raise InvalidArgumentError(
            "a CPU attention layer must be dense within each (block, head), got strides "
            f"{layer.stride()}"
        )
    offset = layer.storage_offset()
    keys = layer.as_strided(
        (blocks, size, heads, dim), (block_stride, 1, head_stride, size), offset
    )
    values = layer.as_strided(
        (blocks, size, heads, dim), (block_stride, dim, head_stride, 1), offset + size * dim
    )
    return keys, values


def layer_cache(layer: torch.Tensor, backend: Backend) -> PagedKVCache:
    """One vLLM layer as a one-layer ``PagedKVCache`` in kvstore's plane order."""
    if backend == "cpu":
        return PagedKVCache([cpu_attention_planes(layer)], PagedLayout.BNHC)
    if backend == "joined":
        return PagedKVCache([layer], PagedLayout.CPU_JOINED)
    if backend == "mla":
        return PagedKVCache([layer], PagedLayout.MLA)
    raise InvalidArgumentError(f"unknown vLLM cache backend {backend!r} ({', '.join(BACKENDS)})")


def layer_order(names: Sequence[str], index_of: Mapping[str, int]) -> list[str]:
    """Layer names sorted by model layer index (then name), the order chunks store them in."""
    return sorted(names, key=lambda name: (index_of[name], name))


def block_slots(block_ids: Sequence[int], block_size: int, start: int, stop: int) -> torch.Tensor:
    """Slot ids of tokens ``[start, stop)`` of a request whose blocks are ``block_ids``."""
    if not 0 <= start <= stop <= len(block_ids) * block_size:
        raise InvalidArgumentError(
            f"tokens [{start}, {stop}) do not fit {len(block_ids)} blocks of {block_size}"
        )
    positions = torch.arange(start, stop, dtype=torch.int64)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
    return blocks[positions // block_size] * block_size + positions % block_size
