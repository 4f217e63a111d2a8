"""The run behind ``kvstore demo``: build, serve the workload twice, report."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvstore.config import StoreConfig
from kvstore.connectors.transformers import (
    TransformersConnector,
    model_layout,
    use_aligned_attention,
)
from kvstore.demo.model import build_model, build_tokenizer, parameter_count
from kvstore.demo.presets import PRESETS
from kvstore.demo.workload import CLASSES, DOC_NEXT, Workload, build_workload
from kvstore.errors import InvalidArgumentError
from kvstore.layout import KVLayout
from kvstore.results import StoreStats, TierSnapshot
from kvstore.sizes import format_size, human_size


@dataclass(frozen=True)
class RequestResult:
    """One request served without and with the cache."""

    index: int
    kind: str
    stream: str
    prompt_tokens: int
    cached_tokens: int
    ttft_without_s: float
    ttft_with_s: float
    restore_s: float
    tokens_identical: bool
    logits_identical: bool


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kvstore-demo``, else ``~/.cache/kvstore-demo``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvstore-demo"


def _mib_ceil(nbytes: int) -> str:
    return f"{-(-nbytes // (1 << 20))}MiB"


DEMO_CHUNK_TOKENS = 128
"""Tokens per chunk of the demo's tiers (``--tier`` and the default): half the
store's default, so a hit recomputes half as many tokens after the last whole
chunk (``--config`` sets its own)."""
_CPU_PAGE = 256 << 10
"""The cpu driver's default page size: each chunk occupies whole pages."""
_HEADER_ROOM = 4096
"""More than a raw chunk's header takes."""


