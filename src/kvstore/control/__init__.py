"""The control API of a running store: Python (``ControlService``), HTTP, CLI.

``ControlService`` is the one implementation; ``serve_control`` /
``start_control_server`` run it as an HTTP server (FastAPI + uvicorn, the
``control`` extra) and ``ControlClient`` talks to one (what ``kvstore ctl``
uses). See docs/control-api.md. Names are imported on first use, so importing
this package does not import the HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvstore.errors import AuthenticationError, ConfigError, PermissionDeniedError

if TYPE_CHECKING:
    from kvstore.control.auth import ADMIN, Principal
    from kvstore.control.client import ControlClient
    from kvstore.control.server import (
        ControlServer,
        create_app,
        serve_control,
        start_control_server,
    )
    from kvstore.control.service import ControlService
    from kvstore.store import KVStore

_HOMES = {
    "ADMIN": "kvstore.control.auth",
    "Principal": "kvstore.control.auth",
    "ControlClient": "kvstore.control.client",
    "ControlServer": "kvstore.control.server",
    "create_app": "kvstore.control.server",
    "serve_control": "kvstore.control.server",
    "start_control_server": "kvstore.control.server",
    "ControlService": "kvstore.control.service",
}

__all__ = [
    "ADMIN",
    "AuthenticationError",
    "ControlClient",
    "ControlServer",
    "ControlService",
    "PermissionDeniedError",
    "Principal",
    "create_app",
    "maybe_start_control_server",
    "serve_control",
    "start_control_server",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvstore.control' has no attribute {name!r}")
    value = getattr(http_module(home), name)
    globals()[name] = value
    return value


def http_module(name: str) -> Any:
    """Import a module of the control package; a clear ConfigError when the HTTP
    stack (the ``control`` extra) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            f"the control API needs the control extra (pip install 'kvstore-llm[control]'): {exc}"
        ) from None


def maybe_start_control_server(store: KVStore) -> ControlServer | None:
    """What connectors call once they open their store: start its control server
    if the store's config enables one (``control.enabled``), else do nothing."""
    control = store.config.control
    if control is None or not control.enabled:
        return None
    server: ControlServer = http_module("kvstore.control.server").start_control_server(
        store, control
    )
    return server
