"""``kvstore bench --compare lmcache``: LMCache's CPU and disk backends on the same bytes,
same run.

LMCache is never a dependency: when it is not importable the comparison is
reported as unavailable. Each backend is driven as LMCache's cache engine and
storage manager drive it, built from an ``LMCacheEngineConfig`` as its
storage manager builds it. No digest is computed or checked on either side,
so the fair comparison is kvstore with verification off.

``LocalCPUBackend`` (row ``lmcache-cpu``, beside the cpu tier): a put
allocates a memory object from the backend's allocator, copies the chunk's
KV into it and indexes it; a get looks the object up and copies its KV out.

``LocalDiskBackend`` (row ``lmcache-disk``, beside the nvme tier), configured
with ``local_cpu=False`` and ``use_odirect``, one file a chunk in a directory
under the nvme tier's ``--dir``:

- a put allocates a memory object from the ``LocalCPUBackend`` that serves
  as the disk backend's allocator, copies the chunk's KV into it and submits
  it with ``batched_submit_put_task``, as the storage manager's
  ``batched_put`` does; LMCache writes it on its disk worker threads, one
  O_DIRECT ``write`` of the whole chunk, with no fsync. A store is timed
  until every chunk's write has completed (LMCache's completion callback);
- a get is ``batched_get_blocking``, as the storage manager's ``batched_get``
  calls it: a memory object from the same allocator per chunk, filled by one
  O_DIRECT ``readinto`` of its file on LMCache's read threads, then copied
  out into the retrieve tensor.

With ``local_cpu=False`` LMCache keeps no CPU hot cache: the CPU backend
only allocates (its put is a no-op, so nothing is indexed in memory and the
storage manager's write-back after a disk get is a no-op too), and the disk
backend's get always reads the file; O_DIRECT keeps the page cache out on
both sides. LMCache uses O_DIRECT only for chunks that are a multiple of the
filesystem's block size (both bench layouts are), so any other chunk size is
refused rather than measured through the page cache. The disk worker and
read threads are set to the nvme driver's ``io_threads``, the threads of the
O_DIRECT baseline it alternates with.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from kvstore.errors import ConfigError, KVStoreError
from kvstore.layout import KVLayout

CPU_NAME = "lmcache-cpu"
CPU_DESCRIPTION = (
    "LMCache LocalCPUBackend (allocate + copy_ + submit_put_task / get_blocking + copy_)"
)

DISK_NAME = "lmcache-disk"
DISK_DESCRIPTION = (
    "LMCache LocalDiskBackend, O_DIRECT, no fsync, no CPU hot cache (allocate + copy_ + "
    "batched_submit_put_task until written / batched_get_blocking + copy_)"
)

NAMES = {"cpu": CPU_NAME, "nvme": DISK_NAME}
"""The comparison row measured beside each local tier."""

DESCRIPTIONS = {CPU_NAME: CPU_DESCRIPTION, DISK_NAME: DISK_DESCRIPTION}

_WRITE_TIMEOUT_S = 600.0
"""How long a store waits for LMCache's disk writes: a failed write is only logged by
LMCache, so a missing completion is the one sign of it."""


def available() -> bool:
    """Whether LMCache can be imported here."""
    return importlib.util.find_spec("lmcache") is not None


def _engine_parts(
    layout: KVLayout, chunk_tokens: int, chunks: int, **config: Any
) -> tuple[Any, Any, torch.Size, list[Any]]:
    """LMCache's config and metadata for ``chunks`` chunks of ``layout``, the shape of one
    chunk and a key per chunk; LMCache's INFO logging is off unless its environment asks."""
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata

    shape = torch.Size(layout.shape(chunk_tokens))
    dtype = layout.torch_dtype
    engine_config = LMCacheEngineConfig.from_defaults(
        chunk_size=chunk_tokens,
        max_local_cpu_size=(chunks + 2) * layout.nbytes(chunk_tokens) / (1 << 30),
        **config,
    )
    metadata = LMCacheMetadata(
        model_name="kvstore-bench",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=dtype,
        kv_shape=tuple(shape),
    )
    keys = [
        CacheEngineKey(
            model_name="kvstore-bench", world_size=1, worker_id=0, chunk_hash=index, dtype=dtype
        )
        for index in range(chunks)
    ]
    return engine_config, metadata, shape, keys


