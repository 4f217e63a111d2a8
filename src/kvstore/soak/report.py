"""The soak's figures and checks, computed from the workers' journals and the runner's samples.

Each check is one promise of the store in steady state (docs/benchmarks.md):

- wrong KV: chunks served whose bytes differ from the recomputed KV (must be 0);
- stores accounted: every chunk of every store is written, already cached or
  failed as ``store`` reported, or was in flight in a worker killed with
  SIGKILL;
- full tiers keep caching: at most 1% of the new chunks ``store`` tried to
  write to the first tier (never faulted) failed;
- no crash: no store call raised, no worker hung at exit, and no tier
  counted an internal error (a bug, served as a miss);
- opens with a tier down: every worker opened its store, redis down or not;
- hit rate: at least 90% of an ideal LRU's of the same capacities, replayed
  on the same trace (``kvstore.soak.ideal``);
- latency: every retrieve and store returned within ``timeout_s`` + 0.5 s;
- memory: each worker's RSS in the last quarter of the run is within 10% of
  its RSS just after warm-up;
- files: each nvme directory holds as many chunk files as the store counts.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.soak.ideal import TraceRequest, replay
from kvstore.soak.workload import chunk_ids

LATENCY_SLACK_S = 0.5
FAILED_STORES = 0.01
HIT_RATE_FRACTION = 0.9
MEMORY_GROWTH = 0.10
MIB = 1 << 20


@dataclass
class Incarnation:
    """One run of one worker process: its journal, how it ended, its RSS samples."""

    worker: int
    number: int
    journal: Path
    killed: bool = False
    exit_code: int | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)

    def opened(self) -> bool:
        """Whether this run opened its store."""
        return any(event["event"] == "open" for event in self.events())

    def closed(self) -> bool:
        """Whether this run got to close its store (its journal has the final counters)."""
        return any(event["event"] == "final" for event in self.events())

    def events(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        lines = self.journal.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]


@dataclass(frozen=True)
class Check:
    name: str
    measured: str
    promise: str
    held: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": self.measured,
            "promise": self.promise,
            "held": self.held,
        }


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank; 0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


@dataclass
class SoakFigures:
    """Everything the soak measured, summed over workers and incarnations."""

    requests: int = 0
    completed: int = 0
    attempted: int = 0
    written: int = 0
    already: int = 0
    failed: int = 0
    interrupted: int = 0
    unaccounted: int = 0
    dropped: int = 0
    tier_errors: int = 0
    internal_errors: int = 0
    wrong: int = 0
    hit: int = 0
    requested: int = 0
    ideal_hit_rate: float = 0.0
    working_set_chunks: int = 0
    latencies: list[float] = field(default_factory=list)
    calls: list[tuple[float, float]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    open_failures: list[str] = field(default_factory=list)
    files: dict[int, int] = field(default_factory=dict)
    counted: dict[int, int | None] = field(default_factory=dict)
    driver_counted: dict[int, int | None] = field(default_factory=dict)
    shards: dict[int, int] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    flush_s: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hit / self.requested if self.requested else 0.0


def _memory(incarnation: Incarnation, warm_at: float, end_at: float) -> dict[str, float] | None:
    """RSS just after warm-up (median of the next quarter of the run) and in the
    last quarter, for an incarnation that lived through both."""
    quarter = (end_at - warm_at) / 4
    early = [rss for t, rss in incarnation.rss if warm_at <= t < warm_at + quarter]
    late = [rss for t, rss in incarnation.rss if t >= end_at - quarter]
    if not early or not late:
        return None
    warm, last = statistics.median(early), statistics.median(late)
    return {
        "warm_mib": warm / MIB,
        "end_mib": last / MIB,
        "max_mib": max(rss for _, rss in incarnation.rss) / MIB,
        "growth": (last - warm) / warm,
    }


def figures(
    incarnations: Sequence[Incarnation],
    *,
    private_chunks: int,
    shared_chunks: int,
    warm_at: float,
    end_at: float,
    files: dict[int, tuple[int, int]],
) -> SoakFigures:
    """Sum the journals; replay the trace through the ideal LRU. ``files``: per
    worker, the chunk files and the shard directories holding them."""
    result = SoakFigures()
    trace: list[tuple[float, TraceRequest]] = []
    final: dict[int, tuple[int, dict[str, Any]]] = {}
    for incarnation in incarnations:
        events = incarnation.events()
        requests = {event["n"]: event for event in events if event["event"] == "req"}
        done = {event["n"]: event for event in events if event["event"] == "done"}
        for n, request in requests.items():
            ids = chunk_ids(
                request["prefix"],
                request["prefix_chunks"],
                request["session"],
                request["session_chunks"],
            )
            result.requests += 1
            result.attempted += len(ids)
            outcome = done.get(n)
            trace.append((request["t"], TraceRequest(incarnation.worker, ids, outcome is not None)))
            if outcome is None:
                if incarnation.killed or any(e["event"] == "crash" for e in events):
                    result.interrupted += len(ids)
                else:
                    result.unaccounted += len(ids)
                continue
            result.completed += 1
            result.written += outcome["written"]
            result.already += outcome["already"]
            result.failed += outcome["failed"]
            stored = outcome["written"] + outcome["already"] + outcome["failed"]
            if outcome["stored"] != len(ids) or stored != len(ids):
                result.unaccounted += abs(len(ids) - stored)
            result.wrong += outcome["wrong"]
            result.hit += outcome["hit"]
            result.requested += len(ids)
            result.latencies += [outcome["retrieve_s"], outcome["store_s"]]
            result.calls += [
                (outcome["t"] - outcome["store_s"], outcome["retrieve_s"]),
                (outcome["t"], outcome["store_s"]),
            ]
        for event in events:
            if event["event"] == "crash":
                result.crashes.append(event["error"])
            elif event["event"] == "open_failed":
                result.open_failures.append(event["error"])
            elif event["event"] == "final":
                result.flush_s.append(event["flush_s"])
                for tier in event["tiers"]:
                    stats = tier["stats"]
                    result.dropped += stats["dropped_writes"] + stats.get("dropped_writebacks", 0)
                    result.tier_errors += sum(stats["errors"].values())
                    result.internal_errors += stats.get("internal_errors", 0)
                if incarnation.number >= final.get(incarnation.worker, (-1, {}))[0]:
                    final[incarnation.worker] = (incarnation.number, event)
        memory = _memory(incarnation, warm_at, end_at)
        if memory is not None:
            result.memory[f"{incarnation.worker}.{incarnation.number}"] = memory
    trace.sort(key=lambda item: item[0])
    result.working_set_chunks = len({name for _, request in trace for name in request.chunk_ids})
    ideal = replay((request for _, request in trace), private_chunks, shared_chunks)
    result.ideal_hit_rate = ideal.hit_rate
    for worker, (count, shards) in files.items():
        result.files[worker] = count
        result.shards[worker] = shards
        tiers = final.get(worker, (0, {"tiers": []}))[1]["tiers"]
        nvme = [tier for tier in tiers if tier["scheme"] == "nvme"]
        result.counted[worker] = nvme[0]["entries"] if nvme else None
        result.driver_counted[worker] = nvme[0]["driver_entries"] if nvme else None
    return result


def slowest_call(result: SoakFigures, start: float, end: float) -> float:
    """The longest call (wall-clock times) that overlapped ``[start, end]``."""
    overlapping = [
        seconds for ended, seconds in result.calls if ended >= start and ended - seconds <= end
    ]
    return max(overlapping, default=0.0)


def checks(result: SoakFigures, timeout_s: float, hung: int) -> list[Check]:
    """The soak's promises, each measured (module docstring)."""
    bound = timeout_s + LATENCY_SLACK_S
    slowest = max(result.latencies, default=0.0)
    over = sum(1 for latency in result.latencies if latency > bound)
    accounted = result.written + result.already + result.failed + result.interrupted
    growth = max((m["growth"] for m in result.memory.values()), default=0.0)
    mismatched = [w for w in result.files if result.files[w] != result.counted[w]]
    files = ", ".join(
        f"w{w}: {result.files[w]} files / {result.counted[w]} counted "
        f"({result.shards[w]} shard dirs)"
        for w in result.files
    )
    return [
        Check(
            "wrong KV served",
            f"{result.wrong} of {result.hit} chunks served",
            "0",
            result.wrong == 0,
        ),
        Check(
            "stores accounted",
            f"{result.attempted} chunks = {result.written} written + {result.already} cached "
            f"+ {result.failed} failed + {result.interrupted} in killed workers"
            f" ({result.unaccounted} unaccounted); {result.dropped} background copies dropped",
            "every chunk",
            result.unaccounted == 0 and accounted == result.attempted,
        ),
        Check(
            "full tiers keep caching",
            f"{result.failed} of {result.written + result.failed} new chunks failed",
            f"<= {FAILED_STORES:.0%}",
            result.failed <= FAILED_STORES * (result.written + result.failed),
        ),
        Check(
            "no crash",
            f"{len(result.crashes)} crashed, {hung} hung at exit, "
            f"{result.internal_errors} internal errors",
            "0",
            not result.crashes and hung == 0 and result.internal_errors == 0,
        ),
        Check(
            "opens with a tier down",
            f"{len(result.open_failures)} failed to open",
            "0",
            not result.open_failures,
        ),
        Check(
            "hit rate",
            f"{result.hit_rate:.3f} vs ideal LRU {result.ideal_hit_rate:.3f} "
            f"(working set {result.working_set_chunks} chunks)",
            f">= {HIT_RATE_FRACTION:.0%} of ideal",
            result.hit_rate >= HIT_RATE_FRACTION * result.ideal_hit_rate,
        ),
        Check(
            "call latency",
            f"p50 {percentile(result.latencies, 0.5) * 1e3:.1f} ms, "
            f"p99 {percentile(result.latencies, 0.99) * 1e3:.1f} ms, max {slowest:.2f} s "
            f"({over} of {len(result.latencies)} over)",
            f"max <= timeout_s + {LATENCY_SLACK_S} = {bound:.1f} s",
            slowest <= bound,
        ),
        Check(
            "memory flat",
            ", ".join(
                f"w{name}: {m['warm_mib']:.0f} -> {m['end_mib']:.0f} MiB"
                for name, m in result.memory.items()
            )
            or "no worker lived from warm-up to the end",
            f"RSS growth <= {MEMORY_GROWTH:.0%} after warm-up",
            bool(result.memory) and growth <= MEMORY_GROWTH,
        ),
        Check(
            "files vs entries",
            files or "no nvme tier",
            "equal",
            not mismatched,
        ),
    ]
