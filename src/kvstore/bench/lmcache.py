"""``kvstore bench --compare lmcache``: LMCache's CPU backend on the same bytes, same run.

LMCache is never a dependency: when it is not importable the comparison is
reported as unavailable. Its ``LocalCPUBackend`` is driven as its cache
engine drives it: a put allocates a memory object from the backend's pinned
allocator, copies the chunk's KV into it and indexes it; a get looks the
object up and copies its KV out. No digest is computed or checked on either
side, so the fair comparison is kvstore with verification off.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any

import torch

from kvstore.layout import KVLayout

NAME = "lmcache-cpu"
DESCRIPTION = "LMCache LocalCPUBackend (allocate + copy_ + submit_put_task / get_blocking + copy_)"


def available() -> bool:
    """Whether LMCache can be imported here."""
    return importlib.util.find_spec("lmcache") is not None


class LMCacheCpu:
    """LMCache's CPU backend holding ``chunks`` chunks of ``layout``, 256 tokens each."""

    def __init__(self, layout: KVLayout, chunk_tokens: int, chunks: int) -> None:
        logging.getLogger("lmcache").setLevel(logging.WARNING)
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        self._shape = torch.Size(layout.shape(chunk_tokens))
        self._dtype = layout.torch_dtype
        chunk_bytes = layout.nbytes(chunk_tokens)
        config = LMCacheEngineConfig.from_defaults(
            chunk_size=chunk_tokens,
            local_cpu=True,
            max_local_cpu_size=(chunks + 2) * chunk_bytes / (1 << 30),
        )
        metadata = LMCacheMetadata(
            model_name="kvstore-bench",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=self._dtype,
            kv_shape=tuple(self._shape),
        )
        self._backend: Any = LocalCPUBackend(config=config, metadata=metadata, dst_device="cpu")
        self._keys = [
            CacheEngineKey(
                model_name="kvstore-bench",
                world_size=1,
                worker_id=0,
                chunk_hash=index,
                dtype=self._dtype,
            )
            for index in range(chunks)
        ]

    def store(self, chunks: list[torch.Tensor]) -> float:
        """Seconds to put every chunk."""
        start = time.perf_counter()
        for key, chunk in zip(self._keys, chunks):
            stored = self._backend.allocate(self._shape, self._dtype)
            stored.tensor.copy_(chunk)
            self._backend.submit_put_task(key, stored)
            stored.ref_count_down()
        return time.perf_counter() - start

    def retrieve(self, outs: list[torch.Tensor]) -> float:
        """Seconds to get every chunk into ``outs``."""
        start = time.perf_counter()
        for key, out in zip(self._keys, outs):
            stored = self._backend.get_blocking(key)
            out.copy_(stored.tensor.view(self._shape))
            stored.ref_count_down()
        return time.perf_counter() - start

    def clear(self) -> None:
        self._backend.clear()

    def close(self) -> None:
        self._backend.close()
