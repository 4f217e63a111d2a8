"""The nvme driver's URL grammar and settings: ``nvme:///path?capacity=...``."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from kvstore.config_url import DriverConfig
from kvstore.sizes import ByteSize

from .layout import ALIGN


class NvmeConfig(DriverConfig):
    """Where and how the nvme driver stores values.

    path: the store directory (created if missing), absolute or relative.
    capacity: hard limit on the disk bytes the value files take (each value's
        ``footprint``: a 4 KiB header plus the value padded to 4 KiB); a put past
        it raises CapacityError.
    direct_io: ``auto`` uses O_DIRECT and falls back to buffered I/O where the
        filesystem refuses it; ``on`` makes that refusal an error; ``off`` is buffered.
    io_threads: threads doing disk I/O, i.e. the queue depth the driver keeps.
    io_block: bytes per pread/pwrite; larger values move as parallel pieces.
    fsync: sync files and directories so a put survives power loss.
    slots: how many processes may use ``path`` at once, each in a private slot
        of it: the first takes ``path`` itself, the others the first free one of
        ``path/slots/1`` .. ``path/slots/{slots-1}`` (a slot is free when no live
        process holds its lock, so a restarted process reuses one). ``1``: a
        second open of a directory in use is an error.
    """

    scheme: ClassVar[str] = "nvme"
    location_field: ClassVar[str | None] = "path"

    path: str = Field(min_length=1)
    capacity: Annotated[ByteSize, Field(gt=0)]
    direct_io: Literal["auto", "on", "off"] = "auto"
    io_threads: int = Field(default=8, ge=1, le=1024)
    io_block: ByteSize = 4 << 20
    fsync: bool = True
    slots: int = Field(default=64, ge=1, le=4096)

    @field_validator("io_block")
    @classmethod
    def _whole_blocks(cls, value: int) -> int:
        if value <= 0 or value % ALIGN:
            raise ValueError(f"io_block must be a positive multiple of {ALIGN} bytes")
        return value
