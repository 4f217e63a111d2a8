"""The ``fsspec`` driver plugin: ``fsspec+<protocol>://`` URLs (docs/drivers/fsspec.md)."""

from kvstore.registry import DriverInfo, hookimpl


@hookimpl
def kvstore_driver() -> DriverInfo:
    return DriverInfo(
        scheme="fsspec",
        target="kvstore.drivers.fsspec.driver:FsspecDriver",
        summary="any fsspec filesystem (fsspec+memory://, fsspec+file://, fsspec+s3://, ...)",
        install_hint="kvstore-llm[fsspec]",
    )
