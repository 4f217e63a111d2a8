"""The ``cpu`` driver plugin: a page-locked host-memory arena (docs/drivers/cpu.md)."""

from kvstore.registry import DriverInfo, hookimpl


@hookimpl
def kvstore_driver() -> DriverInfo:
    return DriverInfo(
        scheme="cpu",
        target="kvstore.drivers.cpu.driver:CpuDriver",
        summary="page-locked host memory arena; the fastest tier",
    )