class LMCacheCpu:
    """LMCache's CPU backend holding ``chunks`` chunks of ``layout``."""

    def __init__(self, layout: KVLayout, chunk_tokens: int, chunks: int) -> None:
        config, metadata, self._shape, self._keys = _engine_parts(
            layout, chunk_tokens, chunks, local_cpu=True
        )
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        self._dtype = layout.torch_dtype
        self._backend: Any = LocalCPUBackend(config=config, metadata=metadata, dst_device="cpu")

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


class LMCacheDisk:
    """LMCache's disk backend storing ``chunks`` chunks of ``layout`` under ``directory``,
    with ``threads`` disk worker and read threads.

    Its disk budget covers every repeat: LMCache's ``remove`` deletes a chunk's
    file without returning its size to the budget the put charged.
    """

    def __init__(
        self,
        layout: KVLayout,
        chunk_tokens: int,
        chunks: int,
        *,
        directory: Path,
        threads: int,
        repeats: int,
    ) -> None:
        block = os.statvfs(directory).f_bsize
        chunk_bytes = layout.nbytes(chunk_tokens)
        if chunk_bytes % block:
            raise ConfigError(
                f"LMCache uses O_DIRECT only for chunks that are a multiple of the "
                f"filesystem block ({block} bytes), not {chunk_bytes}: its gets would "
                "read the page cache"
            )
        config, metadata, self._shape, self._keys = _engine_parts(
            layout,
            chunk_tokens,
            chunks,
            local_cpu=False,
            local_disk=str(directory),
            max_local_disk_size=(repeats * chunks + 1) * chunk_bytes / (1 << 30),
            extra_config={"use_odirect": True, "disk_io_threads": threads},
        )
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
        from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

        self._dtype = layout.torch_dtype
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="bench-lmcache-loop", daemon=True
        )
        self._loop_thread.start()
        self._allocator: Any = LocalCPUBackend(config=config, metadata=metadata, dst_device="cpu")
        self._backend: Any = LocalDiskBackend(
            config=config,
            loop=self._loop,
            local_cpu_backend=self._allocator,
            dst_device="cpu",
            metadata=metadata,
        )

    def store(self, chunks: list[torch.Tensor]) -> float:
        """Seconds to put every chunk, until LMCache has written them all."""
        written = threading.Semaphore(0)
        start = time.perf_counter()
        objects = []
        for chunk in chunks:
            stored = self._allocator.allocate(self._shape, self._dtype)
            stored.tensor.copy_(chunk)
            objects.append(stored)
        self._backend.batched_submit_put_task(
            self._keys, objects, on_complete_callback=lambda _key: written.release()
        )
        for stored in objects:
            stored.ref_count_down()
        deadline = start + _WRITE_TIMEOUT_S
        for done in range(len(objects)):
            if not written.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                raise KVStoreError(
                    f"LMCache wrote {done} of {len(objects)} chunks within "
                    f"{_WRITE_TIMEOUT_S:.0f} s; see its log"
                )
        return time.perf_counter() - start

    def retrieve(self, outs: list[torch.Tensor]) -> float:
        """Seconds to get every chunk from disk into ``outs``."""
        start = time.perf_counter()
        loaded = self._backend.batched_get_blocking(self._keys)
        missing = sum(stored is None for stored in loaded)
        for out, stored in zip(outs, loaded):
            if stored is not None:
                out.copy_(stored.tensor.view(self._shape))
                stored.ref_count_down()
        elapsed = time.perf_counter() - start
        if missing:
            raise KVStoreError(f"LMCache lost {missing} of {len(outs)} chunks from disk")
        return elapsed

    def clear(self) -> None:
        """Delete every chunk's file, as the store's clear() deletes its chunks."""
        for key in self._keys:
            self._backend.remove(key)

    def close(self) -> None:
        self._backend.close()
        self._allocator.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()
