"""Byte sizes written the way people write them: ``64GiB``, ``512MB``, ``4096``."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

from kvstore.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
MAX_SIZE = (1 << 63) - 1
"""The largest byte size accepted: any more is a typo, and would not fit a signed 64-bit field."""


def parse_size(value: object) -> int:
    """Return the number of bytes ``value`` names; ints pass through."""
    if isinstance(value, bool):
        raise ConfigError(f"not a byte size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"byte size must not be negative: {value}")
        if value > MAX_SIZE:
            raise ConfigError(f"byte size must be at most {MAX_SIZE} bytes (8 EiB)")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"not a byte size: {value!r}")
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a byte size: {value!r} (examples: 4096, 512MiB, 64GiB)")
    number, unit = match.groups()
    try:
        size = Fraction(number) * _UNITS[unit.lower()]
    except ValueError:
        raise ConfigError(f"not a byte size: {value!r} (too many digits)") from None
    if size.denominator != 1:
        raise ConfigError(f"byte size is not a whole number of bytes: {value!r}")
    return parse_size(int(size))


def format_size(size: int) -> str:
    """Render ``size`` exactly, in the largest binary unit that divides it."""
    for unit, factor in _BINARY:
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_size(size: float) -> str:
    """Render ``size`` approximately for people (``1.5 GiB``)."""
    for unit, factor in _BINARY:
        if abs(size) >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size:.0f} B"


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
]
"""A pydantic field type for byte sizes: accepts ``64GiB``, serialises back to it."""
