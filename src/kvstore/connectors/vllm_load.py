"""A step's loads on the vLLM worker: read the hits from the store in batches of
chunks and scatter each into the paged cache while the next one is read.

A chunk holds every layer, so no layer is complete before the last batch is
read. Each batch but the last is scattered whole while the next is read; the
last is scattered layer by layer, each layer released to the forward pass
(``wait_layer``) as soon as it is in place, so the forward pass runs while the
later layers are copied. Only the chunks past vLLM's own prefix-cache hit are read.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvstore.connectors.vllm_paged import block_slots
from kvstore.connectors.vllm_specs import LoadSpec
from kvstore.connectors.vllm_transfer import Transfer
from kvstore.triton_kernels import scatter

log = logging.getLogger("kvstore.connectors.vllm")

BATCH_BYTES = 16 << 20
"""Bytes of chunks read by one ``retrieve_chunks``: small enough that reading the
next batch overlaps scattering this one, large enough to keep the tiers' batching."""


@dataclass
class _Batch:
    """Chunks ``first`` to ``first + len(keys)`` of a load, read into ``staging``."""

    spec: LoadSpec
    first: int
    keys: list[bytes]
    staging: torch.Tensor


class LoadJob:
    """Loads this step's hits on a thread (see the module docstring); reads run on
    ``reader`` while this job's thread scatters."""

    def __init__(
        self, transfer: Transfer, loads: list[LoadSpec], reader: ThreadPoolExecutor
    ) -> None:
        self._transfer = transfer
        self._loads = loads
        self._reader = reader
        self._chunk = transfer.chunk_tokens
        self._ready = [threading.Event() for _ in transfer.caches]
        self.results: dict[str, tuple[int, int]] = {}
        self.failed_blocks: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="kvstore-vllm-load", daemon=True)
        self._thread.start()

    def _batches(self) -> list[_Batch]:
        """Each load's chunks past its ``skip_tokens``, in batches of ``BATCH_BYTES``."""
        layout = self._transfer.layout
        per_batch = max(1, BATCH_BYTES // layout.nbytes(self._chunk))
        batches = []
        for spec in self._loads:
            keys = self._transfer.keys.of(spec.req_id, spec.token_ids)
            for first in range(spec.skip_tokens // self._chunk, len(keys), per_batch):
                chunk_keys = keys[first : first + per_batch]
                staging = torch.empty(
                    layout.shape(len(chunk_keys) * self._chunk), dtype=layout.torch_dtype
                )
                batches.append(_Batch(spec, first, chunk_keys, staging))
        return batches

    def _read(self, batch: _Batch) -> int:
        """Read a batch into its staging tensor: how many of its chunks were loaded."""
        ct = self._chunk
        outs = [batch.staging[:, :, i * ct : (i + 1) * ct] for i in range(len(batch.keys))]
        return len(self._transfer.store.retrieve_chunks(batch.keys, outs))

    def _loaded(self, reading: Future[int], batch: _Batch) -> int:
        try:
            return reading.result()
        except Exception:
            log.warning("kvstore: loading %s failed", batch.spec.req_id, exc_info=True)
            return 0

    def _run(self) -> None:
        transfer = self._transfer
        ct = self._chunk
        loaded = {spec.req_id: spec.skip_tokens // ct * ct for spec in self._loads}
        ended: set[str] = set()
        try:
            waiting = deque(self._batches())

            def following() -> tuple[_Batch, Future[int]] | None:
                """The next batch of a load that has not ended, its read started."""
                while waiting and waiting[0].spec.req_id in ended:
                    waiting.popleft()
                if not waiting:
                    return None
                batch = waiting.popleft()
                return batch, self._reader.submit(self._read, batch)

            current = following()
            while current is not None:
                batch, reading = current
                spec = batch.spec
                chunks = self._loaded(reading, batch)
                if chunks < len(batch.keys):
                    ended.add(spec.req_id)
                current = following()
                start = max(spec.skip_tokens, batch.first * ct)
                stop = (batch.first + chunks) * ct
                if stop <= start:
                    continue
                loaded[spec.req_id] = stop
                slots = block_slots(spec.block_ids, transfer.block_size, start, stop)
                slots = slots.to(transfer.device)
                tokens = batch.staging[:, :, start - batch.first * ct : stop - batch.first * ct]
                for layer, cache in enumerate(transfer.caches):
                    scatter(tokens[layer : layer + 1].to(transfer.device), cache, slots)
                    if current is None:
                        self._ready[layer].set()
            for spec in self._loads:
                self._record(spec, loaded[spec.req_id])
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
            first = max(loaded, spec.skip_tokens) // self._transfer.block_size
            self.failed_blocks.update(spec.block_ids[first:])

    def wait_layer(self, layer: int) -> None:
        self._ready[layer].wait()

    def join(self) -> None:
        self._thread.join()
