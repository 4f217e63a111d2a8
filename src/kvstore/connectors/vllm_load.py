"""A step's loads on the vLLM worker: retrieve the hits, scatter them into the paged cache."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import torch

from kvstore.connectors.vllm_paged import block_slots
from kvstore.connectors.vllm_specs import LoadSpec
from kvstore.triton_kernels import scatter

if TYPE_CHECKING:
    from kvstore.connectors.vllm_worker import WorkerSide

log = logging.getLogger("kvstore.connectors.vllm")


class LoadJob:
    """Retrieves this step's hits, then scatters them layer by layer on a thread."""

    def __init__(self, worker: WorkerSide, loads: list[LoadSpec]) -> None:
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
