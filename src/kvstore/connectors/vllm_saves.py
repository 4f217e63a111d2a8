"""Saves on the vLLM worker: those being gathered this step and those the store still writes.

A save copies out of vLLM's paged cache only the chunks the scheduler has not
seen stored (``SaveSpec.start`` on), and hands them to the store under the
request's keys, hashed once (``RequestKeys``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstore.connectors.vllm_paged import block_slots
from kvstore.connectors.vllm_specs import SaveSpec
from kvstore.connectors.vllm_transfer import Transfer
from kvstore.layout import KVLayout
from kvstore.triton_kernels import gather

log = logging.getLogger("kvstore.connectors.vllm")


class InflightSaves:
    """Background ``store_chunks`` calls still running, with the prefixes they end.

    A lookup for a prompt one of them extends waits for it, so a request that
    follows another (the next turn of a chat) finds what the earlier one is
    still writing. A save is known by the number of chunks of the prefix it
    ends and by its last chunk's key: chunk keys chain, so a prompt whose key
    at that position is the same shares the whole prefix.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saves: list[tuple[Future[Any], int, bytes, int]] = []

    def add(self, future: Future[Any], keys: Sequence[bytes], size: int) -> None:
        """Track ``future``, saving chunks whose last key is ``keys[-1]`` (the
        prefix's ``len(keys)`` chunks), ``size`` bytes of them."""
        with self._lock:
            self._saves.append((future, len(keys), keys[-1], size))

    def _live(self) -> list[tuple[Future[Any], int, bytes, int]]:
        with self._lock:
            self._saves = [save for save in self._saves if not save[0].done()]
            return list(self._saves)

    def prefixes_of(self, keys: Sequence[bytes]) -> list[tuple[Future[Any], int]]:
        """Saves still running of a prefix of the chunks ``keys``, with that prefix's
        length in chunks."""
        return [
            (future, chunks)
            for future, chunks, last, _ in self._live()
            if chunks <= len(keys) and keys[chunks - 1] == last
        ]

    def drain(self, limit: int) -> None:
        """Wait, oldest first, until at most ``limit`` bytes of saves are in flight."""
        while True:
            live = self._live()
            if not live or sum(save[3] for save in live) <= max(limit, 0):
                return
            wait([live[0][0]])


