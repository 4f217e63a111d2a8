"""kvstore: a hierarchical KV-cache storage layer for LLM inference.

Names are imported on first use, so that loading a driver plugin or the
conformance pytest plugin does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore.config import StoreConfig, TierConfig
    from kvstore.config_url import DriverConfig
    from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
    from kvstore.errors import (
        CapacityError,
        ClosedError,
        ConfigError,
        DriverClosedError,
        DriverLoadError,
        DriverTimeoutError,
        DriverUnavailableError,
        IntegrityError,
        InternalError,
        InvalidArgumentError,
        InvalidKeyError,
        KVStoreError,
        NotFoundError,
        NotSupportedError,
        StoreClosedError,
        TransientError,
    )
    from kvstore.keys import Namespace, chunk_keys
    from kvstore.layout import KVLayout
    from kvstore.registry import DriverInfo, default_registry, hookimpl, open_driver, parse_url
    from kvstore.results import LookupResult, RetrieveResult, StoreResult, StoreStats
    from kvstore.store import AsyncKVStore, KVStore, open_store
    from kvstore.sync import SyncDriver

__version__ = "0.1.0"

_HOMES = {
    "StoreConfig": "kvstore.config",
    "TierConfig": "kvstore.config",
    "DriverConfig": "kvstore.config_url",
    "Capabilities": "kvstore.driver",
    "Driver": "kvstore.driver",
    "KeyEntry": "kvstore.driver",
    "Usage": "kvstore.driver",
    "CapacityError": "kvstore.errors",
    "ClosedError": "kvstore.errors",
    "StoreClosedError": "kvstore.errors",
    "ConfigError": "kvstore.errors",
    "DriverClosedError": "kvstore.errors",
    "DriverLoadError": "kvstore.errors",
    "DriverTimeoutError": "kvstore.errors",
    "DriverUnavailableError": "kvstore.errors",
    "IntegrityError": "kvstore.errors",
    "InternalError": "kvstore.errors",
    "InvalidArgumentError": "kvstore.errors",
    "InvalidKeyError": "kvstore.errors",
    "KVStoreError": "kvstore.errors",
    "NotFoundError": "kvstore.errors",
    "NotSupportedError": "kvstore.errors",
    "TransientError": "kvstore.errors",
    "Namespace": "kvstore.keys",
    "chunk_keys": "kvstore.keys",
    "KVLayout": "kvstore.layout",
    "DriverInfo": "kvstore.registry",
    "default_registry": "kvstore.registry",
    "hookimpl": "kvstore.registry",
    "open_driver": "kvstore.registry",
    "parse_url": "kvstore.registry",
    "AsyncKVStore": "kvstore.store",
    "KVStore": "kvstore.store",
    "LookupResult": "kvstore.results",
    "RetrieveResult": "kvstore.results",
    "StoreResult": "kvstore.results",
    "StoreStats": "kvstore.results",
    "open_store": "kvstore.store",
    "SyncDriver": "kvstore.sync",
}

__all__ = [
    "AsyncKVStore",
    "Capabilities",
    "CapacityError",
    "ClosedError",
    "ConfigError",
    "Driver",
    "DriverClosedError",
    "DriverConfig",
    "DriverInfo",
    "DriverLoadError",
    "DriverTimeoutError",
    "DriverUnavailableError",
    "IntegrityError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "KVLayout",
    "KVStore",
    "KVStoreError",
    "KeyEntry",
    "LookupResult",
    "Namespace",
    "NotFoundError",
    "NotSupportedError",
    "RetrieveResult",
    "StoreClosedError",
    "StoreConfig",
    "StoreResult",
    "StoreStats",
    "SyncDriver",
    "TierConfig",
    "TransientError",
    "Usage",
    "__version__",
    "chunk_keys",
    "default_registry",
    "hookimpl",
    "open_driver",
    "open_store",
    "parse_url",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
