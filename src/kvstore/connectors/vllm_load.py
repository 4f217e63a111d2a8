"""A step's loads on the vLLM worker: scatter the hits into the paged cache,
straight from the store's memory where it lends it, else read in batches.

The chunks the store's first tier holds are lent as views of its memory
(``borrow_chunks``) and scattered from there, with no copy in between, one
layer at a time: each layer is released to the forward pass
(``wait_layer``) as soon as every load has it in place, so the forward pass
runs while the later layers are copied. Chunks only lower tiers hold are read
(``retrieve_chunks``) in batches on a reader thread, each batch scattered
while the next is read, before any layer is released (a read chunk holds
every layer). Only the chunks past vLLM's own prefix-cache hit are loaded.

On vLLM's CPU backend every layer is loaded before the forward pass starts
(released layer by layer, the copies would compete with the forward pass for
the same cores), so the cores are idle meanwhile: the layers are split over
``ScatterThreads``, each copying its share of them with vLLM's kernel, which
releases the GIL (1.7 times one thread's speed on 2 cores, measured).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
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


@dataclass
class _Lent:
    """Chunks ``first`` to ``first + len(chunks)`` of a load, lent by the store."""

    spec: LoadSpec
    first: int
    chunks: list[torch.Tensor]


class ScatterThreads:
    """Threads that copy the layers of a CPU load into vLLM's cache side by side,
    layer ``i`` on thread ``i % count``. They are started for each load and end
    with it: vLLM's copy kernel runs OpenMP on the thread that calls it, and an
    OpenMP team that outlived the load would slow every parallel region of
    vLLM's forward pass (``kvstore.host_copy`` says why)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def run(self, layers: int, scatter_layer: Callable[[int], None]) -> None:
        """Call ``scatter_layer`` for every layer below ``layers``; wait for all of
        them, then raise the first failure."""

        def share(offset: int) -> None:
            for layer in range(offset, layers, self.count):
                scatter_layer(layer)

        with ThreadPoolExecutor(self.count, thread_name_prefix="kvstore-vllm-scatter") as pool:
            jobs = [pool.submit(share, offset) for offset in range(min(self.count, layers))]
        for job in jobs:
            job.result()