class SaveBuffers:
    """Chunk-sized host tensors that saves are copied into, reused once a save is
    written: a fresh allocation costs a page fault a page on first touch, which
    on a virtual machine made copying a save out of vLLM's cache ten times
    slower than the copy itself. ``reserve_bytes`` of them are allocated and
    touched up front; more are allocated when a step needs them, and up to
    ``keep_bytes`` are kept for reuse. Pinned where CUDA is available."""

    def __init__(
        self, layout: KVLayout, chunk_tokens: int, *, reserve_bytes: int, keep_bytes: int
    ) -> None:
        self._shape = layout.shape(chunk_tokens)
        self._dtype = layout.torch_dtype
        self._pin = torch.cuda.is_available()
        size = layout.nbytes(chunk_tokens)
        self._keep = max(keep_bytes, reserve_bytes) // size
        self._lock = threading.Lock()
        self._free = [self._new().zero_() for _ in range(reserve_bytes // size)]

    def _new(self) -> torch.Tensor:
        return torch.empty(self._shape, dtype=self._dtype, pin_memory=self._pin)

    def take(self) -> torch.Tensor:
        """A chunk's KV tensor, ``layout.shape(chunk_tokens)``, contents undefined."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._new()

    def give(self, chunks: Sequence[torch.Tensor]) -> None:
        """Take back tensors from ``take`` that nothing reads any more."""
        with self._lock:
            self._free.extend(chunks[: max(0, self._keep - len(self._free))])


@dataclass
class PendingSave:
    """A save being gathered: its chunks' host tensors (on a GPU, the device tensor
    the layers are gathered into first), the layers copied so far, and whether a
    copy failed (then it is not stored)."""

    spec: SaveSpec
    chunks: list[torch.Tensor]
    on_device: torch.Tensor | None = None
    layers: set[int] = field(default_factory=set)
    failed: bool = False


class Saves:
    """A worker's saves: gathered layer by layer during a step's forward (all
    layers at once for a finished request), then handed to the store, which
    writes them in the background while at most ``max_inflight_bytes`` wait.

    On the CPU each layer is gathered straight into the chunks' reused host
    buffers; on a GPU into one device tensor a save, copied into the host
    buffers when the step ends."""

    def __init__(
        self, transfer: Transfer, max_inflight_bytes: int, *, buffer_bytes: int = 0
    ) -> None:
        self._transfer = transfer
        self._max_inflight = max_inflight_bytes
        self._pending: dict[str, PendingSave] = {}
        self._slots: dict[str, torch.Tensor] = {}
        self._buffers = SaveBuffers(
            transfer.layout,
            transfer.chunk_tokens,
            reserve_bytes=buffer_bytes,
            keep_bytes=max_inflight_bytes,
        )
        self.inflight = InflightSaves()

    def _new_pending(self, spec: SaveSpec) -> PendingSave:
        """A save of the chunks from ``spec.start`` on: only those are copied out."""
        transfer = self._transfer
        tokens = len(spec.token_ids) - spec.start
        chunks = [self._buffers.take() for _ in range(tokens // transfer.chunk_tokens)]
        if transfer.device.type == "cpu":
            return PendingSave(spec, chunks)
        layout = transfer.layout
        on_device = torch.empty(
            layout.shape(tokens), dtype=layout.torch_dtype, device=transfer.device
        )
        return PendingSave(spec, chunks, on_device)

    def _gather(self, pending: PendingSave, layer: int) -> None:
        """Copy one layer of a save out of vLLM's cache; a failure drops the save, logged."""
        spec = pending.spec
        transfer = self._transfer
        try:
            slots = self._slots.get(spec.req_id)
            if slots is None:
                slots = block_slots(
                    spec.block_ids, transfer.block_size, spec.start, len(spec.token_ids)
                )
                slots = self._slots[spec.req_id] = slots.to(transfer.device)
            cache = transfer.caches[layer]
            if pending.on_device is not None:
                gather(cache, slots, out=pending.on_device[layer : layer + 1])
            else:
                ct = transfer.chunk_tokens
                for i, chunk in enumerate(pending.chunks):
                    gather(cache, slots[i * ct : (i + 1) * ct], out=chunk[layer : layer + 1])
        except Exception:
            log.exception(
                "kvstore: copying %s out of vLLM's cache failed; not saving it", spec.req_id
            )
            pending.failed = True
        pending.layers.add(layer)

    def gather_layer(self, specs: Sequence[SaveSpec], layer: int) -> None:
        """Copy layer ``layer`` of this step's saves (those of running requests)."""
        for spec in specs:
            if spec.finished:
                continue
            pending = self._pending.get(spec.req_id)
            if pending is None:
                pending = self._pending[spec.req_id] = self._new_pending(spec)
            if not pending.failed:
                self._gather(pending, layer)

    def submit(self, specs: Sequence[SaveSpec]) -> set[str]:
        """End of a step: copy out the finished requests' saves (whose blocks vLLM
        keeps until told), hand every complete save to the store; the finished
        requests whose blocks may now be freed."""
        saves = list(self._pending.values())
        self._pending = {}
        sent: set[str] = set()
        for spec in specs:
            if spec.finished:
                pending = self._new_pending(spec)
                for layer in range(len(self._transfer.caches)):
                    if not pending.failed:
                        self._gather(pending, layer)
                saves.append(pending)
                sent.add(spec.req_id)
        self._slots.clear()
        layers = len(self._transfer.caches)
        for pending in saves:
            complete = len(pending.layers) == layers
            if not pending.failed and not complete:
                log.warning(
                    "kvstore: %s: only %d of %d layers were saved this step; not storing it",
                    pending.spec.req_id,
                    len(pending.layers),
                    layers,
                )
            if pending.failed or not complete:
                self._buffers.give(pending.chunks)
            else:
                self._store(pending)
        return sent

    def _store(self, pending: PendingSave) -> None:
        """Hand the chunks of a save (from ``spec.start`` on) to the store; their
        buffers return to the pool once the store is done with them."""
        spec = pending.spec
        ct = self._transfer.chunk_tokens
        if pending.on_device is not None:
            for i, chunk in enumerate(pending.chunks):
                chunk.copy_(pending.on_device[:, :, i * ct : (i + 1) * ct])
        keys = self._transfer.keys.of(spec.req_id, spec.token_ids)
        size = sum(chunk.numel() * chunk.element_size() for chunk in pending.chunks)
        self.inflight.drain(self._max_inflight - size)
        first = spec.start // ct
        try:
            future = self._transfer.store.submit_store_chunks(keys[first:], pending.chunks)
        except BaseException:
            self._buffers.give(pending.chunks)
            raise
        future.add_done_callback(functools.partial(log_save, spec.req_id))
        future.add_done_callback(lambda _: self._buffers.give(pending.chunks))
        self.inflight.add(future, keys, size)


def log_save(req_id: str, future: Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.warning("kvstore: saving %s failed: %s", req_id, error)
    else:
        log.debug("kvstore: saved %s: %s", req_id, future.result())
