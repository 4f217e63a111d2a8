"""The ``mooncake`` driver plugin: the Mooncake distributed store (docs/drivers/mooncake.md)."""

from kvstore.registry import DriverInfo, hookimpl


@hookimpl
def kvstore_driver() -> DriverInfo:
    return DriverInfo(
        scheme="mooncake",
        target="kvstore.drivers.mooncake.driver:MooncakeDriver",
        summary="Mooncake store (master + transfer engine; TCP, or RDMA where present)",
        install_hint="kvstore-llm[mooncake]",
    )
