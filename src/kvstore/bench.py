"""``kvstore bench``: store/retrieve throughput of each tier against a raw baseline.

For every tier and layout the bench opens a store with that tier alone, then
per repeat stores N fresh chunks (``store`` + ``flush``) and retrieves them
into a preallocated tensor, interleaved with a raw baseline that moves the
same bytes with no store in between:

- cpu: ``dst.copy_(src)`` per chunk between pre-touched host tensors;
- nvme: O_DIRECT ``pwrite``/``pread`` of one file per chunk, from and into
  pre-touched page-aligned ``mmap`` buffers, on as many threads as the
  driver's ``io_threads``, in the same directory as the store's files;
- a remote tier given with ``--url``: the raw client its driver ships as
  ``<driver package>.baseline.RawClientBaseline`` (redis-py pipelined
  SET/GET, botocore put/get, fsspec pipe/cat, Mooncake put_from/get_into),
  talking to the same server with the same settings.

Throughput is KV payload bytes (``layout.nbytes(chunk_tokens) * N``) over
wall time, in GB/s (10**9 bytes); the ratio is kvstore over baseline. Each
figure is the median of the timed repeats, after untimed warm-up repeats that
fault in the store's pooled buffers. Retrieve runs with payload verification
on (the default) and off (``TierConfig(verify=False)``); stores always digest.
The targets are printed next to each ratio, never enforced.
"""

from __future__ import annotations

import argparse
import importlib
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kvstore import bench_lmcache
from kvstore.bench_options import (
    CHUNK_TOKENS,
    FULL_BYTES,
    FULL_REPEATS,
    QUICK_BYTES,
    QUICK_REPEATS,
    add_bench_arguments,
)
from kvstore.chunk import raw_chunk_size
from kvstore.config import StoreConfig, TierConfig
from kvstore.config_url import url_scheme
from kvstore.errors import ConfigError, KVStoreError, NotSupportedError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import default_registry, parse_url
from kvstore.sizes import format_size
from kvstore.store import KVStore

LAYOUTS: dict[str, KVLayout] = {
    "llama3-8b": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16"),
    "qwen2-0.5b": KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, dtype="float16"),
}
"""Named KV layouts: Llama-3-8B (32 MiB a 256-token chunk) and Qwen2-0.5B (3 MiB);
their names are ``bench_options.LAYOUT_NAMES``."""

TIERS = ("cpu", "nvme")
TARGETS: dict[str, float] = {"cpu": 0.85, "nvme": 0.90}
REMOTE_TARGET = 0.85
"""The ratio each tier aims for against its raw baseline (reported, not enforced);
remote tiers (``--url``) aim for ``REMOTE_TARGET`` of their raw client."""

DEFAULT_IO_THREADS, DEFAULT_IO_BLOCK = 8, 4 << 20
"""Baseline threads and piece size when the nvme driver's config names none."""

_ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
GB = 1e9
_DESCRIPTION = "Measure kvstore store/retrieve throughput per tier against raw baselines."


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
        return TARGETS.get(self.tier, REMOTE_TARGET)

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


class Baseline(Protocol):
    """The raw yardstick of a tier: the same bytes moved with nothing in between."""

    description: str

    def write(self) -> float: ...

    def read(self) -> float: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class CopyBaseline:
    """The cpu tier's yardstick: ``dst.copy_(src)`` per chunk, pre-touched tensors."""

    def __init__(self, workload: Workload) -> None:
        self.description = f"torch copy_, {torch.get_num_threads()} threads"
        self._host = workload.kv_bytes().clone()
        self._arena = torch.zeros_like(self._host)

    def write(self) -> float:
        return _timed(lambda: _copy_rows(self._arena, self._host))

    def read(self) -> float:
        return _timed(lambda: _copy_rows(self._host, self._arena))

    def reset(self) -> None:
        """Nothing to undo: the next write overwrites the same memory."""

    def close(self) -> None:
        """The tensors go with the object."""


def _copy_rows(destination: torch.Tensor, source: torch.Tensor) -> None:
    for target, row in zip(destination, source):
        target.copy_(row)


