"""The ``nvme`` driver plugin: local NVMe through O_DIRECT (docs/drivers/nvme.md)."""

from kvstore.registry import DriverInfo, hookimpl


@hookimpl
def kvstore_driver() -> DriverInfo:
    return DriverInfo(
        scheme="nvme",
        target="kvstore.drivers.nvme.driver:NvmeDriver",
        summary="local NVMe files through O_DIRECT with a crash-safe index",
    )
