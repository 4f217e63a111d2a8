"""The s3 driver's URL grammar and settings: ``s3://bucket/prefix?options``."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.sizes import ByteSize, format_size

MIN_PART_BYTES = 5 << 20
MAX_PART_BYTES = 5 << 30
MAX_PARTS = 10_000
MAX_OBJECT_BYTES = 5 << 40
"""S3's limits on multipart uploads and objects."""
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$")
_MAX_PREFIX_CHARS = 500


class S3Config(DriverConfig):
    """Where and how the s3 driver stores values.

    location: ``bucket`` or ``bucket/prefix``; objects go under the prefix.
    endpoint_url: an S3-compatible endpoint (MinIO, Ceph, moto); AWS when unset.
    region: the signing region; from the AWS config chain when unset.
    profile: a profile of the AWS config files to take credentials from.
    access_key_id, secret_access_key, session_token: explicit credentials; when
        unset, the usual AWS chain (environment, profile, instance role) applies.
    addressing_style: ``path`` for servers without virtual-host buckets.
    part_size: values larger than this go up as multipart uploads of parts this
        size and come back as parallel ranged GETs of this size.
    io_threads: threads (and pooled HTTP connections) doing requests.
    connect_timeout, read_timeout: seconds per connection attempt and per socket read.
    retry_mode, max_attempts: botocore's retries of throttling, 5xx and dropped
        connections, with backoff; ``max_attempts`` counts the first try.
    checksums: ``when_supported`` adds CRC checksums to requests and checks them
        in responses; ``when_required`` only where S3 demands them (the store
        already verifies each chunk's digest).
    create_bucket: create the bucket at open when it does not exist.
    """

    scheme: ClassVar[str] = "s3"
    location_field: ClassVar[str | None] = "location"
    secret_fields: ClassVar[frozenset[str]] = frozenset({"secret_access_key", "session_token"})

    location: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = Field(default=None, repr=False)
    session_token: str | None = Field(default=None, repr=False)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    part_size: ByteSize = 8 << 20
    io_threads: int = Field(default=16, ge=1, le=1024)
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    max_attempts: int = Field(default=3, ge=1, le=20)
    checksums: Literal["when_required", "when_supported"] = "when_required"
    create_bucket: bool = False

    @field_validator("location")
    @classmethod
    def _bucket_and_prefix(cls, value: str) -> str:
        bucket, _, prefix = value.strip("/").partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.match(bucket):
            raise ValueError(
                f"{bucket!r} is not a bucket name (3 to 63 lowercase letters, digits, '.', '-')"
            )
        if prefix and (len(prefix) > _MAX_PREFIX_CHARS or not _PREFIX.match(prefix)):
            raise ValueError(
                f"the prefix must be at most {_MAX_PREFIX_CHARS} characters of letters, "
                "digits and '._~-' in '/'-separated parts"
            )
        return f"{bucket}/{prefix}" if prefix else bucket

    @field_validator("part_size")
    @classmethod
    def _part_size_in_s3_limits(cls, value: int) -> int:
        if not MIN_PART_BYTES <= value <= MAX_PART_BYTES:
            raise ValueError(
                f"part_size must be between {format_size(MIN_PART_BYTES)} and "
                f"{format_size(MAX_PART_BYTES)} (S3's part limits)"
            )
        return value

    @model_validator(mode="after")
    def _whole_credentials(self) -> Self:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        return self

    @property
    def bucket(self) -> str:
        return self.location.partition("/")[0]

    @property
    def prefix(self) -> str:
        """The key prefix objects go under, without slashes at either end ("" for none)."""
        return self.location.partition("/")[2]
