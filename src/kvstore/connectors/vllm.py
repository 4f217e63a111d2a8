"""A vLLM v1 KV connector on a kvstore hierarchical store.

vLLM loads it from its module path::

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"config": "/etc/kvstore.yaml"}}'

Scheduler side: for each new request the store's longest cached prefix of the
prompt (whole chunks, at most all tokens but the last) becomes vLLM's external
hit, loaded synchronously before the request's first forward. The prompt's
whole chunks are saved in the step its prefill completes; when a request
finishes, the chunks its generated tokens completed are saved too (its blocks
stay allocated until the worker has copied them out).

Worker side: loads run on a thread that retrieves every hit from the store and
scatters it layer by layer while the forward pass waits for each layer in
turn; saves gather each layer right after its attention ran and hand the
chunks to the store, whose writes run in the background. A chunk that cannot
be loaded or verified is reported through ``get_block_ids_with_load_errors``
so vLLM recomputes it instead of using it (with ``kv_load_failure_policy``
``recompute``; vLLM's default ``fail`` fails the request instead).

This module imports vLLM, so import it only inside a vLLM process;
``kvstore.connectors`` itself does not. docs/connectors/vllm.md lists every option.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np
import numpy.typing as npt
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.platforms import current_platform

from kvstore.connectors.config import store_namespace
from kvstore.connectors.stores import shared_stores
from kvstore.connectors.vllm_lookup import (
    LookupClient,
    LookupServer,
    local_lookup,
    register_local,
    unregister_local,
)
from kvstore.connectors.vllm_options import ConnectorOptions
from kvstore.connectors.vllm_paged import Backend, block_slots, layer_cache, layer_order
from kvstore.connectors.weights import weights_revision
from kvstore.errors import NotSupportedError
from kvstore.layout import DTYPE_NAMES, KVLayout
from kvstore.store import KVStore
from kvstore.sync import shared_loop
from kvstore.triton_kernels import PagedKVCache, gather, scatter

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvstore.connectors.vllm")


def _socket_address(vllm_config: VllmConfig) -> tuple[str, bytes]:
    """The worker's lookup socket and its authentication key, both from the engine id."""
    transfer = vllm_config.kv_transfer_config
    engine = f"{transfer.engine_id}:{vllm_config.parallel_config.data_parallel_rank}"
    digest = blake3.blake3(engine.encode()).hexdigest()
    return str(Path(tempfile.gettempdir()) / f"kvstore-vllm-{digest[:16]}.sock"), bytes.fromhex(
        digest[16:48]
    )


# ----------------------------------------------------------------- metadata


@dataclass
class LoadSpec:
    """Load the cached prefix ``token_ids`` into ``block_ids``, skipping the
    first ``skip_tokens`` (already in vLLM's own prefix cache)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    skip_tokens: int


@dataclass
class SaveSpec:
    """Save the whole chunks ``token_ids`` from ``block_ids``: layer by layer
    during this step's forward, or all layers at once for a finished request."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    finished: bool


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """What the scheduler asks the workers to load and save this step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class KVStoreWorkerMetadata(KVConnectorWorkerMetadata):
    """Per request loaded this step: (tokens asked, tokens loaded); the minimum over workers."""

    loads: dict[str, tuple[int, int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVStoreWorkerMetadata):
            for req_id, (asked, loaded) in other.loads.items():
                mine = self.loads.get(req_id, (asked, loaded))
                self.loads[req_id] = (asked, min(mine[1], loaded))
        return self


# ---------------------------------------------------------------- scheduler


@dataclass
class _Tracked:
    """Scheduler-side state of one request."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    hit: int = 0
    loaded: int | None = None
    stored: int = 0
    prompt_saved: bool = False