def store_config(args: argparse.Namespace, layout: KVLayout) -> StoreConfig:
    """The store the demo uses: ``--config``, ``--tier`` URLs, or cpu + nvme.

    A ``--tier`` URL without a capacity of its own (Redis, S3, ...) may hold
    16 contexts' KV, like the default nvme tier.

    The default cpu tier holds four contexts' chunks, about what the default
    mix keeps live: as chat sessions grow it evicts, and some hits come from
    the nvme tier below it. Its arena has the whole pages of that many chunks
    (the store counts each chunk's pages), and is page-locked only for a CUDA
    model (pinning speeds up copies to a GPU and nothing else).
    """
    if args.config and args.tier:
        raise InvalidArgumentError("give --config or --tier, not both")
    if args.config:
        return StoreConfig.from_yaml(args.config)
    room = max(16 * args.context * layout.nbytes(1), 256 << 20)
    if args.tier:
        return StoreConfig.from_urls(
            *(
                url if "capacity=" in urlsplit(url).query else {"url": url, "max_bytes": room}
                for url in args.tier
            ),
            chunk_tokens=DEMO_CHUNK_TOKENS,
        )
    directory = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    chunk_bytes = layout.nbytes(DEMO_CHUNK_TOKENS)
    chunks = -(-4 * args.context // DEMO_CHUNK_TOKENS)
    pages = -(-(chunk_bytes + _HEADER_ROOM) // _CPU_PAGE)
    pin = "auto" if str(args.device).startswith("cuda") else "none"
    return StoreConfig.from_urls(
        f"cpu://?capacity={format_size(chunks * pages * _CPU_PAGE)}&pin={pin}",
        f"nvme://{directory.resolve()}?capacity={_mib_ceil(room)}",
        chunk_tokens=DEMO_CHUNK_TOKENS,
    )


def run(args: argparse.Namespace) -> int:
    """Build, serve the workload twice, report; 0 when both runs gave the same tokens."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    preset = PRESETS[args.model_size]
    dtype = getattr(torch, args.dtype)
    tokenizer = build_tokenizer(preset.vocab_size, seed=args.seed)
    workload = build_workload(
        tokenizer,
        context=args.context,
        requests=args.requests,
        new_tokens=args.new_tokens,
        seed=args.seed,
    )
    if not console.is_terminal:
        console.print("building the model")
    with console.status("building the model"):
        model = build_model(
            preset, max_positions=args.context, dtype=dtype, device=args.device, seed=args.seed
        )
    config = store_config(args, model_layout(model))
    if args.attention == "aligned":
        use_aligned_attention(model, block_tokens=config.chunk_tokens)
    else:
        model.set_attn_implementation(args.attention)
    console.print(
        f"model: Llama, {args.model_size} ({_millions(parameter_count(model))} parameters, "
        f"{preset.num_layers} layers, {preset.num_kv_heads} KV heads), {args.dtype}, "
        f"{args.attention} attention, on {args.device}, {torch.get_num_threads()} threads"
    )
    console.print(
        "tiers: "
        + ", ".join(
            f"{tier.url} (holding {human_size(tier.max_bytes)})" if tier.max_bytes else tier.url
            for tier in config.tiers
        )
    )

    with TransformersConnector.open(model, config, name=f"kvstore-demo/{args.model_size}") as conn:
        if not args.keep_cache:
            conn.store.clear(scope="namespace")
        # One untimed pass through every code path (model, store, retrieve), on a
        # prompt whose first token no request starts with, so its chunks share
        # no key with the workload's and evicting them leaves those alone.
        warm_up = [workload.end_token, *workload.system_prompt * 3]
        conn.generate(warm_up, 2, reuse=False, save=False)
        conn.generate(warm_up, 2)
        conn.generate(warm_up, 2)
        conn.store.evict(warm_up)
        results = _serve(conn, workload, args.new_tokens, console)
        conn.store.flush()
        stats = conn.store.stats()

    _report(console, results, stats)
    same = all(result.tokens_identical for result in results)
    if args.json:
        payload: dict[str, Any] = {
            "model": {
                "size": args.model_size,
                "parameters": parameter_count(model),
                "dtype": args.dtype,
                "attention": args.attention,
                "device": args.device,
            },
            "context": args.context,
            "new_tokens": args.new_tokens,
            "tiers": [_tier_json(tier) for tier in stats.tiers],
            "classes": _classes(results),
            "requests": [asdict(result) for result in results],
            "token_hit_rate": _hit_rate(results),
            "tokens_identical": same,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if not same:
        console.print("[red]FAILED[/red]: the cache changed the generated tokens")
        return 1
    console.print("[green]ok[/green]: identical tokens with and without the cache")
    return 0


def _serve(
    conn: TransformersConnector, workload: Workload, new_tokens: int, console: Console
) -> list[RequestResult]:
    """Serve every request twice: a plain full prefill, then through the connector.

    A chat session's next prompt appends the plain run's answer, so both runs
    see the same prompts even if their answers were to differ.
    """
    history: dict[str, list[int]] = {}
    results: list[RequestResult] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("requests", total=len(workload.requests))
        for index, request in enumerate(workload):
            base = (
                list(workload.system_prompt) if request.starts_stream else history[request.stream]
            )
            prompt = [*base, *request.tokens]
            progress.update(
                task, description=f"{request.kind} ({request.stream}, {len(prompt)} tokens)"
            )
            plain = conn.generate(prompt, new_tokens, reuse=False, save=False)
            cached = conn.generate(prompt, new_tokens)
            history[request.stream] = [*prompt, *plain.tokens, workload.end_token]
            results.append(
                RequestResult(
                    index=index,
                    kind=request.kind,
                    stream=request.stream,
                    prompt_tokens=len(prompt),
                    cached_tokens=cached.prefill.cached_tokens,
                    ttft_without_s=plain.first_token_s,
                    ttft_with_s=cached.first_token_s,
                    restore_s=cached.prefill.restore_s,
                    tokens_identical=plain.tokens == cached.tokens,
                    logits_identical=bool(torch.equal(plain.prefill.logits, cached.prefill.logits)),
                )
            )
            progress.advance(task)
            if not console.is_terminal:
                console.print(_progress_line(results[-1], len(workload.requests)), soft_wrap=True)
    return results


def _progress_line(result: RequestResult, total: int) -> str:
    """One request's outcome, for output that is not a terminal (no live bar there)."""
    return (
        f"request {result.index + 1}/{total}: {result.kind} ({result.stream}, "
        f"{result.prompt_tokens:,} tokens, {result.cached_tokens:,} from the cache): "
        f"first token in {result.ttft_with_s * 1000:,.0f} ms with the cache, "
        f"{result.ttft_without_s * 1000:,.0f} ms without"
    )


def _millions(count: int) -> str:
    """A parameter count in millions, with a decimal below ten (0.3M, 4.2M, 32M)."""
    millions = count / 1e6
    return f"{millions:.1f}M" if millions < 10 else f"{millions:.0f}M"


def _verdict(row: dict[str, Any]) -> str:
    """Whether the cache made a class's first token faster, said only when it did."""
    if row["cached_tokens"] == 0:
        return "nothing came from the cache"
    if row["speedup"] < 1:
        return f"{row['speedup']:.2f}x, slower with the cache"
    return f"[bold]{row['speedup']:.1f}x[/bold] faster"


def _classes(results: list[RequestResult]) -> list[dict[str, Any]]:
    """Per request class: counts, mean sizes, mean TTFT both ways and the speedup."""
    rows = []
    for kind in CLASSES:
        members = [result for result in results if result.kind == kind]
        if not members:
            continue
        without = statistics.fmean(result.ttft_without_s for result in members)
        with_cache = statistics.fmean(result.ttft_with_s for result in members)
        rows.append(
            {
                "kind": kind,
                "requests": len(members),
                "prompt_tokens": round(statistics.fmean(r.prompt_tokens for r in members)),
                "cached_tokens": round(statistics.fmean(r.cached_tokens for r in members)),
                "ttft_without_s": without,
                "ttft_with_s": with_cache,
                "speedup": without / with_cache,
                "tokens_identical": sum(r.tokens_identical for r in members),
                "logits_identical": sum(r.logits_identical for r in members),
            }
        )
    return rows


def _hit_rate(results: list[RequestResult]) -> float:
    """Prompt tokens served from the cache, over all prompt tokens."""
    return sum(r.cached_tokens for r in results) / sum(r.prompt_tokens for r in results)


def _tier_json(tier: TierSnapshot) -> dict[str, Any]:
    return {
        "name": tier.name,
        "url": tier.url,
        "hits": tier.stats.hits,
        "misses": tier.stats.misses,
        "bytes_read": tier.stats.bytes_read,
        "bytes_written": tier.stats.bytes_written,
        "entries": tier.entries,
        "used_bytes": tier.used_bytes,
        "capacity_bytes": tier.capacity_bytes,
        "evictions": tier.stats.evictions,
    }


def _report(console: Console, results: list[RequestResult], stats: StoreStats) -> None:
    """Print TTFT per class, hits and bytes per tier, and the headline ratio."""
    table = Table(title="time to first token, per request class")
    table.add_column("class", no_wrap=True)
    for column in ("requests", "prompt tokens", "cached tokens", "TTFT without", "TTFT with"):
        table.add_column(column, justify="right")
    for column in ("speedup", "same tokens"):
        table.add_column(column, justify="right")
    for row in _classes(results):
        table.add_row(
            row["kind"],
            str(row["requests"]),
            f"{row['prompt_tokens']:,}",
            f"{row['cached_tokens']:,}",
            f"{row['ttft_without_s'] * 1000:,.0f} ms",
            f"{row['ttft_with_s'] * 1000:,.0f} ms",
            f"{row['speedup']:.1f}x",
            f"{row['tokens_identical']}/{row['requests']}",
        )
    console.print(table)

    hits = sum(tier.stats.hits for tier in stats.tiers)
    tiers = Table(title=f"tiers (prompt tokens from the cache: {_hit_rate(results):.0%})")
    tiers.add_column("tier")
    for column in ("chunk hits", "share", "read", "written", "held", "evictions"):
        tiers.add_column(column, justify="right")
    for tier in stats.tiers:
        tiers.add_row(
            tier.name,
            str(tier.stats.hits),
            f"{tier.stats.hits / hits:.0%}" if hits else "-",
            human_size(tier.stats.bytes_read),
            human_size(tier.stats.bytes_written),
            f"{human_size(tier.used_bytes)} of {human_size(tier.capacity_bytes)}",
            str(tier.stats.evictions),
        )
    console.print(tiers)

    same_logits = sum(r.logits_identical for r in results)
    console.print(
        f"next-token logits bit-identical with and without the cache: {same_logits}/{len(results)}"
    )
    for row in _classes(results):
        if row["kind"] == DOC_NEXT:
            console.print(
                f"full-prefix hit at {row['prompt_tokens']:,} tokens: first token in "
                f"{row['ttft_with_s'] * 1000:,.0f} ms instead of "
                f"{row['ttft_without_s'] * 1000:,.0f} ms: {_verdict(row)}"
            )
