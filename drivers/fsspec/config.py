"""The fsspec driver's URL grammar and settings: ``fsspec+<protocol>://<path>?<options>``,
with storage options typed from the query string and secrets masked in messages."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

from pydantic import Field, JsonValue, field_validator
from typing_extensions import Self

from kvstore.config_url import DriverConfig, url_scheme
from kvstore.errors import ConfigError

MASK = "***"
_SECRET_NAME = re.compile(
    r"secret|passw|passphrase|token|credential|signature|(?:^|_)key", re.IGNORECASE
)
_SECRET_QUERY = re.compile(
    r"([?&][^=&#]*(?:secret|passw|passphrase|token|credential|signature|key)[^=&#]*=)[^&#]*",
    re.IGNORECASE,
)
_LOCATION_FIELDS = ("protocol", "path", "storage_options")
_RESERVED_OPTIONS = ("asynchronous", "loop", "skip_instance_cache")


class FsspecConfig(DriverConfig):
    """Which filesystem, where in it, and how the driver moves values.

    protocol: the fsspec protocol (``memory``, ``file``, ``s3``, ...), from the
        URL scheme ``fsspec+<protocol>``.
    path: the root under which values live (``bucket/prefix`` for object stores).
    storage_options: keyword arguments of the filesystem (``endpoint_url``, ``key``,
        ``anon``, ...): every query parameter that is not a driver option. Values
        that parse as JSON are typed (``anon=true``, ``config_kwargs={"a":1}``);
        quote a string that would otherwise parse (``key="123"``).
    shard_depth: directory levels of two hex digits above each value (0 to 3).
    concurrency: requests in flight (async filesystems) or threads (the others).
    timeout_s: the longest one driver call may take; past it, DriverTimeoutError.
    open_timeout_s: the longest opening (connect, create the root) and closing may take.
    write_mode: ``rename`` writes a temp file and renames it onto the value's
        name; ``direct`` writes the value's name once, for filesystems whose
        single write is atomic; ``auto`` picks ``direct`` for object stores and
        memory, ``rename`` for the rest.
    """

    scheme: ClassVar[str] = "fsspec"
    location_field: ClassVar[str | None] = "path"

    protocol: str = Field(pattern=r"^[a-z][a-z0-9.-]*$")
    path: str = Field(min_length=1)
    storage_options: dict[str, JsonValue] = Field(default_factory=dict)
    shard_depth: int = Field(default=1, ge=0, le=3)
    concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=30.0, gt=0)
    open_timeout_s: float = Field(default=10.0, gt=0)
    write_mode: Literal["auto", "rename", "direct"] = "auto"

    @field_validator("storage_options")
    @classmethod
    def _options_have_free_names(cls, options: dict[str, JsonValue]) -> dict[str, JsonValue]:
        taken = [name for name in options if name in cls.model_fields]
        reserved = [name for name in options if name in _RESERVED_OPTIONS]
        if taken:
            raise ValueError(f"{taken} name driver options, not storage options")
        if reserved:
            raise ValueError(f"{reserved} are set by the driver itself")
        return options

    @classmethod
    def driver_options(cls) -> list[str]:
        """The query parameters that configure the driver rather than the filesystem."""
        return [name for name in cls.model_fields if name not in _LOCATION_FIELDS]

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Parse ``fsspec+<protocol>://<path>?<options>``; a ConfigError says what is wrong."""
        shown = mask_url(url)
        family, _, protocol = url_scheme(url).partition("+")
        if family != cls.scheme or not protocol:
            raise ConfigError(
                f"{cls.__name__} takes fsspec+<protocol>:// URLs such as "
                f"fsspec+s3://bucket/prefix, not {shown!r}"
            )
        if "#" in url:
            raise ConfigError(f"driver URLs take no #fragment: {shown!r}")
        location, _, query = url.split("://", 1)[1].partition("?")
        if not location:
            raise ConfigError(
                f"fsspec URLs need a path (fsspec+memory://kv, fsspec+file:///var/cache/kv, "
                f"fsspec+s3://bucket/prefix): {shown!r}"
            )
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise ConfigError(f"malformed query string in {shown!r}: {exc}") from None
        data: dict[str, Any] = {"protocol": protocol, "path": unquote(location)}
        options: dict[str, JsonValue] = {}
        driver_options = cls.driver_options()
        for name, value in pairs:
            if name in _LOCATION_FIELDS:
                raise ConfigError(f"{name!r} is part of the URL itself, not an option: {shown!r}")
            if name in data or name in options:
                raise ConfigError(f"option {name!r} given twice in {shown!r}")
            if name in driver_options:
                data[name] = value
            else:
                options[name] = decode_option(value)
        data["storage_options"] = options
        return cls.from_mapping(data, source=shown)

    def to_url(self) -> str:
        """The URL that ``from_url`` turns back into this config, secrets included."""
        return self._url(self.storage_options)

    def redacted_url(self) -> str:
        """``to_url`` with the values of secret-looking storage options replaced by ``***``."""
        return self._url(masked_options(self.storage_options))

    def _url(self, options: dict[str, JsonValue]) -> str:
        rendered = self.model_dump(mode="json")
        fields = type(self).model_fields
        query = {
            name: str(rendered[name])
            for name in self.driver_options()
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        }
        query.update((name, encode_option(value)) for name, value in options.items())
        url = f"{self.scheme}+{self.protocol}://{quote(self.path, safe='/:@.-_~')}"
        return f"{url}?{urlencode(query, safe='*')}" if query else url

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, masked_options(value) if name == "storage_options" else value


def decode_option(text: str) -> JsonValue:
    """A storage option from its query-string text: its JSON value if it parses as
    JSON (numbers, ``true``, ``null``, objects, quoted strings), else the text."""
    try:
        value: JsonValue = json.loads(text)
    except ValueError:
        return text
    return value


def encode_option(value: JsonValue) -> str:
    """The query-string text that ``decode_option`` turns back into ``value``."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, separators=(",", ":"))


def masked_options(options: Any) -> Any:
    """``options`` with the values of secret-looking names (nested too) replaced by ``***``."""
    if not isinstance(options, dict):
        return options
    return {
        name: MASK if _SECRET_NAME.search(name) and value else masked_options(value)
        for name, value in options.items()
    }


def mask_url(url: str) -> str:
    """A URL fit for messages: values of secret-looking query parameters replaced by ``***``."""
    return _SECRET_QUERY.sub(lambda match: match.group(1) + MASK, url)
