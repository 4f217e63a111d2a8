"""What a bench run reports: its settings and one row per tier, layout and operation."""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.bench.options import (
    CHUNK_TOKENS,
    FULL_BYTES,
    FULL_REPEATS,
    QUICK_BYTES,
    QUICK_REPEATS,
)
from kvstore.chunk import raw_chunk_size
from kvstore.errors import ConfigError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout

LAYOUTS: dict[str, KVLayout] = {
    "llama3-8b": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16"),
    "qwen2-0.5b": KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, dtype="float16"),
}
"""Named KV layouts: Llama-3-8B (32 MiB a 256-token chunk) and Qwen2-0.5B (3 MiB);
their names are ``options.LAYOUT_NAMES``."""


TIERS = ("cpu", "nvme")


TARGETS: dict[tuple[str, bool], float] = {
    ("cpu", True): 0.85,
    ("cpu", False): 0.90,
    ("nvme", True): 0.90,
    ("nvme", False): 0.90,
}


REMOTE_TARGET = 0.85
"""The ratio each tier aims for against its raw baseline, by tier and whether
payloads are verified (reported, not enforced); remote tiers (``--url``) and
LMCache's rows aim for ``REMOTE_TARGET`` of theirs."""


DEFAULT_IO_THREADS, DEFAULT_IO_BLOCK = 8, 4 << 20
"""Baseline threads and piece size when the nvme driver's config names none."""


_ALIGN = 4096


_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)


GB = 1e9


@dataclass
class Row:
    """One measured (tier, layout, op, verify) cell: wall times of both sides per repeat."""

    tier: str
    layout: str
    op: str
    verify: bool
    chunks: int
    chunk_bytes: int
    baseline: str
    kvstore_s: list[float] = field(default_factory=list)
    baseline_s: list[float] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.chunks * self.chunk_bytes

    @property
    def kvstore_gbps(self) -> float:
        return self.total_bytes / statistics.median(self.kvstore_s) / GB

    @property
    def baseline_gbps(self) -> float:
        return self.total_bytes / statistics.median(self.baseline_s) / GB

    @property
    def ratio(self) -> float:
        return self.kvstore_gbps / self.baseline_gbps

    @property
    def target(self) -> float:
        return TARGETS.get((self.tier, self.verify), REMOTE_TARGET)

    def to_json(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "layout": self.layout,
            "op": self.op,
            "verify": self.verify,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "total_bytes": self.total_bytes,
            "baseline": self.baseline,
            "kvstore_gbps": self.kvstore_gbps,
            "baseline_gbps": self.baseline_gbps,
            "ratio": self.ratio,
            "target": self.target,
            "meets_target": self.ratio >= self.target,
            "kvstore_best_gbps": self.total_bytes / min(self.kvstore_s) / GB,
            "baseline_best_gbps": self.total_bytes / min(self.baseline_s) / GB,
            "kvstore_seconds": self.kvstore_s,
            "baseline_seconds": self.baseline_s,
        }


@dataclass(frozen=True)
class Settings:
    """What to measure, from the command line."""

    layouts: tuple[str, ...]
    tiers: tuple[str, ...]
    urls: tuple[str, ...]
    chunks: int | None
    repeat: int
    warmup: int
    verify: tuple[bool, ...]
    directory: Path | None
    json_path: Path | None
    quick: bool
    compare: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        urls = tuple(args.url or ())
        listed = args.tiers if args.tiers is not None else ("" if urls else ",".join(TIERS))
        tiers = tuple(t.strip() for t in listed.split(",") if t.strip())
        unknown = [t for t in tiers if t not in TIERS]
        if unknown or not (tiers or urls):
            raise ConfigError(f"--tiers takes a list from {', '.join(TIERS)}, got {listed!r}")
        if args.chunks is not None and args.chunks < 1:
            raise ConfigError("--chunks must be at least 1")
        repeat = (
            args.repeat
            if args.repeat is not None
            else (QUICK_REPEATS if args.quick else FULL_REPEATS)
        )
        if repeat < 1 or args.warmup < 0:
            raise ConfigError("--repeat must be at least 1 and --warmup at least 0")
        return cls(
            layouts=tuple(LAYOUTS) if args.layout == "all" else (args.layout,),
            tiers=tiers,
            urls=urls,
            chunks=args.chunks,
            repeat=repeat,
            warmup=args.warmup,
            verify={"both": (True, False), "on": (True,), "off": (False,)}[args.verify],
            directory=Path(args.dir) if args.dir else None,
            json_path=Path(args.json) if args.json else None,
            quick=args.quick,
            compare=tuple(args.compare or ()),
        )

    def chunk_count(self, layout: KVLayout) -> int:
        if self.chunks is not None:
            return self.chunks
        budget = QUICK_BYTES if self.quick else FULL_BYTES
        return max(1, budget // layout.nbytes(CHUNK_TOKENS))


class Workload:
    """The KV of N chunks, a preallocated tensor to retrieve into, fresh tokens per repeat."""

    def __init__(self, name: str, layout: KVLayout, chunks: int) -> None:
        self.name = name
        self.layout = layout
        self.chunks = chunks
        self.tokens_total = chunks * CHUNK_TOKENS
        generator = torch.Generator().manual_seed(0)
        self.kv = torch.randn(
            layout.shape(self.tokens_total), generator=generator, dtype=torch.float32
        ).to(layout.torch_dtype)
        self.out = torch.zeros_like(self.kv)
        self.chunk_bytes = layout.nbytes(CHUNK_TOKENS)
        self.encoded_bytes = raw_chunk_size(self.kv[:, :, :CHUNK_TOKENS])
        self._rng = np.random.default_rng(1)

    def kv_bytes(self) -> torch.Tensor:
        """The KV's bytes as ``[chunks, chunk_bytes]`` uint8 (a view, not chunk-ordered)."""
        return self.kv.view(torch.uint8).reshape(self.chunks, self.chunk_bytes)

    def fresh_tokens(self) -> torch.Tensor:
        """Token ids no earlier repeat used (with overwhelming odds), so every chunk is new."""
        ids = self._rng.integers(0, 2**31 - 1, self.tokens_total, dtype=np.int64)
        return torch.from_numpy(ids)

    def namespace(self) -> Namespace:
        return Namespace(
            model=f"bench/{self.name}", revision="0", layout=self.layout, chunk_tokens=CHUNK_TOKENS
        )
