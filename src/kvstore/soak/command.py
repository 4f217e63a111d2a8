"""``kvstore soak``: parse, make the private disk, run, print.

The private disk (a tmpfs in a mount namespace of this process) is made
before torch and numpy are imported: they start threads, and a process with
threads cannot enter a new user namespace.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from kvstore.soak.faults import private_disk
from kvstore.soak.options import SoakSettings, add_soak_arguments


def run_soak(args: argparse.Namespace) -> int:
    """Run the soak and print its tables; 0 when every check held, 1 otherwise, 2
    when it could not run (no redis-server, a worker that never opened its store)."""
    settings = SoakSettings.from_args(args)
    run_dir = args.dir or Path(tempfile.mkdtemp(prefix="kvstore-soak-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    disk_problem = (
        private_disk(run_dir / "disk", settings.disk_bytes)
        if "fill-disk" in settings.faults
        else "not asked"
    )
    from kvstore.soak.runner import report_tables, run

    console = Console()
    try:
        report = run(settings, run_dir, disk_problem)
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] the soak could not run: {exc}")
        return 2
    finally:
        if args.dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    for table in report_tables(report):
        console.print(table)
    load = " ".join(f"{x:.2f}" for x in report["load_average_at_end"])
    console.print(f"load average at the end: {load}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["held"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvstore soak", description="Run the store in steady state and check its promises."
    )
    add_soak_arguments(parser)
    return run_soak(parser.parse_args(argv))