class LoadJob:
    """Loads this step's hits on a thread (see the module docstring); reads run on
    ``reader`` while this job's thread scatters, with the help of ``scatterers``
    on the CPU backend."""

    def __init__(
        self,
        transfer: Transfer,
        loads: list[LoadSpec],
        reader: ThreadPoolExecutor,
        scatterers: ScatterThreads | None = None,
    ) -> None:
        self._transfer = transfer
        self._scatterers = scatterers
        self._loads = loads
        self._reader = reader
        self._chunk = transfer.chunk_tokens
        self._ready = [threading.Event() for _ in transfer.caches]
        self.results: dict[str, tuple[int, int]] = {}
        self.failed_blocks: set[int] = set()
        self._loaded = {
            spec.req_id: spec.skip_tokens // self._chunk * self._chunk for spec in loads
        }
        self._thread = threading.Thread(target=self._run, name="kvstore-vllm-load", daemon=True)
        self._thread.start()

    def _borrow(self, loans: contextlib.ExitStack) -> list[_Lent]:
        """Each load's chunks past its ``skip_tokens`` that the store lends, held
        until ``loans`` closes."""
        lent = []
        for spec in self._loads:
            keys = self._transfer.keys.of(spec.req_id, spec.token_ids)
            first = spec.skip_tokens // self._chunk
            loan = loans.enter_context(self._transfer.store.borrow_chunks(keys[first:]))
            lent.append(_Lent(spec, first, loan.chunks))
        return lent

    def _batches(self, lent: list[_Lent]) -> list[_Batch]:
        """Each load's chunks past what was lent, in batches of ``BATCH_BYTES``."""
        layout = self._transfer.layout
        per_batch = max(1, BATCH_BYTES // layout.nbytes(self._chunk))
        batches = []
        for part in lent:
            keys = self._transfer.keys.of(part.spec.req_id, part.spec.token_ids)
            for first in range(part.first + len(part.chunks), len(keys), per_batch):
                chunk_keys = keys[first : first + per_batch]
                staging = torch.empty(
                    layout.shape(len(chunk_keys) * self._chunk), dtype=layout.torch_dtype
                )
                batches.append(_Batch(part.spec, first, chunk_keys, staging))
        return batches

    def _read(self, batch: _Batch) -> int:
        """Read a batch into its staging tensor: how many of its chunks were loaded."""
        ct = self._chunk
        outs = [batch.staging[:, :, i * ct : (i + 1) * ct] for i in range(len(batch.keys))]
        return len(self._transfer.store.retrieve_chunks(batch.keys, outs))

    def _read_result(self, reading: Future[int], batch: _Batch) -> int:
        try:
            return reading.result()
        except Exception:
            log.warning("kvstore: loading %s failed", batch.spec.req_id, exc_info=True)
            return 0

    def _target(
        self, spec: LoadSpec, first: int, kv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tokens of ``kv`` (chunks from ``first`` on) that vLLM's own hit does
        not cover, and the slots of the load's blocks they go to; ``None`` when
        there are none. Counts them as loaded."""
        ct = self._chunk
        transfer = self._transfer
        start = max(spec.skip_tokens, first * ct)
        stop = first * ct + kv.shape[2]
        if stop <= start:
            return None
        self._loaded[spec.req_id] = max(self._loaded[spec.req_id], stop)
        slots = block_slots(spec.block_ids, transfer.block_size, start, stop).to(transfer.device)
        return kv[:, :, start - first * ct :], slots

    def _scatter(self, tokens: torch.Tensor, slots: torch.Tensor, layer: int) -> None:
        transfer = self._transfer
        if transfer.write_layer is not None:
            transfer.write_layer(layer, tokens[layer], slots)
        else:
            scatter(tokens[layer : layer + 1].to(transfer.device), transfer.caches[layer], slots)

    def _scatter_layers(
        self, targets: list[tuple[torch.Tensor, torch.Tensor]], *, release: bool
    ) -> None:
        """Scatter every layer of ``targets``: split over the scatter threads where
        there are some (all layers are then in place before any is released),
        else layer by layer, each released to the forward pass when ``release``."""

        def scatter_layer(layer: int) -> None:
            for tokens, slots in targets:
                self._scatter(tokens, slots, layer)

        layers = len(self._transfer.caches)
        if self._scatterers is not None:
            self._scatterers.run(layers, scatter_layer)
            return
        for layer in range(layers):
            scatter_layer(layer)
            if release:
                self._ready[layer].set()

    def _run(self) -> None:
        try:
            with contextlib.ExitStack() as loans:
                lent = self._borrow(loans)
                read = self._read_batches(self._batches(lent))
                targets = [
                    target
                    for part in lent
                    for i, chunk in enumerate(part.chunks)
                    if (target := self._target(part.spec, part.first + i, chunk)) is not None
                ]
                self._scatter_layers(
                    targets, release=read is None and self._transfer.device.type != "cpu"
                )
                if read is not None:
                    read()
            for spec in self._loads:
                self._record(spec, self._loaded[spec.req_id])
        except Exception:
            log.exception("kvstore: copying loaded KV into vLLM's cache failed; vLLM recomputes it")
            for spec in self._loads:
                self._record(spec, 0)
        finally:
            for event in self._ready:
                event.set()

    def _read_batches(self, batches: list[_Batch]) -> Callable[[], None] | None:
        """Start reading ``batches`` (a load's batches end at its first miss); the
        call that scatters them as they come, the last one layer by layer with
        each layer released. ``None`` when there is nothing to read."""
        if not batches:
            return None
        ct = self._chunk
        waiting = deque(batches)
        ended: set[str] = set()

        def following() -> tuple[_Batch, Future[int]] | None:
            """The next batch of a load that has not ended, its read started."""
            while waiting and waiting[0].spec.req_id in ended:
                waiting.popleft()
            if not waiting:
                return None
            batch = waiting.popleft()
            return batch, self._reader.submit(self._read, batch)

        current = following()

        def scatter_all() -> None:
            nonlocal current
            while current is not None:
                batch, reading = current
                chunks = self._read_result(reading, batch)
                if chunks < len(batch.keys):
                    ended.add(batch.spec.req_id)
                current = following()
                target = self._target(batch.spec, batch.first, batch.staging[:, :, : chunks * ct])
                if target is not None:
                    self._scatter_layers([target], release=current is None)

        return scatter_all

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
