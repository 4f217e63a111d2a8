"""Typed driver configs that are built from a URL and render back to it.

``nvme:///var/cache/kv?capacity=64GiB`` becomes ``NvmeConfig(path="/var/cache/kv",
capacity=68719476736)`` and ``to_url()`` gives the same URL back. Configs are
frozen pydantic models, so they compare by value and pickle across processes.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from kvstore.errors import ConfigError


def url_scheme(url: str) -> str:
    """The scheme of ``url`` (``nvme`` for ``nvme:///x``), or a ConfigError."""
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigError(f"not a driver URL (expected scheme://...): {url!r}")
    return scheme.lower()


class DriverConfig(BaseModel):
    """Base class of every driver's config.

    Subclasses set ``scheme`` and, when the URL's location (what follows
    ``scheme://`` up to ``?``) means something, ``location_field``: the field
    that holds it. Every other field is a query parameter.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: ClassVar[str]
    location_field: ClassVar[str | None] = None
    secret_fields: ClassVar[frozenset[str]] = frozenset()
    """Query parameters that hold secrets: masked by ``redacted_url`` and in errors."""

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Parse ``url``; a ConfigError says what is wrong with it."""
        scheme = url_scheme(url)
        shown = redact_url(url, cls.secret_fields)
        if scheme != cls.scheme and not scheme.startswith(cls.scheme + "+"):
            raise ConfigError(f"{cls.__name__} takes {cls.scheme}:// URLs, not {shown!r}")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigError(f"malformed URL {shown!r}: {exc}") from None
        if parts.fragment:
            raise ConfigError(f"driver URLs take no #fragment: {shown!r}")
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ConfigError(f"malformed query string in {shown!r}") from None
        data: dict[str, Any] = {}
        for name, value in pairs:
            if name in data:
                raise ConfigError(f"option {name!r} given twice in {shown!r}")
            data[name] = value
        location = cls.decode_location(url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0])
        if cls.location_field is not None:
            if cls.location_field in data:
                raise ConfigError(f"{cls.location_field!r} is part of the URL's location")
            if location:
                data[cls.location_field] = location
        elif location:
            raise ConfigError(f"{cls.scheme}:// URLs take no location, got {location!r}")
        return cls.from_mapping(data, source=shown)

    @classmethod
    def decode_location(cls, location: str) -> str:
        """The location field's value from the URL's (percent-encoded) location;
        configs that parse a structured location themselves (``user:pass@host``)
        take it raw and decode its parts."""
        return unquote(location)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "config") -> Self:
        """Validate ``data`` (from a URL or YAML) into a config."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(
                f"invalid {cls.scheme} config in {source!r}: {validation_problems(exc)}"
            ) from None

    def to_url(self) -> str:
        """The URL that ``from_url`` turns back into this config."""
        rendered = self.model_dump(mode="json")
        location = ""
        if self.location_field is not None:
            location = quote(str(rendered.pop(self.location_field) or ""), safe="/:@.-_~")
        query = {
            name: _render(rendered[name])
            for name, field in type(self).model_fields.items()
            if name != self.location_field
            and (
                field.is_required()
                or getattr(self, name) != field.get_default(call_default_factory=True)
            )
        }
        url = f"{self.scheme}://{location}"
        return f"{url}?{urlencode(query)}" if query else url

    def redacted_url(self) -> str:
        """The URL for logs, reprs and stats, with ``secret_fields`` and any
        password in the location masked."""
        return redact_url(self.to_url(), self.secret_fields)


def redact_url(url: str, secret_fields: frozenset[str]) -> str:
    """``url`` with the password of its location and the given query parameters
    replaced by ``***``, so it can be shown to people and written to logs."""
    head, sep, rest = url.partition("://")
    location, qmark, query = rest.partition("?")
    authority, slash, path = location.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    if query and secret_fields:
        pairs = [pair.partition("=") for pair in query.split("&")]
        query = "&".join(
            f"{name}{eq}{'***' if name in secret_fields and value else value}"
            for name, eq, value in pairs
        )
    return f"{head}{sep}{authority}{slash}{path}{qmark}{query}"


def validation_problems(exc: ValidationError) -> str:
    """One line naming each invalid field and what is wrong with it."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'config'}: {err['msg']}"
        for err in exc.errors()
    )


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
