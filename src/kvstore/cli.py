"""The ``kvstore`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvstore.errors import KVStoreError


def _cmd_drivers(args: argparse.Namespace) -> int:
    from kvstore.registry import default_registry

    console = Console()
    table = Table(title="kvstore drivers")
    for column in ("scheme", "source", "summary", "status", "capabilities"):
        table.add_column(column)
    for registered in default_registry().drivers():
        try:
            cls = registered.load()
        except KVStoreError as exc:
            table.add_row(
                registered.info.scheme,
                registered.source,
                registered.info.summary,
                f"[red]unavailable[/red]: {escape(exc.message)}",
                "",
            )
            continue
        table.add_row(
            registered.info.scheme,
            registered.source,
            registered.info.summary,
            "[green]ok[/green]",
            ", ".join(cls.static_capabilities.summary()),
        )
    console.print(table)
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    from kvstore.conformance.runner import run_conformance

    code: int = run_conformance(
        args.url, json_path=args.json, pytest_args=args.pytest_args, verbose=args.verbose
    )
    return code


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvstore.bench import run_bench

    code: int = run_bench(args)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    drivers = commands.add_parser("drivers", help="list every registered driver")
    drivers.set_defaults(func=_cmd_drivers)

    conformance = commands.add_parser(
        "conformance", help="run the conformance suite against a driver URL"
    )
    conformance.add_argument("url", help="driver URL, e.g. nvme:///tmp/kv?capacity=1GiB")
    conformance.add_argument("--json", metavar="FILE", help="also write a JSON report to FILE")
    conformance.add_argument("-v", "--verbose", action="store_true", help="show pytest output")
    conformance.add_argument(
        "pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -k batch"
    )
    conformance.set_defaults(func=_cmd_conformance)

    from kvstore.bench import add_bench_arguments

    bench = commands.add_parser(
        "bench", help="measure store/retrieve throughput against raw baselines"
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, passthrough = words[:cut], words[cut + 1 :]
    args = build_parser().parse_args(words)
    if passthrough:
        if not hasattr(args, "pytest_args"):
            build_parser().error("arguments after -- are only taken by 'conformance'")
        args.pytest_args = [*args.pytest_args, *passthrough]
    try:
        code: int = args.func(args)
    except KVStoreError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
