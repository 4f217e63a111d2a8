"""The element types KV may have: one table, torch-free, for the layout, the
chunk format (whose header names a dtype by its code) and the codecs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVDType:
    """An element type of KV: its name (as torch spells it), its code in a chunk
    header (docs/chunk-format.md; never reused) and its size in bytes."""

    name: str
    code: int
    itemsize: int


KV_DTYPES: tuple[KVDType, ...] = (
    KVDType("float32", 1, 4),
    KVDType("float16", 2, 2),
    KVDType("bfloat16", 3, 2),
    KVDType("float8_e4m3fn", 4, 1),
    KVDType("float8_e5m2", 5, 1),
    KVDType("int8", 6, 1),
    KVDType("uint8", 7, 1),
)

DTYPE_CODES: dict[str, int] = {dtype.name: dtype.code for dtype in KV_DTYPES}
"""The chunk-header code of each dtype name."""

DTYPE_SIZES: dict[str, int] = {dtype.name: dtype.itemsize for dtype in KV_DTYPES}
"""Bytes per element of every dtype the chunk format names."""
