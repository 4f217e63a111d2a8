"""Typed configuration of a hierarchical store, from YAML, dicts or URLs.

A store config lists tiers fastest first. The smallest config is one URL per
tier::

    tiers:
      - url: cpu://?capacity=8GiB
      - url: nvme:///var/cache/kvstore?capacity=500GiB
        codecs: zstd
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from kvstore.codecs import KeyRing, codec_stack, lossy_spec
from kvstore.config_url import validation_problems
from kvstore.errors import ConfigError
from kvstore.eviction import POLICIES
from kvstore.sizes import ByteSize

if TYPE_CHECKING:
    from kvstore.keys import Namespace
    from kvstore.layout import KVLayout


class TierConfig(BaseModel):
    """One tier: a driver URL plus how the store uses it.

    max_bytes: bytes the store lets this tier hold, its ledger (default: the
        driver's own hard capacity, the URL's ``capacity``; required for drivers
        without one). ``capacity``, its name in 0.1, is still accepted for one
        release, with a DeprecationWarning.
    eviction: which chunks go first when the tier is full (``lru``, ``fifo``).
    write_policy: how chunks reach the next tier down: ``write-through`` copies
        every stored chunk down in the background; ``write-back`` copies a chunk
        down only when this tier evicts it.
    codecs: the codec stack chunks are encoded with on this tier, steps joined
        by ``+`` (``raw``, ``lz4``, ``zstd:3``, ``shuffle+zstd``, ``int8+zstd``,
        ``kivi4:64``, ``zstd+aesgcm:k1``; docs/codecs.md). A quantizer comes
        first, encryption last.
    verify: check each chunk's payload digest on read (header, key, shape and
        length are always checked). Unset: off for a driver whose memory only
        this process writes (``in_process``: the cpu arena), on for every other
        one, where ``false`` is ignored: their bytes cross a process or device
        boundary, so reads always verify.
    timeout_s: longest a call to this tier may take: one that overruns is
        abandoned as a miss (or a failed write) and finishes in the background.
    required: the store fails to open when this tier's driver cannot be reached.
        By default a tier below the first that is unreachable at open starts
        down (misses, no writes) and is retried in the background; the first
        tier is always required.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    name: str | None = None
    max_bytes: ByteSize | None = None
    eviction: str = "lru"
    write_policy: Literal["write-through", "write-back"] = "write-through"
    codecs: str = "raw"
    verify: bool | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    required: bool = False

    @model_validator(mode="before")
    @classmethod
    def _old_capacity_name(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "capacity" in value:
            if "max_bytes" in value:
                raise ValueError("give max_bytes, not both max_bytes and its old name capacity")
            warnings.warn(
                "a tier's capacity field is now called max_bytes (the URL's capacity "
                "option, a driver's own limit, keeps its name); capacity will be removed "
                "in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            value = {("max_bytes" if k == "capacity" else k): v for k, v in value.items()}
        return value

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_of(value: object, env: str | None, what: str) -> None:
    if (value is None) == (env is None):
        raise ValueError(f"give exactly one of {what} and {what}_env")


class ControlTenant(BaseModel):
    """One tenant of the control server: the token it authenticates with and the
    salt its keys use (``Namespace.tenant``), each given directly or as the name
    of an environment variable. Both are secrets and never shown in reprs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    salt: SecretStr | None = None
    salt_env: str | None = None
    token: SecretStr | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _one_source_each(self) -> ControlTenant:
        _one_of(self.salt, self.salt_env, "salt")
        _one_of(self.token, self.token_env, "token")
        return self


class ControlConfig(BaseModel):
    """The HTTP control server of a store (docs/control-api.md).

    enabled: connectors start the server when they open the store.
    host / port: where it listens (port 0: any free port). Loopback by
        default; any other address needs a token or client certificates.
    token / token_env: the admin bearer token, or the environment variable
        that holds it (a secret, never shown in reprs).
    tls_cert / tls_key: serve HTTPS with this certificate and key.
    tls_client_ca: require client certificates signed by this CA (mTLS).
    tenants: tenants and their tokens; with tenants configured every request
        needs a token, on loopback too.
    tokenizers: model name to a local tokenizer directory (or a hub id already
        in the local cache) for lookups by ``text``; default: the model name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8740, ge=0, le=65535)
    token: SecretStr | None = None
    token_env: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tenants: list[ControlTenant] = Field(default_factory=list)
    tokenizers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _secure(self) -> ControlConfig:
        if self.token is not None and self.token_env is not None:
            raise ValueError("give at most one of token and token_env")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        names = [tenant.name for tenant in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if not is_loopback(self.host) and not self.has_credentials:
            raise ValueError(
                f"the control server may listen on {self.host} only with a token or client "
                "certificates (token, token_env, tenants or tls_client_ca); loopback needs none"
            )
        return self

    @property
    def has_credentials(self) -> bool:
        """Whether requests must authenticate (a token or a client certificate)."""
        return bool(
            self.token is not None
            or self.token_env is not None
            or self.tenants
            or self.tls_client_ca is not None
        )


class StoreConfig(BaseModel):
    """A hierarchical store: tiers fastest first, plus background-write limits.

    queue_bytes: bytes of chunks waiting to be written to lower tiers (and
        promoted to the first) before ``on_queue_full`` applies.
    on_queue_full: ``block`` makes ``store`` wait (back-pressure); ``drop``
        skips the background write and counts it.
    io_batch_bytes: bytes of chunks per driver call on the hot path (a tier
        that lends this process's memory takes a whole request in one call).
    read_ahead: batches ``retrieve`` keeps in flight while it decodes (more
        hides the latency of remote tiers, at ``io_batch_bytes`` of buffers each).
    name: the store's ``store`` label in its metrics (docs/metrics.md); a name
        already taken by an open store in this process gets a ``-2`` suffix.
    encryption_keys: key id to base64 AES key (16, 24 or 32 bytes) for
        ``aesgcm`` tiers, merged with the environment's (docs/codecs.md);
        never shown in reprs.

    control: the HTTP control server (``ControlConfig``); none by default.

    At most one lossy codec (quantizer) may appear across the tiers:
    ``lossy_codec`` names it, and the store's ``Namespace.codec`` must equal it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: list[TierConfig] = Field(min_length=1)
    chunk_tokens: int = Field(default=256, gt=0)
    tenant: str = ""
    queue_bytes: ByteSize = 1 << 30
    on_queue_full: Literal["block", "drop"] = "block"
    io_batch_bytes: ByteSize = 64 << 20
    read_ahead: int = Field(default=4, ge=1, le=64)
    name: str = Field(default="default", min_length=1)
    encryption_keys: dict[str, SecretStr] = Field(default_factory=dict)
    control: ControlConfig | None = None

    @field_validator("tiers", mode="before")
    @classmethod
    def _urls_as_tiers(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _one_lossy_codec(self) -> StoreConfig:
        lossy = sorted({lossy_spec(codec_stack(tier.codecs)) for tier in self.tiers} - {"raw"})
        if len(lossy) > 1:
            raise ConfigError(
                f"tiers use different lossy codecs {lossy}: a store has at most one, "
                "so that its keys name the one transform its KV went through"
            )
        return self

    @property
    def lossy_codec(self) -> str:
        """The tiers' quantizer spec (``int8``, ``kivi4:64``), or ``raw``: the
        ``Namespace.codec`` a store with this config must be opened with."""
        specs = {lossy_spec(codec_stack(tier.codecs)) for tier in self.tiers}
        return next(iter(specs - {"raw"}), "raw")

    def keyring(self, environ: Mapping[str, str] | None = None) -> KeyRing:
        """The encryption keys of ``encryption_keys`` and the environment."""
        configured = {
            key_id: secret.get_secret_value() for key_id, secret in self.encryption_keys.items()
        }
        return KeyRing.load(configured, environ)

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

    @classmethod
    def load(cls, source: object, *, option: str = "config") -> StoreConfig:
        """The store config ``source`` names, in any form a connector or
        ``open_store`` accepts (docs/configuration.md): a ``StoreConfig``; the
        path of a YAML file; one tier URL; a list of tiers, fastest first (URLs
        and/or tier mappings); or a whole config as a mapping with ``tiers``.
        ``option`` names the setting it came from in the error a wrong form raises.
        """
        if isinstance(source, StoreConfig):
            return source
        if isinstance(source, Path) or (isinstance(source, str) and source and "://" not in source):
            return cls.from_yaml(Path(source).expanduser())
        if isinstance(source, str) and source:
            return cls.from_urls(source)
        if isinstance(source, Mapping) and "tiers" in source:
            return cls.parse(dict(source), source=option)
        if (
            isinstance(source, Sequence)
            and not isinstance(source, str)
            and source
            and all(isinstance(tier, str | Mapping) for tier in source)
        ):
            return cls.from_urls(
                *(tier if isinstance(tier, str) else dict(tier) for tier in source)
            )
        raise ConfigError(
            f"{option} must be a kvstore YAML path, a tier URL, a list of tiers (URLs or tier "
            f"mappings) or a store config mapping with 'tiers', got {source!r}"
        )

    def namespace(
        self,
        *,
        model: str,
        revision: str,
        layout: KVLayout,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> Namespace:
        """The namespace to open a store with this config under: the chunk size,
        tenant salt and lossy codec come from the config, so they agree with it."""
        from kvstore.keys import Namespace  # torch-free until a namespace is made

        return Namespace(
            model=model,
            revision=revision,
            layout=layout,
            chunk_tokens=self.chunk_tokens,
            tp_rank=tp_rank,
            tp_size=tp_size,
            codec=self.lossy_codec,
            tenant=self.tenant,
        )


ConfigSource = StoreConfig | str | Path | Sequence[str | Mapping[str, Any]] | Mapping[str, Any]
"""Any form ``StoreConfig.load`` accepts."""
