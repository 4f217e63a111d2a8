"""``kvstore ctl ...`` (a client of a control server) and ``kvstore serve`` (run one).

Both import the HTTP stack (httpx, FastAPI, uvicorn) only when they run, so
building the ``kvstore`` parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from kvstore.config_url import validation_problems
from kvstore.errors import ConfigError, InvalidArgumentError

if TYPE_CHECKING:
    from kvstore.config import StoreConfig
    from kvstore.control.client import ControlClient
    from kvstore.control.models import JobInfo
    from kvstore.keys import Namespace

ENDPOINT_ENV = "KVSTORE_CONTROL_ENDPOINT"
TOKEN_ENV = "KVSTORE_CONTROL_TOKEN"
DEFAULT_ENDPOINT = "http://127.0.0.1:8740"


# ------------------------------------------------------------------- kvstore ctl


def add_ctl_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ctl`` subcommands, each taking the connection options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT),
        help=f"control server URL (default ${ENDPOINT_ENV} or {DEFAULT_ENDPOINT})",
    )
    common.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        metavar="VAR",
        help=f"environment variable holding the bearer token (default {TOKEN_ENV})",
    )
    common.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    common.add_argument("--cacert", type=Path, help="CA certificate that signed the server's")
    common.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    common.add_argument("--key", type=Path, help="client certificate key (mTLS)")
    common.add_argument("--json", action="store_true", help="print the reply as JSON")
    common.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")

    prompt = argparse.ArgumentParser(add_help=False)
    given = prompt.add_mutually_exclusive_group()
    given.add_argument("--tokens", help="comma-separated token ids")
    given.add_argument("--tokens-file", type=Path, help="token ids: a JSON list or whitespace")
    given.add_argument("--text", help="text, tokenized with the model's tokenizer on the server")
    prompt.add_argument("--model", help="namespace (model) name; default the store's")
    prompt.add_argument("--tenant", help="act for this tenant (admin token only)")

    scoped = argparse.ArgumentParser(add_help=False)
    scoped.add_argument("--scope", choices=("namespace", "tenant", "all"))
    scoped.add_argument("--no-wait", action="store_true", help="print the job and return")

    commands = parser.add_subparsers(dest="ctl_command", required=True)
    lookup = commands.add_parser(
        "lookup", parents=[common, prompt], help="cached prefix length and tier per chunk"
    )
    lookup.set_defaults(ctl=_lookup)
    pin = commands.add_parser("pin", parents=[common, prompt], help="pin a prompt's prefix")
    pin.add_argument("--ttl", type=float, help="drop the pin after this many seconds")
    pin.set_defaults(ctl=_pin)
    unpin = commands.add_parser("unpin", parents=[common, prompt], help="unpin a prompt")
    unpin.set_defaults(ctl=_unpin)
    clear = commands.add_parser(
        "clear", parents=[common, scoped], help="delete a scope's chunks (a job)"
    )
    clear.add_argument("--tier", help="only this tier (default every tier)")
    clear.add_argument("--model", help="namespace (model) name; default the store's")
    clear.add_argument("--tenant", help="act for this tenant (admin token only)")
    clear.set_defaults(ctl=_clear)
    move = commands.add_parser(
        "move", parents=[common, prompt, scoped], help="copy or migrate chunks between tiers"
    )
    move.add_argument("--from", dest="source", required=True, help="source tier name")
    move.add_argument("--to", dest="target", required=True, help="target tier name")
    move.add_argument("--migrate", action="store_true", help="delete from the source too")
    move.set_defaults(ctl=_move)
    compress = commands.add_parser(
        "compress", parents=[common, prompt, scoped], help="re-encode a tier's chunks"
    )
    compress.add_argument("--tier", required=True, help="tier name")
    compress.add_argument("--codecs", required=True, help="lossless codec stack, e.g. zstd:9")
    compress.set_defaults(ctl=_compress)
    health = commands.add_parser("health", parents=[common], help="probe every tier")
    health.add_argument("--probe-timeout", type=float, help="seconds per tier probe")
    health.set_defaults(ctl=_health)
    stats = commands.add_parser("stats", parents=[common], help="usage and counters")
    stats.add_argument("--tenant", help="a tenant's scope (admin token only)")
    stats.set_defaults(ctl=_stats)
    jobs = commands.add_parser("jobs", parents=[common], help="list jobs, or show one")
    jobs.add_argument("job_id", nargs="?", help="a job id")
    jobs.add_argument("--cancel", action="store_true", help="cancel the job")
    jobs.add_argument("--wait", action="store_true", help="follow the job until it ends")
    jobs.set_defaults(ctl=_jobs)


def run_ctl(args: argparse.Namespace) -> int:
    from kvstore.control import http_module

    ControlClient = http_module("kvstore.control.client").ControlClient
    token = _token(args)
    with ControlClient(
        args.endpoint,
        token=token,
        cacert=args.cacert,
        cert=args.cert,
        key=args.key,
        timeout_s=args.timeout,
    ) as client:
        code: int = args.ctl(client, args, Console())
        return code


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read token file {args.token_file}: {exc}") from None
    return os.environ.get(args.token_env) or None


def _prompt(args: argparse.Namespace, *, required: bool = True) -> dict[str, Any]:
    """The prompt fields of a request from ``--tokens``, ``--tokens-file`` or ``--text``."""
    fields: dict[str, Any] = {"model": args.model, "tenant": args.tenant}
    if args.tokens is not None:
        fields["tokens"] = _parse_tokens(args.tokens.replace(",", " "))
    elif args.tokens_file is not None:
        try:
            text = (
                sys.stdin.read() if str(args.tokens_file) == "-" else args.tokens_file.read_text()
            )
        except OSError as exc:
            raise ConfigError(f"cannot read {args.tokens_file}: {exc}") from None
        fields["tokens"] = _parse_tokens(text)
    elif args.text is not None:
        fields["text"] = args.text
    elif required:
        raise InvalidArgumentError("give the prompt with --tokens, --tokens-file or --text")
    return fields


def _parse_tokens(text: str) -> list[int]:
    text = text.strip()
    try:
        value = json.loads(text) if text.startswith("[") else [int(t) for t in text.split()]
    except ValueError as exc:
        raise InvalidArgumentError(f"token ids must be integers: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
        raise InvalidArgumentError("token ids must be a list of integers")
    return value


def _request(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise InvalidArgumentError(validation_problems(exc)) from None


def _print(console: Console, args: argparse.Namespace, reply: BaseModel) -> None:
    if args.json:
        console.print_json(reply.model_dump_json())


def _lookup(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    from kvstore.control.models import LookupRequest

    reply = client.lookup(_request(LookupRequest, _prompt(args)))
    if args.json:
        _print(console, args, reply)
        return 0
    runs: list[list[Any]] = []
    for tier in reply.chunks:
        if runs and runs[-1][0] == tier:
            runs[-1][1] += 1
        else:
            runs.append([tier, 1])
    where = ", ".join(f"{tier} x{count}" for tier, count in runs) or "-"
    console.print(
        f"{reply.model}: {reply.tokens} tokens cached "
        f"({len(reply.chunks)} chunks of {reply.chunk_tokens}): {where}"
    )
    return 0


def _pin(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    from kvstore.control.models import PinRequest

    reply = client.pin(_request(PinRequest, {**_prompt(args), "ttl_s": args.ttl}))
    if not args.json:
        console.print(f"pinned {reply.chunks} chunks")
    _print(console, args, reply)
    return 0


def _unpin(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    from kvstore.control.models import UnpinRequest

    reply = client.unpin(_request(UnpinRequest, _prompt(args)))
    if not args.json:
        console.print(f"unpinned {reply.chunks} chunks")
    _print(console, args, reply)
    return 0


def _clear(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    from kvstore.control.models import ClearRequest

    fields = {"tier": args.tier, "scope": args.scope, "model": args.model, "tenant": args.tenant}
    return _follow(client, args, console, client.clear(_request(ClearRequest, fields)))


def _move(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    from kvstore.control.models import MoveRequest

    fields = {
        **_prompt(args, required=False),
        "source": args.source,
        "target": args.target,
        "mode": "migrate" if args.migrate else "copy",
        "scope": args.scope,
    }
    return _follow(client, args, console, client.move(_request(MoveRequest, fields)))


def _compress(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    from kvstore.control.models import CompressRequest

    fields = {
        **_prompt(args, required=False),
        "tier": args.tier,
        "codecs": args.codecs,
        "scope": args.scope,
    }
    return _follow(client, args, console, client.compress(_request(CompressRequest, fields)))


def _health(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    reply = client.health(args.probe_timeout)
    if args.json:
        _print(console, args, reply)
    else:
        table = Table(title="tier health")
        for column in ("tier", "reachable", "latency", "error rate", "used", "capacity", "error"):
            table.add_column(column)
        for tier in reply.tiers:
            table.add_row(
                tier.name,
                "[green]yes[/green]" if tier.reachable else "[red]no[/red]",
                f"{tier.latency_ms:.1f} ms",
                f"{tier.error_rate:.2%}",
                _size(tier.used_bytes),
                _size(tier.capacity_bytes),
                tier.error or "",
            )
        console.print(table)
    return 0 if reply.ok else 1


def _stats(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    reply = client.stats(args.tenant)
    if args.json:
        _print(console, args, reply)
        return 0
    table = Table(title=f"stats (scope: {reply.scope})")
    for column in ("tier", "entries", "used", "capacity", "pinned", "hits", "misses"):
        table.add_column(column)
    for tier in reply.tiers:
        table.add_row(
            tier.name,
            str(tier.entries),
            _size(tier.used_bytes),
            _size(tier.capacity_bytes),
            str(tier.pinned),
            "" if tier.hits is None else str(tier.hits),
            "" if tier.misses is None else str(tier.misses),
        )
    console.print(table)
    counters = reply.counters
    console.print(
        f"lookups {counters.lookups}: {counters.hit_tokens} of {counters.lookup_tokens} tokens "
        f"cached; retrieves {counters.retrieves}: {counters.retrieved_tokens} tokens loaded"
    )
    return 0


def _jobs(client: ControlClient, args: argparse.Namespace, console: Console) -> int:
    if args.job_id is None:
        listing = client.jobs()
        if args.json:
            _print(console, args, listing)
            return 0
        table = Table(title="jobs")
        for column in ("id", "kind", "state", "chunks", "tenant"):
            table.add_column(column)
        for job in listing.jobs:
            table.add_row(
                job.id,
                job.kind,
                job.state,
                f"{job.done_chunks}/{job.total_chunks}",
                job.tenant or "",
            )
        console.print(table)
        return 0
    info = client.cancel(args.job_id) if args.cancel else client.job(args.job_id)
    args.no_wait = not args.wait
    return _follow(client, args, console, info)


def _follow(client: ControlClient, args: argparse.Namespace, console: Console, job: JobInfo) -> int:
    """Print a job, or follow it with a progress bar until it ends (Ctrl-C cancels it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not args.no_wait and job.state == "running":
        try:
            if args.json:
                job = client.wait(job.id)
            else:
                with Progress(
                    TextColumn(f"{job.kind} {job.id[:8]}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("chunks"),
                    console=console,
                    transient=True,
                ) as bar:
                    task = bar.add_task(job.kind, total=None)

                    def show(info: JobInfo) -> None:
                        bar.update(
                            task, completed=info.done_chunks, total=info.total_chunks or None
                        )

                    job = client.wait(job.id, on_progress=show)
        except KeyboardInterrupt:
            job = client.cancel(job.id)
            console.print(f"job {job.id} cancelled ({job.state})")
            return 130
    if args.json:
        _print(console, args, job)
    else:
        result = ", ".join(f"{name} {value}" for name, value in (job.result or {}).items())
        error = f"{job.error.error}: {job.error.message}" if job.error else ""
        console.print(f"job {job.id} ({job.kind}): {job.state} {result or error}".rstrip())
    return {"failed": 1, "cancelled": 3}.get(job.state, 0)


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"


# ----------------------------------------------------------------- kvstore serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="store config YAML")
    parser.add_argument(
        "--namespace",
        action="append",
        type=Path,
        required=True,
        metavar="FILE",
        help="namespace YAML (model, revision, layout, ...); repeat for more; the first is "
        "the store's",
    )
    parser.add_argument("--host", help="listen address (default: the config's, or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (0: any free port)")


def load_namespace(path: Path, config: StoreConfig) -> tuple[str, Namespace]:
    """A namespace from YAML: ``model``, ``revision``, ``layout`` (``num_layers``,
    ``num_kv_heads``, ``head_dim``, ``dtype``, ``mla``), optionally ``name``,
    ``tp_rank``, ``tp_size``, ``codec``, ``tenant``; ``chunk_tokens`` and
    ``tenant`` default to the store config's."""
    from kvstore.keys import Namespace

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read namespace {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"namespace {path} must be a mapping")
    name = data.pop("name", None)
    data.setdefault("chunk_tokens", config.chunk_tokens)
    data.setdefault("tenant", config.tenant)
    data.setdefault("codec", config.lossy_codec)
    try:
        namespace = TypeAdapter(Namespace).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid namespace in {path}: {validation_problems(exc)}") from None
    return str(name or namespace.model), namespace


def run_serve(args: argparse.Namespace) -> int:
    """Open the store, serve its control API until SIGINT/SIGTERM, close the store."""
    from kvstore.config import ControlConfig, StoreConfig

    config = StoreConfig.from_yaml(args.config)
    overrides = {
        key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None
    }
    base = (config.control or ControlConfig()).model_dump()
    try:
        control = ControlConfig.model_validate({**base, **overrides})
    except ValidationError as exc:
        raise ConfigError(f"invalid control settings: {validation_problems(exc)}") from None
    namespaces = [load_namespace(path, config) for path in args.namespace]
    return asyncio.run(_serve(config, control, namespaces))


async def _serve(
    config: StoreConfig, control: Any, namespaces: Sequence[tuple[str, Namespace]]
) -> int:
    from kvstore.control import http_module
    from kvstore.store import AsyncKVStore

    serve_control = http_module("kvstore.control.server").serve_control

    store = await AsyncKVStore.open(config, namespaces[0][1])
    try:
        server = await serve_control(store, control, namespaces=dict(namespaces))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"kvstore control server listening on {server.url}", flush=True)
        waiting = asyncio.ensure_future(stop.wait())
        serving = asyncio.ensure_future(server.wait())
        done, _ = await asyncio.wait([waiting, serving], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        await server.aclose()
        if serving in done:
            serving.result()
    finally:
        await store.close()
    return 0
