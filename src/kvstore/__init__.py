"""kvstore: a hierarchical KV-cache storage layer for LLM inference."""

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
from kvstore.registry import DriverInfo, default_registry, hookimpl, open_driver, parse_url
from kvstore.sync import SyncDriver

__version__ = "0.1.0"

__all__ = [
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
    "KVStoreError",
    "KeyEntry",
    "NotFoundError",
    "NotSupportedError",
    "SyncDriver",
    "TransientError",
    "Usage",
    "__version__",
    "default_registry",
    "hookimpl",
    "open_driver",
    "parse_url",
]
