"""What a vLLM worker's loads and saves move KV between: the engine's paged
caches and the store, with the keys both name a request's chunks by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.connectors.vllm_keys import RequestKeys
from kvstore.layout import KVLayout
from kvstore.store import KVStore
from kvstore.triton_kernels import PagedKVCache

LayerWriter = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``write(layer, kv, slots)``: the engine's own kernel writing one layer's KV
(``[2, tokens, heads, dim]``) into its paged cache at ``slots``."""


@dataclass(frozen=True)
class Transfer:
    """The store and keys on one side; on the other, the engine's layers in model
    order (``caches``) with their block size and device, and ``write_layer``
    where the engine has a faster kernel to load KV with than kvstore's scatter
    into ``caches``."""

    store: KVStore
    keys: RequestKeys
    caches: list[PagedKVCache]
    layout: KVLayout
    block_size: int
    chunk_tokens: int
    device: torch.device
    write_layer: LayerWriter | None = None


__all__ = ["LayerWriter", "Transfer"]
