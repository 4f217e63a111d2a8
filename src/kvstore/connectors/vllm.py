"""A vLLM v1 KV connector on a kvstore hierarchical store.

vLLM loads it from its module path::

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"config": "/etc/kvstore.yaml"}}'

Scheduler side: for each new request the store's longest cached prefix of the
prompt (whole chunks, at most all tokens but the last) becomes vLLM's external
hit, loaded synchronously before the request's first forward. The prompt's
whole chunks not stored yet are saved in the step its prefill completes; when
a request finishes, the chunks its generated tokens completed are saved too
(its blocks stay allocated until the worker has copied them out).

Worker side (``vllm_worker``): a request's chunk keys are hashed once and
shared by its lookup, load and saves (``vllm_keys``); loads read the hits in
batches on one thread and scatter each into the paged cache on another,
releasing the layers of the last batch one by one to the forward pass
(``vllm_load``); saves gather each layer right after its attention ran and
hand the chunks to the store, whose writes run in the background
(``vllm_saves``). A chunk that cannot
be loaded or verified is reported through ``get_block_ids_with_load_errors``
so vLLM recomputes it instead of using it (with ``kv_load_failure_policy``
``recompute``; vLLM's default ``fail`` fails the request instead).

This module imports vLLM, so import it only inside a vLLM process;
``kvstore.connectors`` itself does not. docs/connectors/vllm.md lists every option.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvstore.connectors.vllm_metadata import KVStoreConnectorMetadata, KVStoreWorkerMetadata
from kvstore.connectors.vllm_options import ConnectorOptions
from kvstore.connectors.vllm_scheduler import SchedulerSide
from kvstore.connectors.vllm_specs import LoadSpec, SaveSpec
from kvstore.connectors.vllm_worker import WorkerSide
from kvstore.errors import NotSupportedError

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
            self._scheduler = SchedulerSide(self)
        else:
            self._worker = WorkerSide(self, vllm_config)

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


__all__ = [
    "ConnectorOptions",
    "KVStoreConnector",
    "KVStoreConnectorMetadata",
    "KVStoreWorkerMetadata",
    "LoadSpec",
    "SaveSpec",
]
