"""Saves on the vLLM worker: those being gathered this step and those the store still writes."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kvstore.connectors.vllm_specs import SaveSpec

log = logging.getLogger("kvstore.connectors.vllm")


class InflightSaves:
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
class PendingSave:
    """A save being gathered: the chunk tensor, the layers copied into it so far,
    and whether a copy failed (then it is not stored)."""

    spec: SaveSpec
    kv: torch.Tensor
    layers: set[int] = field(default_factory=set)
    failed: bool = False


def log_save(req_id: str, future: Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.warning("kvstore: saving %s failed: %s", req_id, error)
    else:
        log.debug("kvstore: saved %s: %s", req_id, future.result())
