"""The ``s3`` driver plugin: any S3-compatible object store (docs/drivers/s3.md)."""

from kvstore.registry import DriverInfo, hookimpl


@hookimpl
def kvstore_driver() -> DriverInfo:
    return DriverInfo(
        scheme="s3",
        target="kvstore.drivers.s3.driver:S3Driver",
        summary="S3-compatible object stores through botocore",
        install_hint="kvstore-llm[s3]",
    )