class DirectIOBaseline:
    """The nvme tier's yardstick: O_DIRECT pwrite/pread of one file per chunk.

    Each chunk, padded to 4 KiB as O_DIRECT requires, moves in ``piece``-byte
    pwrite/pread calls spread over ``threads`` threads: the queue depth the
    nvme driver keeps with the same ``io_threads`` and ``io_block``. Buffers
    are anonymous mappings (page-aligned, touched before timing); the files
    live next to the store's, on the same filesystem and device. With
    ``fsync`` (the driver's default) each file is fsynced before it is closed,
    so both sides pay for durability.
    """

    def __init__(
        self, directory: Path, workload: Workload, *, threads: int, piece: int, fsync: bool
    ) -> None:
        _check_direct_io(directory)
        self.description = (
            f"O_DIRECT pwrite{'+fsync' if fsync else ''}/pread of {format_size(piece)} "
            f"pieces on {threads} threads, a file a chunk"
        )
        self._fsync = fsync
        chunks = workload.chunks
        size = -(-workload.chunk_bytes // _ALIGN) * _ALIGN
        self._paths = [directory / f"chunk-{i:05d}" for i in range(chunks)]
        self._source = mmap.mmap(-1, size * chunks)
        self._target = mmap.mmap(-1, size * chunks)
        source = np.frombuffer(self._source, dtype=np.uint8).reshape(chunks, size)
        source[:, workload.chunk_bytes :] = 0
        source[:, : workload.chunk_bytes] = workload.kv_bytes().numpy()
        np.frombuffer(self._target, dtype=np.uint8)[:] = 0
        self._pieces = [
            (index, offset, min(piece, size - offset))
            for index in range(chunks)
            for offset in range(0, size, piece)
        ]
        self._size = size
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-direct-io")

    def _view(self, buffer: mmap.mmap, index: int, offset: int, length: int) -> memoryview:
        start = index * self._size + offset
        return memoryview(buffer)[start : start + length]

    def _open_all(self, flags: int) -> list[int]:
        return [os.open(path, flags | _O_DIRECT | _O_CLOEXEC, 0o600) for path in self._paths]

    def _move(self, fds: list[int], buffer: mmap.mmap, write: bool) -> None:
        def one(piece: tuple[int, int, int]) -> None:
            index, offset, length = piece
            view = self._view(buffer, index, offset, length)
            done = 0
            while done < length:
                if write:
                    moved = os.pwrite(fds[index], view[done:], offset + done)
                else:
                    moved = os.preadv(fds[index], [view[done:]], offset + done)
                if moved == 0:
                    raise OSError(f"{self._paths[index]} is shorter than it was written")
                done += moved

        list(self._pool.map(one, self._pieces))

    def _finish(self, fd: int) -> None:
        try:
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def write(self) -> float:
        def run() -> None:
            fds = self._open_all(os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                self._move(fds, self._source, write=True)
            finally:
                list(self._pool.map(self._finish, fds))

        return _timed(run)

    def read(self) -> float:
        def run() -> None:
            fds = self._open_all(os.O_RDONLY)
            try:
                self._move(fds, self._target, write=False)
            finally:
                for fd in fds:
                    os.close(fd)

        return _timed(run)

    def reset(self) -> None:
        """Delete the files, as the store's clear() deletes its chunks."""
        for path in self._paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.reset()
        self._pool.shutdown(wait=True)
        self._source.close()
        self._target.close()


def _check_direct_io(directory: Path) -> None:
    """Refuse a filesystem without O_DIRECT (tmpfs): the baseline would be meaningless."""
    probe = directory / "baseline-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | _O_DIRECT | _O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"{directory} does not support O_DIRECT ({exc.strerror}); "
            "pass --dir on a disk-backed filesystem"
        ) from None
    os.close(fd)
    probe.unlink()


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


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


def _tier_url(tier: str, workload: Workload, directory: Path) -> str:
    page = 256 << 10
    held = workload.chunks * -(-workload.encoded_bytes // page) * page
    if tier == "cpu":
        return f"cpu://?capacity={held + page}"
    return f"nvme://{directory}?capacity={2 * held + (64 << 20)}"


def _direct_io_baseline(store: KVStore, directory: Path, workload: Workload) -> DirectIOBaseline:
    """The O_DIRECT baseline with the nvme driver's threads, piece size and fsync setting."""
    config = store.tiers[0].driver.config
    threads = getattr(config, "io_threads", DEFAULT_IO_THREADS)
    piece = getattr(config, "io_block", DEFAULT_IO_BLOCK)
    return DirectIOBaseline(
        directory,
        workload,
        threads=threads if isinstance(threads, int) and threads > 0 else DEFAULT_IO_THREADS,
        piece=piece if isinstance(piece, int) and piece % _ALIGN == 0 else DEFAULT_IO_BLOCK,
        fsync=bool(getattr(config, "fsync", False)),
    )


def raw_client_baseline(url: str, workload: Workload) -> Baseline:
    """The raw client a remote driver ships as ``<driver package>.baseline.RawClientBaseline``,
    moving the workload's chunk bytes under fresh random keys."""
    registered = default_registry().get(url_scheme(url))
    package = registered.info.target.partition(":")[0].rpartition(".")[0]
    try:
        module = importlib.import_module(f"{package}.baseline")
    except ImportError:
        raise NotSupportedError(
            f"driver {registered.info.scheme!r} ships no raw-client baseline ({package}.baseline)",
            driver=registered.info.scheme,
        ) from None
    values = [(os.urandom(32), memoryview(row.numpy())) for row in workload.kv_bytes()]
    baseline: Baseline = module.RawClientBaseline(url, values)
    return baseline


def measure(
    tier: str, workload: Workload, verify: bool, settings: Settings, scratch: Path
) -> tuple[Row, Row]:
    """Store and retrieve rows of one tier, layout and verify setting."""
    remote = tier not in TIERS
    label = url_scheme(tier) if remote else tier
    store_dir = Path(tempfile.mkdtemp(prefix=f"{label}-store-", dir=scratch))
    baseline_dir = Path(tempfile.mkdtemp(prefix=f"{label}-baseline-", dir=scratch))
    url = tier if remote else _tier_url(tier, workload, store_dir)
    config = StoreConfig(
        tiers=[
            TierConfig(
                url=url,
                verify=verify,
                max_bytes=2 * workload.chunks * workload.encoded_bytes if remote else None,
            )
        ],
        chunk_tokens=CHUNK_TOKENS,
    )
    store = KVStore.open(config, workload.namespace())
    baseline: Baseline | None = None
    try:
        if remote:
            baseline = raw_client_baseline(tier, workload)
        elif tier == "cpu":
            baseline = CopyBaseline(workload)
        else:
            baseline = _direct_io_baseline(store, baseline_dir, workload)
        rows = _rows(label, workload, verify, baseline.description)
        for repeat in range(settings.warmup + settings.repeat):
            times = _one_repeat(store, baseline, workload, check=repeat == 0)
            if repeat >= settings.warmup:
                _record(rows, times)
        return rows
    finally:
        if baseline is not None:
            baseline.close()
        store.close()
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.rmtree(baseline_dir, ignore_errors=True)


def measure_lmcache(workload: Workload, settings: Settings) -> tuple[Row, Row]:
    """LMCache's CPU backend on the workload's chunks against the cpu tier's raw copy,
    alternating in the same run (``bench_lmcache``)."""
    backend = bench_lmcache.LMCacheCpu(workload.layout, CHUNK_TOKENS, workload.chunks)
    baseline = CopyBaseline(workload)
    ct = CHUNK_TOKENS
    chunks = [workload.kv[:, :, i * ct : (i + 1) * ct] for i in range(workload.chunks)]
    outs = [workload.out[:, :, i * ct : (i + 1) * ct] for i in range(workload.chunks)]
    rows = _rows(bench_lmcache.NAME, workload, False, baseline.description)
    try:
        for repeat in range(settings.warmup + settings.repeat):
            workload.out.zero_()
            times = RepeatTimes(
                baseline.write(), backend.store(chunks), baseline.read(), backend.retrieve(outs)
            )
            if repeat == 0 and not torch.equal(workload.out, workload.kv):
                raise KVStoreError("LMCache returned different KV than was stored")
            backend.clear()
            if repeat >= settings.warmup:
                _record(rows, times)
    finally:
        backend.close()
    return rows


class RepeatTimes(NamedTuple):
    """Seconds taken by each step of one repeat."""

    baseline_write: float
    store: float
    baseline_read: float
    retrieve: float


def _rows(tier: str, workload: Workload, verify: bool, baseline: str) -> tuple[Row, Row]:
    """The store and retrieve rows of one measured cell, with no times yet."""
    stored, retrieved = (
        Row(
            tier=tier,
            layout=workload.name,
            op=op,
            verify=verify,
            chunks=workload.chunks,
            chunk_bytes=workload.chunk_bytes,
            baseline=baseline,
        )
        for op in ("store", "retrieve")
    )
    return stored, retrieved


def _record(rows: tuple[Row, Row], times: RepeatTimes) -> None:
    """Add one timed repeat to the store and retrieve rows."""
    stored, retrieved = rows
    stored.baseline_s.append(times.baseline_write)
    stored.kvstore_s.append(times.store)
    retrieved.baseline_s.append(times.baseline_read)
    retrieved.kvstore_s.append(times.retrieve)


def _one_repeat(
    store: KVStore, baseline: Baseline, workload: Workload, *, check: bool
) -> RepeatTimes:
    """Baseline write, store, baseline read, retrieve; then clear both, untimed."""
    tokens = workload.fresh_tokens()
    baseline_write = baseline.write()
    start = time.perf_counter()
    result = store.store(tokens, workload.kv)
    store.flush()
    store_time = time.perf_counter() - start
    if result.written != workload.chunks:
        raise KVStoreError(
            f"the store wrote {result.written} of {workload.chunks} chunks "
            f"({result.failed} failed); see the log"
        )
    baseline_read = baseline.read()
    start = time.perf_counter()
    loaded = store.retrieve(tokens, out=workload.out)
    retrieve_time = time.perf_counter() - start
    if loaded.tokens != workload.tokens_total:
        raise KVStoreError(f"retrieve loaded {loaded.tokens} of {workload.tokens_total} tokens")
    if check and not torch.equal(workload.out, workload.kv):
        raise KVStoreError("retrieve returned different KV than was stored")
    store.clear()
    baseline.reset()
    return RepeatTimes(baseline_write, store_time, baseline_read, retrieve_time)


@contextmanager
def scratch_directory(parent: Path | None) -> Iterator[Path]:
    """A fresh directory for the nvme files, removed afterwards.

    Under ``--dir`` when given, else under the user's cache directory (usually
    on disk, unlike a tmpfs ``/tmp``, so O_DIRECT works).
    """
    if parent is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        parent = Path(cache) / "kvstore"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def results_table(rows: Sequence[Row], settings: Settings) -> Table:
    table = Table(
        title="kvstore bench",
        caption="\n".join(
            (
                f"GB/s = 10^9 bytes of KV per second, median of {settings.repeat} repeats "
                f"after {settings.warmup} warm-up.",
                "verify = payload digest checked on retrieve (store always digests); "
                f"{bench_lmcache.NAME} = {bench_lmcache.DESCRIPTION}, no digest.",
                *sorted({f"{row.tier} baseline: {row.baseline}" for row in rows}),
            )
        ),
        caption_justify="left",
    )
    for column in ("tier", "layout", "op", "verify", "chunks"):
        table.add_column(column, no_wrap=True)
    for column in ("kvstore GB/s", "baseline GB/s", "ratio", "target"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        colour = "green" if row.ratio >= row.target else "yellow"
        table.add_row(
            row.tier,
            row.layout,
            row.op,
            "on" if row.verify else "off",
            f"{row.chunks} x {format_size(row.chunk_bytes)}",
            f"{row.kvstore_gbps:.2f}",
            f"{row.baseline_gbps:.2f}",
            f"[{colour}]{row.ratio:.2f}[/{colour}]",
            f">= {row.target:.2f}",
        )
    return table


def report(rows: Sequence[Row], settings: Settings, errors: Sequence[str]) -> dict[str, Any]:
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {
            "layouts": list(settings.layouts),
            "tiers": list(settings.tiers),
            "urls": [parse_url(url).redacted_url() for url in settings.urls],
            "chunk_tokens": CHUNK_TOKENS,
            "repeat": settings.repeat,
            "warmup": settings.warmup,
            "statistic": "median",
            "quick": settings.quick,
        },
        "results": [row.to_json() for row in rows],
        "errors": list(errors),
    }


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench; 0 when every tier was measured, whatever the ratios, else 1."""
    settings = Settings.from_args(args)
    console = Console(width=None if sys.stdout.isatty() else 120)
    rows: list[Row] = []
    errors: list[str] = []
    with scratch_directory(settings.directory) as scratch:
        for name in settings.layouts:
            layout = LAYOUTS[name]
            workload = Workload(name, layout, settings.chunk_count(layout))
            for tier in (*settings.tiers, *settings.urls):
                for verify in settings.verify:
                    shown = url_scheme(tier) if tier in settings.urls else tier
                    label = f"{shown} {name} verify={'on' if verify else 'off'}"
                    with console.status(f"measuring {label}"):
                        try:
                            rows.extend(measure(tier, workload, verify, settings, scratch))
                        except (KVStoreError, OSError) as exc:
                            errors.append(f"{label}: {type(exc).__name__}: {exc}")
                            console.print(f"[red]error[/red] {errors[-1]}")
            if "lmcache" in settings.compare:
                if bench_lmcache.available():
                    with console.status(f"measuring LMCache's CPU backend, {name}"):
                        rows.extend(measure_lmcache(workload, settings))
                else:
                    console.print("LMCache is not importable here: --compare lmcache skipped")
            del workload
    order = [*TIERS, bench_lmcache.NAME, *(url_scheme(url) for url in settings.urls)]
    rows.sort(key=lambda row: (order.index(row.tier), settings.layouts.index(row.layout)))
    if rows:
        console.print(results_table(rows, settings))
    if settings.json_path is not None:
        settings.json_path.write_text(json.dumps(report(rows, settings, errors), indent=2) + "\n")
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for running the bench outside the ``kvstore`` command."""
    parser = argparse.ArgumentParser(prog="kvstore bench", description=_DESCRIPTION)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
