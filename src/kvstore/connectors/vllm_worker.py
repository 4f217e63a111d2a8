"""The vLLM connector's worker side: the store, the paged-cache views, loads and saves."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from vllm.platforms import current_platform

from kvstore.connectors.stores import shared_stores
from kvstore.connectors.vllm_keys import RequestKeys
from kvstore.connectors.vllm_load import LoadJob, ScatterThreads
from kvstore.connectors.vllm_lookup import LookupServer, register_local, unregister_local
from kvstore.connectors.vllm_metadata import KVStoreConnectorMetadata, KVStoreWorkerMetadata
from kvstore.connectors.vllm_paged import Backend, layer_cache, layer_order
from kvstore.connectors.vllm_saves import Saves
from kvstore.connectors.vllm_transfer import LayerWriter, Transfer
from kvstore.connectors.weights import weights_revision
from kvstore.errors import NotSupportedError
from kvstore.layout import DTYPE_NAMES, KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvstore.connectors.vllm import KVStoreConnector

log = logging.getLogger("kvstore.connectors.vllm")

MAX_SCATTER_THREADS = 4
"""Most threads a CPU load copies layers on unless ``load_threads`` says: as many
as torch's (vLLM sets them to its cores), no more than this, since each copy is
memory-bound."""


class WorkerSide:
    """Owns the store and the paged-cache views; runs loads and saves."""

    def __init__(self, connector: KVStoreConnector, vllm_config: VllmConfig) -> None:
        self._connector = connector
        self._config = vllm_config
        self.index: dict[str, int] = {}
        self._transfer: Transfer | None = None
        self._saves: Saves | None = None
        self._server: LookupServer | None = None
        self._job: LoadJob | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-read")
        self._scatterers: ScatterThreads | None = None
        self._load_errors: set[int] = set()
        self._loads: dict[str, tuple[int, int]] = {}
        self._sent: set[str] = set()

    @property
    def transfer(self) -> Transfer:
        if self._transfer is None:
            raise NotSupportedError("vLLM has not registered its KV caches with kvstore yet")
        return self._transfer

    @property
    def saves(self) -> Saves:
        if self._saves is None:
            raise NotSupportedError("vLLM has not registered its KV caches with kvstore yet")
        return self._saves

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
        caches = [layer_cache(kv_caches[name], backend) for name in names]
        self.index = {name: position for position, name in enumerate(names)}
        first = caches[0]
        block_size = self._connector._block_size
        if first.block_size != block_size:
            raise NotSupportedError(
                f"vLLM's kernel block size {first.block_size} differs from its block size "
                f"{block_size}; kvstore needs them equal"
            )
        write_layer = None
        if backend == "cpu":
            cache_dtype = self._config.cache_config.cache_dtype
            _check_cpu_layout(kv_caches[names[0]], cache_dtype)
            write_layer = _cpu_layer_writer([kv_caches[name] for name in names], cache_dtype)
            threads = self._connector._options.load_threads or min(
                MAX_SCATTER_THREADS, torch.get_num_threads()
            )
            threads = min(threads, len(names))
            self._scatterers = ScatterThreads(threads) if threads > 1 else None
        layout = KVLayout(
            num_layers=len(caches),
            num_kv_heads=first.num_heads,
            head_dim=first.head_dim,
            dtype=DTYPE_NAMES[first.dtype],
            mla=backend == "mla",
        )
        options = self._connector._options
        model = self._config.model_config
        parallel = self._config.parallel_config
        rank = get_tensor_model_parallel_rank()
        namespace = options.store.namespace(
            model=options.model_name or model.model,
            revision=options.model_revision or weights_revision(model.model, model.revision),
            layout=layout,
            tp_rank=rank,
            tp_size=parallel.tensor_parallel_size,
        )
        store = shared_stores.acquire(options.store, namespace, control=rank == 0)
        self._transfer = Transfer(
            store=store,
            keys=RequestKeys(store, options.store.chunk_tokens),
            caches=caches,
            layout=layout,
            block_size=block_size,
            chunk_tokens=options.store.chunk_tokens,
            device=first.device,
            write_layer=write_layer,
        )
        self._saves = Saves(
            self._transfer,
            options.max_inflight_save_bytes,
            buffer_bytes=options.save_buffer_bytes,
        )
        if rank == 0:
            address = self._connector._address
            register_local(address, self._lookup)
            self._server = LookupServer(address, self._connector._authkey, self._lookup)
        log.info(
            "kvstore connector: %d layers (%s backend), %s, chunks of %d tokens, tiers %s",
            len(caches),
            backend,
            layout,
            options.store.chunk_tokens,
            [tier.name for tier in store.tiers],
        )

    def _lookup(self, req_id: str, tokens: npt.NDArray[np.int32]) -> int:
        """The store's cached prefix of request ``req_id``'s ``tokens``, after any save
        still writing a longer prefix of it.

        The running saves are listed before the store is asked, so a save that
        finishes in between is either seen by the lookup or waited for.
        """
        transfer = self.transfer
        keys = transfer.keys.of(req_id, tokens)
        if not keys:
            return 0
        running = self.saves.inflight.prefixes_of(keys)
        hit = len(transfer.store.locate(keys))
        longer = [future for future, saved in running if saved > hit]
        if longer:
            wait(longer)
            hit = len(transfer.store.locate(keys))
        return hit * transfer.chunk_tokens

    # ------------------------------------------------------------------ loads

    def start_load(self, metadata: KVStoreConnectorMetadata) -> None:
        if metadata.loads:
            self._job = LoadJob(self.transfer, metadata.loads, self._reader, self._scatterers)

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

    def save_layer(self, metadata: KVStoreConnectorMetadata, layer_name: str) -> None:
        layer = self.index.get(layer_name)
        if layer is not None and metadata.saves:
            self.saves.gather_layer(metadata.saves, layer)

    def finish_step(self, metadata: KVStoreConnectorMetadata) -> None:
        """End of a step: finish loads, hand saves to the store, forget the keys of
        requests that finished."""
        self._finish_load()
        if self._saves is None:
            return
        self._sent |= self._saves.submit(metadata.saves)
        self.transfer.keys.forget(metadata.finished)
        if self._connector._options.blocking_save:
            self._saves.inflight.drain(0)
            self.transfer.store.flush()

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
        self._reader.shutdown()
        if self._saves is not None:
            self._saves.inflight.drain(0)
        if self._server is not None:
            unregister_local(self._server.address)
            self._server.close()
            self._server = None
        if self._transfer is not None:
            store, self._transfer, self._saves = self._transfer.store, None, None
            shared_stores.release(store)


def _cpu_layer_writer(layers: list[torch.Tensor], cache_dtype: str) -> LayerWriter:
    """Loads into vLLM's CPU attention cache with vLLM's own kernel, the one its
    forward pass stores KV with (``cpu_attn_reshape_and_cache``): it writes the
    transposed keys faster than a strided copy (4.2 against 3.1 GB/s measured on
    Llama blocks of 128 tokens), and ``_check_cpu_layout`` proved at start that
    it lays KV out where ``cpu_attention_planes`` reads it."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    blocks, heads, size, joined = layers[0].shape
    dim = joined // 2
    isa = _get_attn_isa(layers[0].dtype, size, dim, cache_dtype)
    planes = [layer.view(blocks, heads, 2 * size, dim).chunk(2, dim=2) for layer in layers]

    def write(layer: int, kv: torch.Tensor, slots: torch.Tensor) -> None:
        key_cache, value_cache = planes[layer]
        ops.cpu_attn_reshape_and_cache(kv[0], kv[1], key_cache, value_cache, slots, isa)

    return write


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
