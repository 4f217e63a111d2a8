"""Typed configuration of a hierarchical store, from YAML, dicts or URLs.

A store config lists tiers fastest first. The smallest config is one URL per
tier::

    tiers:
      - url: cpu://?capacity=8GiB
      - url: nvme:///var/cache/kvstore?capacity=500GiB
        codecs: zstd
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvstore.codecs import codec_stack
from kvstore.config_url import validation_problems
from kvstore.errors import ConfigError
from kvstore.eviction import POLICIES
from kvstore.sizes import ByteSize


class TierConfig(BaseModel):
    """One tier: a driver URL plus how the store uses it.

    capacity: bytes the store lets this tier hold (default: the driver's own
        hard capacity; required for drivers without one).
    eviction: which chunks go first when the tier is full (``lru``, ``fifo``).
    write_policy: how chunks reach the next tier down: ``write-through`` copies
        every stored chunk down in the background; ``write-back`` copies a chunk
        down only when this tier evicts it.
    codecs: the codec stack chunks are encoded with on this tier (``raw``,
        ``lz4``, ``zstd:3``, ``lz4+zstd``).
    verify: check each chunk's payload digest on read (header, key, shape and
        length are always checked).
    timeout_s: longest a call to this tier may take before it counts as a miss.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    name: str | None = None
    capacity: ByteSize | None = None
    eviction: str = "lru"
    write_policy: Literal["write-through", "write-back"] = "write-through"
    codecs: str = "raw"
    verify: bool = True
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("eviction")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown eviction policy {value!r} (known: {', '.join(POLICIES)})")
        return value

    @field_validator("codecs")
    @classmethod
    def _known_codecs(cls, value: str) -> str:
        codec_stack(value)
        return value


class StoreConfig(BaseModel):
    """A hierarchical store: tiers fastest first, plus background-write limits.

    queue_bytes: bytes of chunks waiting to be written to lower tiers (and
        promoted to the first) before ``on_queue_full`` applies.
    on_queue_full: ``block`` makes ``store`` wait (back-pressure); ``drop``
        skips the background write and counts it.
    io_batch_bytes: bytes of chunks per driver call on the hot path.
    read_ahead: batches ``retrieve`` keeps in flight while it decodes (more
        hides the latency of remote tiers, at ``io_batch_bytes`` of buffers each).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: list[TierConfig] = Field(min_length=1)
    chunk_tokens: int = Field(default=256, gt=0)
    tenant: str = ""
    queue_bytes: ByteSize = 1 << 30
    on_queue_full: Literal["block", "drop"] = "block"
    io_batch_bytes: ByteSize = 64 << 20
    read_ahead: int = Field(default=4, ge=1, le=64)

    @field_validator("tiers", mode="before")
    @classmethod
    def _urls_as_tiers(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str = "config") -> StoreConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(
                f"invalid store config in {source}: {validation_problems(exc)}"
            ) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> StoreConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read store config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"store config {path} must be a mapping")
        return cls.parse(data, source=str(path))

    @classmethod
    def from_urls(cls, *tiers: str | dict[str, Any], **options: Any) -> StoreConfig:
        """A config from tier URLs (or tier mappings, for per-tier options), fastest first."""
        return cls.parse({"tiers": list(tiers), **options}, source="URLs")
