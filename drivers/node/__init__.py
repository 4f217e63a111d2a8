"""The ``node`` driver plugin: the host's node service over a Unix socket (docs/drivers/node.md)."""

from kvstore.registry import DriverInfo, hookimpl


@hookimpl
def kvstore_driver() -> DriverInfo:
    return DriverInfo(
        scheme="node",
        target="kvstore.drivers.node.driver:NodeDriver",
        summary="the host's node service: a shared-memory arena lent to every local process",
    )