def _cacheable(request: Request) -> bool:
    """Whether a request's KV follows from its token ids alone (no embeddings,
    multimodal inputs, LoRA adapter or prefix-cache salt)."""
    return (
        request.prompt_token_ids is not None
        and getattr(request, "prompt_embeds", None) is None
        and not getattr(request, "mm_features", None)
        and getattr(request, "lora_request", None) is None
        and getattr(request, "cache_salt", None) is None
    )


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM's KV connector API on a kvstore store (see the module docstring)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._block_size: int = vllm_config.cache_config.block_size
        self._options = ConnectorOptions.parse(
            dict(transfer.kv_connector_extra_config),
            producer=transfer.kv_role == "kv_producer",
            block_size=self._block_size,
        )
        self._chunk_tokens = self._options.store.chunk_tokens
        self._can_load = transfer.kv_role in ("kv_consumer", "kv_both")
        self._can_save = transfer.kv_role in ("kv_producer", "kv_both")
        self._address, self._authkey = _socket_address(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self)
        else:
            self._worker = _WorkerSide(self, vllm_config)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Yes: loads and saves run between layers, which a whole-model CUDA graph would skip."""
        return True

    # -------------------------------------------------------- scheduler API

    def on_new_request(self, request: Request) -> None:
        self._scheduler.track(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.matched(request, num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._scheduler.allocated(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request, block_ids)

    def has_pending_block_frees(self) -> bool:
        return self._scheduler.pending_frees()

    # ----------------------------------------------------------- worker API

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.start_load(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_layer(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        self._worker.save_layer(self._metadata(), layer_name)

    def wait_for_save(self) -> None:
        self._worker.finish_step(self._metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.finished_sending(), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.take_worker_meta()

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.SCHEDULER:
            self._scheduler.close()
        else:
            self._worker.close()

    def _metadata(self) -> KVStoreConnectorMetadata:
        metadata = self._get_connector_metadata()
        if not isinstance(metadata, KVStoreConnectorMetadata):
            raise NotSupportedError(f"unexpected connector metadata {type(metadata).__name__}")
        return metadata


class _SchedulerSide:
    """Decides, per step, what each worker loads and saves."""

    def __init__(self, connector: KVStoreConnector) -> None:
        self._connector = connector
        self._chunk = connector._chunk_tokens
        self._block = connector._block_size
        self._tracked: dict[str, _Tracked] = {}
        self._allocated: dict[str, tuple[int, int]] = {}
        self._finished_saves: list[SaveSpec] = []
        self._awaiting_free: set[str] = set()
        self._client: LookupClient | None = None

    def track(self, request: Request) -> _Tracked:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            tracked = self._tracked[request.request_id] = _Tracked(request)
        return tracked

    def _lookup(self, tokens: list[int]) -> int:
        array = np.asarray(tokens, dtype="<i4")
        local = local_lookup(self._connector._address)
        if local is not None:
            return local(array)
        if self._client is None:
            options = self._connector._options
            self._client = LookupClient(
                self._connector._address, self._connector._authkey, options.lookup_timeout_s
            )
        return self._client.lookup(array)

    def matched(self, request: Request, num_computed_tokens: int) -> int | None:
        """External tokens: the store's cached whole chunks past ``num_computed_tokens``;
        None (ask again next step) while a finished request's save that extends
        this prompt waits to be handed to the workers."""
        if not self._connector._can_load or not _cacheable(request):
            return 0
        limit: int = (request.num_tokens - 1) // self._chunk * self._chunk
        if limit <= num_computed_tokens:
            return 0
        tokens = list(request.all_token_ids[:limit])
        hit = min(self._lookup(tokens), limit)
        for spec in self._finished_saves:
            saved = len(spec.token_ids)
            if hit < saved <= limit and tokens[:saved] == spec.token_ids:
                log.debug("kvstore: %s waits for %s's save", request.request_id, spec.req_id)
                return None
        log.debug("kvstore: %s: %d of %d tokens cached", request.request_id, hit, limit)
        tracked = self.track(request)
        tracked.hit = hit
        return max(0, hit - num_computed_tokens)

    def allocated(self, request: Request, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            hit = self._tracked[request.request_id].hit
            self._allocated[request.request_id] = (hit, hit - num_external_tokens)

    def build(self, output: SchedulerOutput) -> KVStoreConnectorMetadata:
        metadata = KVStoreConnectorMetadata()
        for new in output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan(tracked, new.num_computed_tokens, output, metadata)
        cached = output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[index]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                tracked.block_ids.extend(new_blocks[0])
            self._plan(tracked, cached.num_computed_tokens[index], output, metadata)
        metadata.saves.extend(self._finished_saves)
        self._finished_saves = []
        return metadata

    def _plan(
        self,
        tracked: _Tracked,
        computed: int,
        output: SchedulerOutput,
        metadata: KVStoreConnectorMetadata,
    ) -> None:
        request = tracked.request
        req_id = request.request_id
        load = self._allocated.pop(req_id, None)
        if load is not None:
            hit, skip = load
            metadata.loads.append(
                LoadSpec(
                    req_id,
                    list(request.all_token_ids[:hit]),
                    tracked.block_ids[: hit // self._block],
                    skip,
                )
            )
            tracked.stored = max(tracked.stored, hit)
        if not self._connector._can_save or not _cacheable(request) or tracked.prompt_saved:
            return
        done = computed + output.num_scheduled_tokens.get(req_id, 0)
        if done < request.num_prompt_tokens:
            return
        tracked.prompt_saved = True
        whole = request.num_prompt_tokens // self._chunk * self._chunk
        if whole > tracked.stored:
            metadata.saves.append(
                SaveSpec(
                    req_id,
                    list(request.prompt_token_ids[:whole]),
                    tracked.block_ids[: whole // self._block],
                    finished=False,
                )
            )
            tracked.stored = whole

    def update(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if isinstance(meta, KVStoreWorkerMetadata):
            for req_id, (asked, loaded) in meta.loads.items():
                tracked = self._tracked.get(req_id)
                if tracked is None:
                    continue
                tracked.loaded = loaded
                if loaded < asked:
                    tracked.stored = min(tracked.stored, loaded)
                    tracked.prompt_saved = False
        self._awaiting_free.difference_update(output.finished_sending or ())

    def finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        tracked = self._tracked.pop(request.request_id, None)
        self._allocated.pop(request.request_id, None)
        if tracked is None:
            return False, None
        params = {
            "kvstore_hit_tokens": tracked.hit,
            "kvstore_loaded_tokens": tracked.hit if tracked.loaded is None else tracked.loaded,
        }
        if not (self._connector._can_save and self._connector._options.save_decode):
            return False, params
        if not _cacheable(request):
            return False, params
        whole = min(request.num_computed_tokens, len(block_ids) * self._block)
        whole = whole // self._chunk * self._chunk
        if whole <= tracked.stored:
            return False, params
        self._finished_saves.append(
            SaveSpec(
                request.request_id,
                list(request.all_token_ids[:whole]),
                list(block_ids[: whole // self._block]),
                finished=True,
            )
        )
        self._awaiting_free.add(request.request_id)
        log.debug("kvstore: %s finished; saving %d tokens", request.request_id, whole)
        return True, params

    def pending_frees(self) -> bool:
        return bool(self._awaiting_free)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


# ------------------------------------------------------------------- worker


class _LoadJob:
    """Retrieves this step's hits, then scatters them layer by layer on a thread."""

    def __init__(self, worker: _WorkerSide, loads: list[LoadSpec]) -> None:
        self._worker = worker
        self._loads = loads
        self._ready = [threading.Event() for _ in worker.caches]
        self.results: dict[str, tuple[int, int]] = {}
        self.failed_blocks: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="kvstore-vllm-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        worker = self._worker
        staged: list[tuple[LoadSpec, torch.Tensor, torch.Tensor, int]] = []
        try:
            for spec in self._loads:
                asked = len(spec.token_ids)
                staging = torch.empty(worker.layout.shape(asked), dtype=worker.layout.torch_dtype)
                try:
                    loaded = worker.store.retrieve(spec.token_ids, out=staging).tokens
                except Exception:
                    log.warning("kvstore: loading %s failed", spec.req_id, exc_info=True)
                    loaded = 0
                self._record(spec, loaded)
                if loaded > spec.skip_tokens:
                    slots = block_slots(spec.block_ids, worker.block_size, spec.skip_tokens, loaded)
                    staged.append((spec, staging, slots.to(worker.device), loaded))
            for layer, cache in enumerate(worker.caches):
                for spec, staging, slots, loaded in staged:
                    chunk = staging[layer : layer + 1, :, spec.skip_tokens : loaded]
                    scatter(chunk.to(worker.device), cache, slots)
                self._ready[layer].set()
        except Exception:
            log.exception("kvstore: copying loaded KV into vLLM's cache failed; vLLM recomputes it")
            for spec in self._loads:
                self._record(spec, 0)
        finally:
            for event in self._ready:
                event.set()

    def _record(self, spec: LoadSpec, loaded: int) -> None:
        """Note what a load got; blocks past it (and past vLLM's own hit) are errors."""
        self.results[spec.req_id] = (len(spec.token_ids), loaded)
        if loaded < len(spec.token_ids):
            first = max(loaded, spec.skip_tokens) // self._worker.block_size
            self.failed_blocks.update(spec.block_ids[first:])

    def wait_layer(self, layer: int) -> None:
        self._ready[layer].wait()

    def join(self) -> None:
        self._thread.join()


