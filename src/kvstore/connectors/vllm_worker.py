"""The vLLM connector's worker side: the store, the paged-cache views, loads and saves."""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import wait
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from vllm.platforms import current_platform

from kvstore.connectors.config import store_namespace
from kvstore.connectors.stores import shared_stores
from kvstore.connectors.vllm_load import LoadJob
from kvstore.connectors.vllm_lookup import LookupServer, register_local, unregister_local
from kvstore.connectors.vllm_metadata import (
    KVStoreConnectorMetadata,
    KVStoreWorkerMetadata,
    SaveSpec,
)
from kvstore.connectors.vllm_paged import Backend, block_slots, layer_cache, layer_order
from kvstore.connectors.vllm_saves import InflightSaves, PendingSave, log_save
from kvstore.connectors.weights import weights_revision
from kvstore.errors import NotSupportedError
from kvstore.layout import DTYPE_NAMES, KVLayout
from kvstore.store import KVStore
from kvstore.sync import shared_loop
from kvstore.triton_kernels import PagedKVCache, gather

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvstore.connectors.vllm import KVStoreConnector

log = logging.getLogger("kvstore.connectors.vllm")


class WorkerSide:
    """Owns the store and the paged-cache views; runs loads and saves."""

    def __init__(self, connector: KVStoreConnector, vllm_config: VllmConfig) -> None:
        self._connector = connector
        self._config = vllm_config
        self.block_size = connector._block_size
        self.caches: list[PagedKVCache] = []
        self.index: dict[str, int] = {}
        self.device = torch.device("cpu")
        self._store: KVStore | None = None
        self._layout: KVLayout | None = None
        self._save_slots: dict[str, torch.Tensor] = {}
        self._server: LookupServer | None = None
        self._job: LoadJob | None = None
        self._pending: dict[str, PendingSave] = {}
        self._inflight = InflightSaves()
        self._load_errors: set[int] = set()
        self._loads: dict[str, tuple[int, int]] = {}
        self._sent: set[str] = set()

    @property
    def store(self) -> KVStore:
        if self._store is None:
            raise NotSupportedError("vLLM has not registered its KV caches with kvstore yet")
        return self._store

    @property
    def layout(self) -> KVLayout:
        if self._layout is None:
            raise NotSupportedError("vLLM has not registered its KV caches with kvstore yet")
        return self._layout

    def _backend(self) -> Backend:
        if current_platform.is_cpu():
            return "cpu"
        if self._config.model_config.use_mla:
            return "mla"
        return "joined"

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        if self._config.cache_config.cache_dtype not in ("auto", None):
            raise NotSupportedError(
                f"kvstore stores float KV; kv_cache_dtype={self._config.cache_config.cache_dtype} "
                "is not supported"
            )
        names = layer_order(list(kv_caches), {n: extract_layer_index(n) for n in kv_caches})
        backend = self._backend()
        self.caches = [layer_cache(kv_caches[name], backend) for name in names]
        self.index = {name: position for position, name in enumerate(names)}
        first = self.caches[0]
        if first.block_size != self.block_size:
            raise NotSupportedError(
                f"vLLM's kernel block size {first.block_size} differs from its block size "
                f"{self.block_size}; kvstore needs them equal"
            )
        if backend == "cpu":
            _check_cpu_layout(kv_caches[names[0]], self._config.cache_config.cache_dtype)
        self.device = first.device
        self._layout = KVLayout(
            num_layers=len(self.caches),
            num_kv_heads=first.num_heads,
            head_dim=first.head_dim,
            dtype=DTYPE_NAMES[first.dtype],
            mla=backend == "mla",
        )
        options = self._connector._options
        model = self._config.model_config
        parallel = self._config.parallel_config
        rank = get_tensor_model_parallel_rank()
        namespace = store_namespace(
            options.store,
            model=options.model_name or model.model,
            revision=options.model_revision or weights_revision(model.model, model.revision),
            layout=self.layout,
            tp_rank=rank,
            tp_size=parallel.tensor_parallel_size,
        )
        self._store = shared_stores.acquire(options.store, namespace, control=rank == 0)
        if rank == 0:
            address = self._connector._address
            register_local(address, self._lookup)
            self._server = LookupServer(address, self._connector._authkey, self._lookup)
        log.info(
            "kvstore connector: %d layers (%s backend), %s, chunks of %d tokens, tiers %s",
            len(self.caches),
            backend,
            self.layout,
            options.store.chunk_tokens,
            [tier.name for tier in self.store.tiers],
        )

    def _lookup(self, tokens: npt.NDArray[np.int32]) -> int:
        """The store's cached prefix, after any save still writing a longer prefix of it.

        The running saves are listed before the store is asked, so a save that
        finishes in between is either seen by the lookup or waited for.
        """
        running = self._inflight.prefixes_of(tokens)
        hit = self.store.lookup(tokens).tokens
        longer = [future for future, saved in running if saved > hit]
        if not longer:
            return hit
        wait(longer)
        return self.store.lookup(tokens).tokens

    # ------------------------------------------------------------------ loads

    def start_load(self, metadata: KVStoreConnectorMetadata) -> None:
        if metadata.loads:
            self._job = LoadJob(self, metadata.loads)

    def wait_layer(self, layer_name: str) -> None:
        if self._job is not None and layer_name in self.index:
            self._job.wait_layer(self.index[layer_name])

    def _finish_load(self) -> None:
        if self._job is None:
            return
        job, self._job = self._job, None
        job.join()
        self._loads.update(job.results)
        self._load_errors.update(job.failed_blocks)
        for req_id, (asked, loaded) in job.results.items():
            if loaded < asked:
                log.warning(
                    "kvstore: %s loaded %d of %d cached tokens; vLLM recomputes the rest",
                    req_id,
                    loaded,
                    asked,
                )

    # ------------------------------------------------------------------ saves

    def _new_pending(self, spec: SaveSpec) -> PendingSave:
        tokens = len(spec.token_ids)
        kv = torch.empty(
            self.layout.shape(tokens), dtype=self.layout.torch_dtype, device=self.device
        )
        return PendingSave(spec, kv)

    def _gather(self, pending: PendingSave, layer: int) -> None:
        """Copy one layer of a save out of vLLM's cache; a failure drops the save, logged."""
        spec = pending.spec
        try:
            slots = self._save_slots.get(spec.req_id)
            if slots is None:
                slots = block_slots(spec.block_ids, self.block_size, 0, len(spec.token_ids))
                slots = self._save_slots[spec.req_id] = slots.to(self.device)
            gather(self.caches[layer], slots, out=pending.kv[layer : layer + 1])
        except Exception:
            log.exception(
                "kvstore: copying %s out of vLLM's cache failed; not saving it", spec.req_id
            )
            pending.failed = True
        pending.layers.add(layer)

    def save_layer(self, metadata: KVStoreConnectorMetadata, layer_name: str) -> None:
        layer = self.index.get(layer_name)
        if layer is None:
            return
        for spec in metadata.saves:
            if spec.finished:
                continue
            pending = self._pending.get(spec.req_id)
            if pending is None:
                pending = self._pending[spec.req_id] = self._new_pending(spec)
            if not pending.failed:
                self._gather(pending, layer)

    def finish_step(self, metadata: KVStoreConnectorMetadata) -> None:
        """End of a step: finish loads, copy out finished requests (whose blocks
        vLLM keeps until ``get_finished`` reports them), hand saves to the store."""
        self._finish_load()
        saves = list(self._pending.values())
        self._pending = {}
        for spec in metadata.saves:
            if spec.finished:
                pending = self._new_pending(spec)
                for layer in range(len(self.caches)):
                    if not pending.failed:
                        self._gather(pending, layer)
                saves.append(pending)
                self._sent.add(spec.req_id)
        self._save_slots.clear()
        for pending in saves:
            if pending.failed:
                continue
            if len(pending.layers) != len(self.caches):
                log.warning(
                    "kvstore: %s: only %d of %d layers were saved this step; not storing it",
                    pending.spec.req_id,
                    len(pending.layers),
                    len(self.caches),
                )
                continue
            self._submit(pending.spec, pending.kv.cpu())
        if self._connector._options.blocking_save:
            self._inflight.drain(0)
            self.store.flush()

    def _submit(self, spec: SaveSpec, kv: torch.Tensor) -> None:
        size = kv.numel() * kv.element_size()
        self._inflight.drain(self._connector._options.max_inflight_save_bytes - size)
        future = asyncio.run_coroutine_threadsafe(
            self.store.async_store.store(spec.token_ids, kv), shared_loop().loop
        )
        future.add_done_callback(functools.partial(log_save, spec.req_id))
        self._inflight.add(future, np.asarray(spec.token_ids, dtype="<i4"), size)

    def finished_sending(self) -> set[str] | None:
        """Finished requests whose blocks were copied out this step: vLLM may free them."""
        sent, self._sent = self._sent, set()
        return sent or None

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_worker_meta(self) -> KVStoreWorkerMetadata | None:
        if not self._loads:
            return None
        loads, self._loads = self._loads, {}
        return KVStoreWorkerMetadata(loads)

    def close(self) -> None:
        self._finish_load()
        self._inflight.drain(0)
        if self._server is not None:
            unregister_local(self._server.address)
            self._server.close()
            self._server = None
        if self._store is not None:
            store, self._store = self._store, None
            shared_stores.release(store)


