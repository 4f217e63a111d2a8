"""``kvstore node --config FILE [--socket PATH] [--group GROUP]``: run the node service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from kvstore.config import StoreConfig
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
    return asyncio.run(_serve(config, path, gid))


async def _serve(config: StoreConfig, path: Path, gid: int | None) -> int:
    from kvstore.node.service import NodeService

    service = await NodeService.open(config, group_gid=gid)
    try:
        loop = asyncio.get_running_loop()
        serving = asyncio.ensure_future(
            service.serve(path, ready=lambda: print(f"kvstore node serving {path}", flush=True))
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, serving.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    finally:
        await service.close()
    return 0
