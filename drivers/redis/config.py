"""The redis driver's URL grammar and settings: ``redis://`` and ``rediss://`` configs."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, ClassVar, Literal
from urllib.parse import quote, unquote, urlencode, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.errors import ConfigError
from kvstore.sizes import ByteSize, format_size

MIN_PART_SIZE = 64 << 10
_LOCATION_FIELDS = frozenset({"host", "port", "db", "username", "password"})
_TLS_FIELDS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


_HOST = re.compile(r"^[A-Za-z0-9._~-]+$")


class RedisConfig(DriverConfig):
    """``redis://[user:password@]host:6379/0?prefix=kv&ttl=3600&part_size=8MiB``.

    The location gives the server (a startup node with ``cluster=true``), the
    ACL user and password (percent-encoded), and the database number.

    prefix: the namespace of every Redis key the driver writes (no braces).
    ttl: seconds each value lives after its last put; none by default.
    part_size: values larger than this are stored as parts of at most this size.
    timeout: seconds one socket read or write, or a wait for a free connection,
        may take; connect_timeout: seconds to open a connection.
    max_connections: connections per server, and threads running them.
    cluster: talk to a Redis Cluster through redis-py's cluster client.
    persistent: declare the server durable (AOF/RDB, no eviction); by default a
        Redis tier is treated as a cache that may lose values.
    password_env: the name of an environment variable holding the password,
        read when the driver opens, to keep it out of URLs.
    ssl_*: TLS settings, ``rediss://`` only: CA bundle, client certificate and
        key, whether the server certificate is required, and hostname checking.
    """

    scheme: ClassVar[str] = "redis"
    location_field: ClassVar[str | None] = "address"

    host: str = Field(default="localhost", min_length=1)
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = Field(default=None, min_length=1)
    prefix: str = Field(default="kv", min_length=1, max_length=200)
    ttl: int | None = Field(default=None, ge=1)
    part_size: ByteSize = 8 << 20
    timeout: float = Field(default=5.0, gt=0, le=3600)
    connect_timeout: float = Field(default=5.0, gt=0, le=3600)
    max_connections: int = Field(default=16, ge=1, le=1024)
    cluster: bool = False
    persistent: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    ssl_check_hostname: bool = True

    @classmethod
    def decode_location(cls, location: str) -> str:
        """Kept percent-encoded: the user and password are decoded one by one."""
        return location

    @model_validator(mode="before")
    @classmethod
    def _split_address(cls, data: Any) -> Any:
        """Turn the URL's location, ``[user[:password]@]host[:port][/db]``, into fields."""
        if not isinstance(data, dict) or "address" not in data:
            return data
        fields = dict(data)
        address = str(fields.pop("address"))
        parts = urlsplit(f"//{address}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"invalid port in {parts.netloc!r}") from None
        db = parts.path.strip("/")
        if parts.query or parts.fragment or "/" in db or (db and not db.isdigit()):
            raise ValueError("the location is [user:password@]host[:port][/db]")
        given: dict[str, Any] = {
            "host": parts.hostname or None,
            "port": port,
            "db": int(db) if db else None,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
        }
        for name, value in given.items():
            if value is not None:
                if name in fields:
                    raise ValueError(f"{name} is given both in the location and as an option")
                fields[name] = value
        return fields

    @field_validator("host")
    @classmethod
    def _valid_host(cls, host: str) -> str:
        """A host name, an IPv4 or a (bracketed in URLs) IPv6 address, lowercased."""
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv6 address") from None
        elif not _HOST.match(host):
            raise ValueError(f"{host!r} is not a host name or IP address")
        return host.lower()

    @field_validator("prefix")
    @classmethod
    def _no_hash_tag(cls, prefix: str) -> str:
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix must not contain { or } (they would change the hash tag)")
        return prefix

    @field_validator("part_size")
    @classmethod
    def _part_size(cls, size: int) -> int:
        if size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {format_size(MIN_PART_SIZE)}")
        return size

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.cluster and self.db != 0:
            raise ValueError("a Redis Cluster has only database 0")
        if self.password is not None and self.password_env is not None:
            raise ValueError("give the password or password_env, not both")
        if not self.tls:
            set_tls = [name for name in _TLS_FIELDS if name in self.model_fields_set]
            if set_tls:
                raise ValueError(f"{', '.join(set_tls)} need a rediss:// URL")
        return self

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def server(self) -> str:
        """The server for people and messages; never holds credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        kind = "Redis Cluster via" if self.cluster else "Redis at"
        return f"{kind} {host}:{self.port}"

    def to_url(self) -> str:
        """The URL that ``from_url`` turns back into this config, password included."""
        return self._render(None if self.password is None else self.password.get_secret_value())

    def redacted_url(self) -> str:
        """The URL with the password replaced by ``***``, for logs and reprs."""
        return self._render(None if self.password is None else "***")

    def _render(self, password: str | None) -> str:
        userinfo = ""
        if self.username is not None or password is not None:
            userinfo = quote(self.username or "", safe="")
            if password is not None:
                userinfo += ":" + quote(password, safe="")
            userinfo += "@"
        host = f"[{self.host}]" if ":" in self.host else quote(self.host, safe=".-_~")
        query = {
            name: _render_option(value)
            for name, value in self.model_dump(mode="json", exclude=set(_LOCATION_FIELDS)).items()
            if getattr(self, name)
            != type(self).model_fields[name].get_default(call_default_factory=True)
        }
        url = f"{self.scheme}://{userinfo}{host}:{self.port}/{self.db}"
        return f"{url}?{urlencode(query)}" if query else url

    def resolved_password(self) -> str | None:
        """The password from the URL or from ``password_env``; ConfigError if that is unset."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError(
                f"password_env names {self.password_env!r}, which is not set", driver=self.scheme
            )
        return value

    def tls_options(self) -> dict[str, Any] | None:
        """redis-py's ``ssl_*`` keyword arguments, or ``None`` without TLS."""
        if not self.tls:
            return None
        return {
            "ssl_ca_certs": self.ssl_ca_certs,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_cert_reqs": self.ssl_cert_reqs,
            "ssl_check_hostname": self.ssl_check_hostname and self.ssl_cert_reqs != "none",
        }


class RedissConfig(RedisConfig):
    """``rediss://``: the same as ``redis://``, over TLS."""

    scheme: ClassVar[str] = "rediss"


def _render_option(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
