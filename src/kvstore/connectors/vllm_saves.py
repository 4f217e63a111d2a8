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


@dataclass
class PendingSave:
    """A save being gathered: the chunk tensor, the layers copied into it so far,
    and whether a copy failed (then it is not stored)."""

    spec: SaveSpec
    kv: torch.Tensor
    layers: set[int] = field(default_factory=set)
    failed: bool = False


class Saves:
    """A worker's saves: gathered layer by layer during a step's forward (all
    layers at once for a finished request), then handed to the store, which
    writes them in the background while at most ``max_inflight_bytes`` wait."""

    def __init__(self, transfer: Transfer, max_inflight_bytes: int) -> None:
        self._transfer = transfer
        self._max_inflight = max_inflight_bytes
        self._pending: dict[str, PendingSave] = {}
        self._slots: dict[str, torch.Tensor] = {}
        self.inflight = InflightSaves()

    def _new_pending(self, spec: SaveSpec) -> PendingSave:
        """A save of the chunks from ``spec.start`` on: only those are copied out."""
        layout = self._transfer.layout
        tokens = len(spec.token_ids) - spec.start
        kv = torch.empty(
            layout.shape(tokens), dtype=layout.torch_dtype, device=self._transfer.device
        )
        return PendingSave(spec, kv)

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
            gather(transfer.caches[layer], slots, out=pending.kv[layer : layer + 1])
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
            if pending.failed:
                continue
            if len(pending.layers) != layers:
                log.warning(
                    "kvstore: %s: only %d of %d layers were saved this step; not storing it",
                    pending.spec.req_id,
                    len(pending.layers),
                    layers,
                )
                continue
            self._store(pending.spec, pending.kv.cpu())
        return sent

    def _store(self, spec: SaveSpec, kv: torch.Tensor) -> None:
        """Hand the chunks of ``spec`` from ``spec.start`` on (``kv``) to the store."""
        chunk = self._transfer.chunk_tokens
        keys = self._transfer.keys.of(spec.req_id, spec.token_ids)
        size = kv.numel() * kv.element_size()
        self.inflight.drain(self._max_inflight - size)
        first = spec.start // chunk
        future = self._transfer.store.submit_store_chunks(
            keys[first:],
            [kv[:, :, i * chunk : (i + 1) * chunk] for i in range(len(keys) - first)],
        )
        future.add_done_callback(functools.partial(log_save, spec.req_id))
        self.inflight.add(future, keys, size)


def log_save(req_id: str, future: Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.warning("kvstore: saving %s failed: %s", req_id, error)
    else:
        log.debug("kvstore: saved %s: %s", req_id, future.result())