class _InflightSaves:
    """Background ``store`` calls still running, with the prefixes they save.

    A lookup for a prompt one of them extends waits for it, so a request that
    follows another (the next turn of a chat) finds what the earlier one is
    still writing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saves: list[tuple[Future[Any], npt.NDArray[np.int32], int]] = []

    def add(self, future: Future[Any], tokens: npt.NDArray[np.int32], size: int) -> None:
        with self._lock:
            self._saves.append((future, tokens, size))

    def _live(self) -> list[tuple[Future[Any], npt.NDArray[np.int32], int]]:
        with self._lock:
            self._saves = [save for save in self._saves if not save[0].done()]
            return list(self._saves)

    def prefixes_of(self, tokens: npt.NDArray[np.int32]) -> list[tuple[Future[Any], int]]:
        """Saves still running of a prefix of ``tokens``, with that prefix's length."""
        return [
            (future, len(saved))
            for future, saved, _ in self._live()
            if len(saved) <= len(tokens) and np.array_equal(tokens[: len(saved)], saved)
        ]

    def drain(self, limit: int) -> None:
        """Wait, oldest first, until at most ``limit`` bytes of saves are in flight."""
        while True:
            live = self._live()
            if not live or sum(size for _, _, size in live) <= max(limit, 0):
                return
            wait([live[0][0]])


