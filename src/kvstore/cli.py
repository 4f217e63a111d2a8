"""The ``kvstore`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kvstore.errors import ConfigError, KVStoreError

INTERRUPTED_EXIT_CODE = 130
"""What a command interrupted by Ctrl-C exits with (128 + SIGINT), as shells do."""


def _cmd_drivers(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from kvstore.registry import default_registry

    console = Console()
    table = Table(title="kvstore drivers")
    for column in ("scheme", "source", "summary", "status", "capabilities"):
        table.add_column(column)
    unavailable: list[tuple[str, str]] = []
    for registered in default_registry().drivers():
        try:
            cls = registered.load()
        except KVStoreError as exc:
            unavailable.append((registered.info.scheme, exc.message))
            table.add_row(
                registered.info.scheme,
                registered.source,
                registered.info.summary,
                "[red]unavailable[/red] (below)",
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
    # Load errors carry the install hint: printed in full width, not squeezed into a column.
    for scheme, message in unavailable:
        console.print(f"[red]{scheme}[/red]: {escape(message)}")
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    try:
        import pytest  # noqa: F401  (the suite runs under pytest)
    except ImportError:
        raise ConfigError(
            "kvstore conformance runs the suite with pytest, which is not installed: "
            "pip install 'kvstore-llm[conformance]'"
        ) from None
    from kvstore.conformance.runner import run_conformance

    code: int = run_conformance(
        args.url, json_path=args.json, pytest_args=args.pytest_args, verbose=args.verbose
    )
    return code


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvstore.bench.command import run_bench

    code: int = run_bench(args)
    return code


def _cmd_bench_codecs(args: argparse.Namespace) -> int:
    from kvstore.bench.codecs import run_codec_bench

    return run_codec_bench(args)


def _cmd_ctl(args: argparse.Namespace) -> int:
    from kvstore.control.cli import run_ctl

    return run_ctl(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvstore.control.cli import run_serve

    return run_serve(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvstore.demo import run_demo

    return run_demo(args)


def _cmd_soak(args: argparse.Namespace) -> int:
    from kvstore.soak.command import run_soak

    return run_soak(args)


def _soak_arguments(parser: argparse.ArgumentParser) -> None:
    from kvstore.soak.options import add_soak_arguments

    add_soak_arguments(parser)


def _conformance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="driver URL, e.g. nvme:///tmp/kv?capacity=1GiB")
    parser.add_argument("--json", metavar="FILE", help="also write a JSON report to FILE")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest output")
    parser.add_argument(
        "pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -k batch"
    )


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from kvstore.bench.options import add_bench_arguments, add_codec_bench_arguments

    add_bench_arguments(parser)
    modes = parser.add_subparsers(dest="bench_mode", metavar="{codecs}")
    codecs = modes.add_parser(
        "codecs",
        help="compression ratio, speed and reconstruction error of codec stacks on real KV",
    )
    add_codec_bench_arguments(codecs)
    codecs.set_defaults(func=_cmd_bench_codecs)


def _cmd_node(args: argparse.Namespace) -> int:
    from kvstore.node.command import run_node

    return run_node(args)


def _node_arguments(parser: argparse.ArgumentParser) -> None:
    from kvstore.node.command import add_node_arguments

    add_node_arguments(parser)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from kvstore.demo import add_demo_arguments

    add_demo_arguments(parser)


def _ctl_arguments(parser: argparse.ArgumentParser) -> None:
    from kvstore.control.cli import add_ctl_arguments

    add_ctl_arguments(parser)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from kvstore.control.cli import add_serve_arguments

    add_serve_arguments(parser)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """``drivers`` takes no arguments."""


_COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "demo": (
        "serve a shared-prefix workload with a local transformers model, with and "
        "without the cache, and compare time to first token",
        _demo_arguments,
        _cmd_demo,
    ),
    "drivers": ("list every registered driver", _no_arguments, _cmd_drivers),
    "conformance": (
        "run the conformance suite against a driver URL",
        _conformance_arguments,
        _cmd_conformance,
    ),
    "bench": (
        "measure store/retrieve throughput against raw baselines",
        _bench_arguments,
        _cmd_bench,
    ),
    "soak": (
        "run the store in steady state (full, shared tiers, faults) and check its promises",
        _soak_arguments,
        _cmd_soak,
    ),
    "ctl": (
        "control a running store over its HTTP control API (docs/control-api.md)",
        _ctl_arguments,
        _cmd_ctl,
    ),
    "serve": ("open a store and serve its HTTP control API", _serve_arguments, _cmd_serve),
    "node": (
        "run the node service: one store serving every process on this host (docs/node.md)",
        _node_arguments,
        _cmd_node,
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are loaded (none when ``command`` is None).

    Some commands' arguments live in modules that import torch; loading just the
    one being run keeps ``kvstore --help``, ``kvstore ctl`` and ``kvstore drivers``
    quick to start.
    """
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (summary, add_arguments, func) in _COMMANDS.items():
        sub = commands.add_parser(name, help=summary)
        if command == name:
            add_arguments(sub)
        sub.set_defaults(func=func)
    return parser


def _command_of(words: Sequence[str]) -> str | None:
    """The subcommand named in ``words``, if any (the first word that is not an option)."""
    for word in words:
        if not word.startswith("-"):
            return word if word in _COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Ctrl-C ends any command with exit code 130."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        sys.stderr.write("kvstore: interrupted\n")
        return INTERRUPTED_EXIT_CODE


def _run(argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, passthrough = words[:cut], words[cut + 1 :]
    parser = build_parser(_command_of(words))
    args = parser.parse_args(words)
    if passthrough:
        if not hasattr(args, "pytest_args"):
            parser.error("arguments after -- are only taken by 'conformance'")
        args.pytest_args = [*args.pytest_args, *passthrough]
    try:
        code: int = args.func(args)
    except KVStoreError as exc:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
