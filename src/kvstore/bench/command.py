"""``kvstore bench`` itself: the run over every cell, its table and its JSON report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvstore.bench import lmcache as bench_lmcache
from kvstore.bench.measure import measure, measure_lmcache
from kvstore.bench.options import (
    CHUNK_TOKENS,
    add_bench_arguments,
)
from kvstore.bench.rows import LAYOUTS, TIERS, Row, Settings, Workload
from kvstore.config_url import url_scheme
from kvstore.errors import KVStoreError
from kvstore.registry import parse_url
from kvstore.sizes import format_size

_DESCRIPTION = "Measure kvstore store/retrieve throughput per tier against raw baselines."


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
                "verify = payload digest checked on retrieve (and computed on store).",
                *sorted(
                    {
                        f"{row.tier} = {bench_lmcache.DESCRIPTIONS[row.tier]}, no digest."
                        for row in rows
                        if row.tier in bench_lmcache.DESCRIPTIONS
                    }
                ),
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
    compare_lmcache = "lmcache" in settings.compare and _lmcache_importable(console)
    with scratch_directory(settings.directory) as scratch:
        for name in settings.layouts:
            layout = LAYOUTS[name]
            workload = Workload(name, layout, settings.chunk_count(layout))
            for tier in (*settings.tiers, *settings.urls):
                for verify in settings.verify:
                    shown = url_scheme(tier) if tier in settings.urls else tier
                    label = f"{shown} {name} verify={'on' if verify else 'off'}"
                    cell = partial(measure, tier, workload, verify, settings, scratch)
                    rows.extend(_measured(label, cell, console, errors))
            for tier in settings.tiers:
                if compare_lmcache:
                    label = f"{bench_lmcache.NAMES[tier]} {name}"
                    cell = partial(measure_lmcache, tier, workload, settings, scratch)
                    rows.extend(_measured(label, cell, console, errors))
            del workload
    order = [*TIERS, *bench_lmcache.NAMES.values(), *(url_scheme(url) for url in settings.urls)]
    rows.sort(key=lambda row: (order.index(row.tier), settings.layouts.index(row.layout)))
    if rows:
        console.print(results_table(rows, settings))
    if settings.json_path is not None:
        settings.json_path.write_text(json.dumps(report(rows, settings, errors), indent=2) + "\n")
    return 1 if errors else 0


def _lmcache_importable(console: Console) -> bool:
    """Whether LMCache can be compared here; a note on the console when it cannot."""
    if bench_lmcache.available():
        return True
    console.print("LMCache is not importable here: --compare lmcache skipped")
    return False


def _measured(
    label: str, cell: Callable[[], tuple[Row, Row]], console: Console, errors: list[str]
) -> tuple[Row, ...]:
    """The rows of one measured cell, or none with its error printed and recorded."""
    with console.status(f"measuring {label}"):
        try:
            return cell()
        except (KVStoreError, OSError) as exc:
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
            console.print(f"[red]error[/red] {errors[-1]}")
            return ()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for running the bench outside the ``kvstore`` command."""
    parser = argparse.ArgumentParser(prog="kvstore bench", description=_DESCRIPTION)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))