@dataclass
class _Pending:
    """A save being gathered: the chunk tensor, the layers copied into it so far,
    and whether a copy failed (then it is not stored)."""

    spec: SaveSpec
    kv: torch.Tensor
    layers: set[int] = field(default_factory=set)
    failed: bool = False


class _WorkerSide:
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
        self._job: _LoadJob | None = None
        self._pending: dict[str, _Pending] = {}
        self._inflight = _InflightSaves()
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
            self._job = _LoadJob(self, metadata.loads)

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

    def _new_pending(self, spec: SaveSpec) -> _Pending:
        tokens = len(spec.token_ids)
        kv = torch.empty(
            self.layout.shape(tokens), dtype=self.layout.torch_dtype, device=self.device
        )
        return _Pending(spec, kv)

    def _gather(self, pending: _Pending, layer: int) -> None:
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
        future.add_done_callback(functools.partial(_log_save, spec.req_id))
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


def _log_save(req_id: str, future: Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.warning("kvstore: saving %s failed: %s", req_id, error)
    else:
        log.debug("kvstore: saved %s: %s", req_id, future.result())


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


__all__ = [
    "ConnectorOptions",
    "KVStoreConnector",
    "KVStoreConnectorMetadata",
    "KVStoreWorkerMetadata",
    "LoadSpec",
    "SaveSpec",
]
