"""One measured cell: a store over one tier and layout, timed against its
baseline, repeat by repeat."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from kvstore.bench import lmcache as bench_lmcache
from kvstore.bench.baselines import Baseline, CopyBaseline, DirectIOBaseline
from kvstore.bench.options import (
    CHUNK_TOKENS,
)
from kvstore.bench.rows import (
    _ALIGN,
    DEFAULT_IO_BLOCK,
    DEFAULT_IO_THREADS,
    TIERS,
    Row,
    Settings,
    Workload,
)
from kvstore.config import StoreConfig, TierConfig
from kvstore.config_url import DriverConfig, url_scheme
from kvstore.errors import KVStoreError, NotSupportedError
from kvstore.registry import default_registry, parse_url
from kvstore.store import KVStore


def _tier_url(tier: str, workload: Workload, directory: Path) -> str:
    page = 256 << 10
    held = workload.chunks * -(-workload.encoded_bytes // page) * page
    if tier == "cpu":
        return f"cpu://?capacity={held + page}"
    return f"nvme://{directory}?capacity={2 * held + (64 << 20)}"


def _direct_io_baseline(
    config: DriverConfig, directory: Path, workload: Workload
) -> DirectIOBaseline:
    """The O_DIRECT baseline with the nvme driver's threads, piece size and fsync setting."""
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
            baseline = _direct_io_baseline(store.tiers[0].driver.config, baseline_dir, workload)
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


def measure_lmcache(
    tier: str, workload: Workload, settings: Settings, scratch: Path
) -> tuple[Row, Row]:
    """LMCache's backend beside ``tier`` on the workload's chunks against that tier's raw
    baseline, alternating in the same run (``bench_lmcache``): its CPU backend against the
    cpu tier's copy, its disk backend under ``scratch`` against the nvme tier's O_DIRECT."""
    name = bench_lmcache.NAMES[tier]
    store_dir = Path(tempfile.mkdtemp(prefix=f"{name}-store-", dir=scratch))
    baseline_dir = Path(tempfile.mkdtemp(prefix=f"{name}-baseline-", dir=scratch))
    backend: bench_lmcache.LMCacheCpu | bench_lmcache.LMCacheDisk | None = None
    baseline: Baseline | None = None
    try:
        if tier == "cpu":
            baseline = CopyBaseline(workload)
            backend = bench_lmcache.LMCacheCpu(workload.layout, CHUNK_TOKENS, workload.chunks)
        else:
            direct = _direct_io_baseline(
                parse_url(_tier_url(tier, workload, store_dir)), baseline_dir, workload
            )
            baseline = direct
            backend = bench_lmcache.LMCacheDisk(
                workload.layout,
                CHUNK_TOKENS,
                workload.chunks,
                directory=store_dir,
                threads=direct.threads,
                repeats=settings.warmup + settings.repeat,
            )
        ct = CHUNK_TOKENS
        chunks = [workload.kv[:, :, i * ct : (i + 1) * ct] for i in range(workload.chunks)]
        outs = [workload.out[:, :, i * ct : (i + 1) * ct] for i in range(workload.chunks)]
        rows = _rows(name, workload, False, baseline.description)
        for repeat in range(settings.warmup + settings.repeat):
            workload.out.zero_()
            times = RepeatTimes(
                baseline.write(), backend.store(chunks), baseline.read(), backend.retrieve(outs)
            )
            if repeat == 0 and not torch.equal(workload.out, workload.kv):
                raise KVStoreError("LMCache returned different KV than was stored")
            backend.clear()
            baseline.reset()
            if repeat >= settings.warmup:
                _record(rows, times)
        return rows
    finally:
        if backend is not None:
            backend.close()
        if baseline is not None:
            baseline.close()
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.rmtree(baseline_dir, ignore_errors=True)


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
