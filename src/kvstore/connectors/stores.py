"""Stores shared by the connectors of a process, with their control servers.

An engine may build several connector objects in one process (vLLM's
scheduler and worker sides, an SGLang backend attached again, two
transformers connectors on the same model). Those with the same store config
and namespace share one open store, so its tiers (the ``cpu`` arena, an
``nvme`` slot, connections) are set up once; the control server the config
asks for runs once per store, and stops when the last user releases it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.config import StoreConfig
from kvstore.control import maybe_start_control_server
from kvstore.keys import Namespace
from kvstore.store import KVStore

if TYPE_CHECKING:
    from kvstore.control import ControlServer


@dataclass
class _Shared:
    config: StoreConfig
    namespace: Namespace
    store: KVStore
    users: int = 0
    control: ControlServer | None = None


class SharedStores:
    """One open store per (config, namespace) in a process, reference counted.

    Configs are compared field by field, secrets included (encryption keys,
    tokens), so stores that differ only in a secret are never shared.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[_Shared] = []

    def acquire(self, config: StoreConfig, namespace: Namespace, *, control: bool) -> KVStore:
        """The shared store of ``config`` and ``namespace``, opened by the first user.

        ``control``: start the store's control server if its config enables one
        and it is not running yet (engines ask on one rank only, since every
        rank would listen on the same port).
        """
        with self._lock:
            shared = next(
                (s for s in self._open if s.config == config and s.namespace == namespace), None
            )
            opened = shared is None
            if shared is None:
                shared = _Shared(config, namespace, KVStore.open(config, namespace))
            try:
                if control and shared.control is None:
                    shared.control = maybe_start_control_server(shared.store)
            except BaseException:
                if opened:
                    shared.store.close()
                raise
            if opened:
                self._open.append(shared)
            shared.users += 1
            return shared.store

    def control(self, store: KVStore) -> ControlServer | None:
        """The control server running for a shared ``store``, if any."""
        with self._lock:
            return next((s.control for s in self._open if s.store is store), None)

    def release(self, store: KVStore) -> None:
        """One user is done with ``store``: the last one stops its control server
        and closes it. A store that is not shared here is closed."""
        with self._lock:
            shared = next((s for s in self._open if s.store is store), None)
            if shared is not None and shared.users > 1:
                shared.users -= 1
                return
            if shared is not None:
                self._open.remove(shared)
        if shared is not None and shared.control is not None:
            shared.control.close()
        store.close()


shared_stores = SharedStores()
"""The process's shared stores."""

__all__ = ["SharedStores", "shared_stores"]
