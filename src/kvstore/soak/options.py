"""The soak's options (``kvstore soak --help``), parsed without importing torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from kvstore.sizes import parse_size

FAULTS = (
    "pause-redis",
    "kill-redis",
    "fill-disk",
    "corrupt-files",
    "kill-worker",
    "restart-in-outage",
)
"""Every fault the soak can inject, in the order the default schedule cycles through."""


@dataclass(frozen=True)
class SoakSettings:
    """The soak's parameters (``add_soak_arguments`` documents each); capacities in
    bytes, the cpu and nvme ones per worker."""

    duration_s: float
    processes: int
    sessions: int
    prefixes: int
    cpu_bytes: int
    nvme_bytes: int
    redis_bytes: int
    faults: tuple[str, ...]
    fault_s: float
    fault_interval_s: float
    warmup_s: float
    timeout_s: float
    write_policy: str
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoakSettings:
        quick = args.quick
        capacities = dict(item.split("=", 1) for item in args.capacities.split(",") if item)
        defaults = ("8MiB", "16MiB", "32MiB") if quick else ("16MiB", "32MiB", "64MiB")
        duration = args.duration or (22.0 if quick else 600.0)
        names = () if args.faults == "none" else tuple(args.faults.split(","))
        unknown = set(names) - set(FAULTS)
        if unknown:
            raise SystemExit(f"unknown faults {sorted(unknown)} (known: {', '.join(FAULTS)})")
        warmup = args.warmup or (4.0 if quick else 60.0)
        interval = args.fault_interval or (2.5 if quick else 30.0)
        return cls(
            duration_s=duration,
            processes=args.processes or (2 if quick else 3),
            sessions=args.sessions or (32 if quick else 96),
            prefixes=args.prefixes,
            cpu_bytes=parse_size(capacities.get("cpu", defaults[0])),
            nvme_bytes=parse_size(capacities.get("nvme", defaults[1])),
            redis_bytes=parse_size(capacities.get("redis", defaults[2])),
            faults=names,
            fault_s=args.fault_s or (2.0 if quick else 5.0),
            fault_interval_s=interval,
            warmup_s=warmup,
            timeout_s=args.timeout_s,
            write_policy=args.write_policy,
            seed=args.seed,
        )

    @property
    def disk_bytes(self) -> int:
        """The soak's disk: the nvme tiers' capacities, a quarter more for file
        headers and padding, and 8 MiB."""
        return self.processes * self.nvme_bytes * 5 // 4 + (8 << 20)

    @property
    def last_fault_at(self) -> float:
        """The latest a fault may begin: it then ends half an interval before the end."""
        return self.duration_s - self.fault_interval_s / 2 - self.fault_s

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds from start, fault): one every interval after warm-up, cycling
        through ``faults``, up to ``last_fault_at``. One fault runs at a time: a
        fault that outlasts its interval (a restart in an outage waits for the
        worker to open its store) delays the next, which is skipped if that
        leaves it no time."""
        events: list[tuple[float, str]] = []
        at = self.warmup_s
        while self.faults and at <= self.last_fault_at:
            events.append((at, self.faults[len(events) % len(self.faults)]))
            at += self.fault_interval_s
        return events


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, help="seconds (default 600; 22 with --quick)")
    parser.add_argument(
        "--processes", type=int, help="worker processes sharing redis (default 3; 2 with --quick)"
    )
    parser.add_argument(
        "--sessions", type=int, help="session slots over all workers (default 96; 32 with --quick)"
    )
    parser.add_argument("--prefixes", type=int, default=12, help="shared prefixes (default 12)")
    parser.add_argument(
        "--capacities",
        default="",
        help="tier capacities, e.g. cpu=16MiB,nvme=32MiB,redis=64MiB (the default; "
        "cpu=8MiB,nvme=16MiB,redis=32MiB with --quick): cpu and nvme per process, "
        "redis as each process's store counts it",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="faults to cycle through, comma-separated, or none (default: all of "
        f"{','.join(FAULTS)})",
    )
    parser.add_argument("--fault-s", type=float, help="how long a fault lasts (default 5; 2 quick)")
    parser.add_argument(
        "--fault-interval", type=float, help="seconds between faults (default 30; 2.5 quick)"
    )
    parser.add_argument(
        "--warmup", type=float, help="seconds before the first fault (default 60; 4 quick)"
    )
    parser.add_argument("--timeout-s", type=float, default=1.0, help="every tier's timeout_s (1)")
    parser.add_argument(
        "--write-policy",
        choices=("write-through", "write-back"),
        default="write-through",
        help="the cpu and nvme tiers' write policy (default write-through)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a short soak (what CI runs)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
