"""kvstore: a hierarchical KV-cache storage layer for LLM inference."""

from kvstore.config import StoreConfig, TierConfig
from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage
from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverClosedError,
    DriverLoadError,
    DriverTimeoutError,
    DriverUnavailableError,
    IntegrityError,
    InvalidArgumentError,
    InvalidKeyError,
    KVStoreError,
    NotFoundError,
    NotSupportedError,
    TransientError,
)
from kvstore.keys import Namespace, chunk_keys
from kvstore.layout import KVLayout
from kvstore.registry import DriverInfo, default_registry, hookimpl, open_driver, parse_url
from kvstore.store import (
    AsyncKVStore,
    KVStore,
    LookupResult,
    RetrieveResult,
    StoreResult,
    StoreStats,
    open_store,
)
from kvstore.sync import SyncDriver

__version__ = "0.1.0"

__all__ = [
    "AsyncKVStore",
    "Capabilities",
    "CapacityError",
    "ConfigError",
    "Driver",
    "DriverClosedError",
    "DriverConfig",
    "DriverInfo",
    "DriverLoadError",
    "DriverTimeoutError",
    "DriverUnavailableError",
    "IntegrityError",
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