def _check_cpu_layout(layer: torch.Tensor, cache_dtype: str) -> None:
    """Check that vLLM's CPU attention stores KV where ``cpu_attention_planes`` reads it.

    Writes known keys and values into a scratch cache with vLLM's own
    ``cpu_attn_reshape_and_cache`` (for the ISA this process's attention uses)
    and reads them back through the views; a mismatch (an ISA that packs keys
    differently, or a later vLLM) refuses to start rather than store wrong KV.
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kvstore.connectors.vllm_paged import cpu_attention_planes

    _, heads, size, joined = layer.shape
    dim = joined // 2
    isa = _get_attn_isa(layer.dtype, size, dim, cache_dtype)
    scratch = torch.zeros((2, heads, size, joined), dtype=layer.dtype)
    key_cache, value_cache = scratch.view(2, heads, 2 * size, dim).chunk(2, dim=2)
    tokens = size + 3
    generator = torch.Generator().manual_seed(0)
    key = torch.randn((tokens, heads, dim), generator=generator).to(layer.dtype)
    value = torch.randn((tokens, heads, dim), generator=generator).to(layer.dtype)
    slots = torch.arange(tokens, dtype=torch.int64) + size // 2
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    keys, values = cpu_attention_planes(scratch)
    blocks, offsets = slots // size, slots % size
    if not (
        torch.equal(keys[blocks, offsets], key) and torch.equal(values[blocks, offsets], value)
    ):
        raise NotSupportedError(
            f"vLLM's CPU attention ({isa} ISA, {layer.dtype}) lays out KV differently than "
            "kvstore reads it; use another dtype (the amx ISA serves bfloat16 on AMX CPUs) "
            "or a vLLM release kvstore supports"
        )
