"""``kvstore node --config FILE [--socket PATH] [--group GROUP] [--namespace FILE]``:
run the node service, and its store's control API when the config enables it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

from kvstore.config import StoreConfig
from kvstore.control.cli import load_namespace
from kvstore.keys import Namespace
from kvstore.node.access import default_socket_path, group_id


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="store YAML; its first tier must be cpu://?capacity=...&shared=true",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"Unix socket to serve (default: {default_socket_path()})",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="namespace YAML for the control API's lookups and pins (repeatable; "
        "see kvstore serve); the control API runs when the config's control.enabled is true",
    )
    parser.add_argument(
        "--group",
        metavar="GROUP",
        help="also serve this group's members (the socket becomes 0660); default: owner only",
    )


def run_node(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then close the store."""
    config = StoreConfig.from_yaml(args.config)
    path = Path(args.socket) if args.socket else default_socket_path()
    gid = (
        None
        if args.group is None
        else group_id(int(args.group) if args.group.isdigit() else args.group)
    )
    namespaces = [load_namespace(file, config) for file in args.namespace]
    return asyncio.run(_serve(config, path, gid, namespaces))


async def _serve(
    config: StoreConfig, path: Path, gid: int | None, namespaces: list[tuple[str, Namespace]]
) -> int:
    from kvstore.node.service import NodeService

    service = await NodeService.open(config, group_gid=gid)
    control: Any = None
    try:
        if config.control is not None and config.control.enabled:
            from kvstore.control import http_module

            serve_control = http_module("kvstore.control.server").serve_control
            control = await serve_control(service.store, namespaces=dict(namespaces))
            print(f"kvstore control server listening on {control.url}", flush=True)
        loop = asyncio.get_running_loop()
        serving = asyncio.ensure_future(
            service.serve(path, ready=lambda: print(f"kvstore node serving {path}", flush=True))
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, serving.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    finally:
        if control is not None:
            await control.aclose()
        await service.close()
    return 0
