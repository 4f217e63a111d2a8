"""Run the soak: a redis-server, a small disk, worker processes, faults on a schedule.

The runner starts one redis-server (the shared tier) and ``processes``
worker processes, each with a store of three tiers: its own cpu arena, its
own nvme directory on the soak's disk, and the shared redis. Every
``fault_interval`` seconds after warm-up it injects the next fault of the
schedule and ends it ``fault_s`` later; meanwhile it samples each worker's
RSS and restarts any worker that exits before the end. Then it counts the
chunk files on disk and computes the report (``kvstore.soak.report``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from kvstore.chunk import raw_chunk_size
from kvstore.layout import KVLayout
from kvstore.sizes import format_size
from kvstore.soak import faults
from kvstore.soak.options import SoakSettings
from kvstore.soak.report import (
    Check,
    Incarnation,
    SoakFigures,
    checks,
    figures,
    slowest_call,
)
from kvstore.soak.worker import WorkerPlan
from kvstore.soak.workload import WorkloadSpec

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype="float16")
"""Small synthetic KV: 64 KiB a chunk of 32 tokens (65,664 bytes encoded), an
odd size for the cpu arena's 256 KiB pages."""
CHUNK_TOKENS = 32
TICK_S = 0.1
RSS_EVERY_S = 0.5
RESTART_DELAY_S = 1.0
EXIT_GRACE_S = 60.0
OPEN_WAIT_S = 300.0
CORRUPT_FILES = 8


def _encoded_chunk_bytes() -> int:
    """Bytes of one encoded chunk (raw codec): header plus KV."""
    meta = torch.empty(LAYOUT.shape(CHUNK_TOKENS), dtype=LAYOUT.torch_dtype, device="meta")
    return raw_chunk_size(meta)


class Slot:
    """One worker position: its plan, its current process, its incarnations."""

    def __init__(self, worker: int, run_dir: Path, plan: Callable[[int, str], WorkerPlan]) -> None:
        self.worker = worker
        self.run_dir = run_dir
        self._plan = plan
        self.process: subprocess.Popen[bytes] | None = None
        self.incarnations: list[Incarnation] = []
        self.exited_at: float | None = None

    def start(self) -> None:
        number = len(self.incarnations)
        journal = self.run_dir / f"worker-{self.worker}.{number}.jsonl"
        plan_path = self.run_dir / f"worker-{self.worker}.{number}.plan.json"
        plan_path.write_text(self._plan(number, str(journal)).to_json())
        log = (self.run_dir / f"worker-{self.worker}.{number}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvstore.soak.worker", str(plan_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.incarnations.append(Incarnation(self.worker, number, journal))
        self.exited_at = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self.incarnations[-1].killed = True

    def poll(self, now: float) -> bool:
        """Whether the current process has exited (noting when and how)."""
        if self.process is None:
            return True
        code = self.process.poll()
        if code is None:
            return False
        if self.exited_at is None:
            self.exited_at = now
            self.incarnations[-1].exit_code = code
        return True

    def sample_rss(self, t: float) -> None:
        if self.process is not None and self.process.poll() is None:
            rss = rss_of(self.process.pid)
            if rss is not None:
                self.incarnations[-1].rss.append((t, rss))


def nvme_dir(disk: Path, worker: int) -> Path:
    """The nvme tier directory of ``worker``: one process per directory."""
    return disk / f"worker-{worker}"


def rss_of(pid: int) -> int | None:
    """The resident set size of process ``pid`` in bytes (None if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


class FaultInjector:
    """Starts and ends the scheduled faults; records what each did."""

    def __init__(
        self,
        redis: faults.RedisProcess,
        disk: Path,
        disk_problem: str | None,
        slots: list[Slot],
        seed: int,
    ) -> None:
        self.redis = redis
        self.disk = disk
        self.disk_problem = disk_problem
        self.slots = slots
        self.rng = random.Random(seed)
        self.log: list[dict[str, Any]] = []
        self._victims = slots[1:] or slots
        self._killed = 0

    def begin(self, name: str, at: float) -> dict[str, Any]:
        record: dict[str, Any] = {"fault": name, "start_s": at, "end_s": at, "detail": ""}
        if name == "pause-redis":
            self.redis.pause()
            record["detail"] = "SIGSTOP redis-server"
        elif name == "kill-redis":
            self.redis.kill()
            record["detail"] = "SIGKILL redis-server, restarted empty"
        elif name == "fill-disk":
            if self.disk_problem is None:
                filled = faults.fill_disk(self.disk)
                record["detail"] = f"ballast of {filled >> 20} MiB to ENOSPC"
            else:
                record["detail"] = f"not injected: no private disk ({self.disk_problem})"
        elif name == "corrupt-files":
            dirs = [nvme_dir(self.disk, slot.worker) for slot in self.slots]
            corrupted = faults.corrupt_chunk_files(dirs, CORRUPT_FILES, self.rng)
            record["detail"] = f"64 bytes overwritten in {corrupted} chunk files"
        elif name in ("kill-worker", "restart-in-outage"):
            slot = self._victims[self._killed % len(self._victims)]
            self._killed += 1
            slot.kill()
            record["worker"] = slot.worker
            record["detail"] = f"SIGKILL worker {slot.worker}, restarted"
            if name == "restart-in-outage":
                self.redis.kill()
                slot.start()
                record["detail"] = (
                    f"SIGKILL redis-server and worker {slot.worker}; the worker restarted "
                    "while redis was down"
                )
        self.log.append(record)
        return record

    def skip(self, name: str, at: float) -> None:
        """Record a fault that an earlier, longer one left no time for."""
        detail = "not injected: the faults before it left no time"
        self.log.append({"fault": name, "start_s": at, "end_s": at, "detail": detail})

    def can_end(self, record: dict[str, Any]) -> bool:
        """Whether ``record``'s fault may end: a restart in an outage lasts until the
        restarted worker has tried to open its store."""
        if record["fault"] != "restart-in-outage":
            return True
        slot = self.slots[int(record["worker"])]
        return slot.poll(time.time()) or slot.incarnations[-1].opened()

    def end(self, record: dict[str, Any], at: float) -> None:
        name = record["fault"]
        if name == "pause-redis":
            self.redis.resume()
        elif name in ("kill-redis", "restart-in-outage"):
            self.redis.start()
        elif name == "fill-disk":
            faults.free_disk(self.disk)
        elif name == "kill-worker":
            self.slots[record["worker"]].start()
        record["end_s"] = at


def _close_out(slots: list[Slot]) -> int:
    """Start once more each worker whose last run did not close its store (killed,
    or failed to open): past the end time it opens, reports and closes, so every
    nvme directory ends as a closed store left it. The workers that hung."""
    closing = [slot for slot in slots if not slot.incarnations[-1].closed()]
    for slot in closing:
        slot.start()
    deadline = time.monotonic() + EXIT_GRACE_S
    while not all(slot.poll(time.time()) for slot in closing):
        if time.monotonic() > deadline:
            hung = [slot for slot in closing if not slot.poll(time.time())]
            for slot in hung:
                slot.kill()
            return len(hung)
        time.sleep(TICK_S)
    return 0


def _wait_opened(slots: list[Slot]) -> None:
    """Wait (bounded) until every worker has opened its store. Nothing is faulted
    yet, so a worker that exits first is a broken set-up: RuntimeError, with why."""
    deadline = time.monotonic() + OPEN_WAIT_S
    while time.monotonic() < deadline:
        for slot in slots:
            if slot.poll(time.time()):
                events = slot.incarnations[-1].events()
                why = [e["error"] for e in events if e["event"] in ("open_failed", "crash")]
                raise RuntimeError(f"worker {slot.worker} exited before it served: {why}")
        if all(slot.incarnations[-1].opened() for slot in slots):
            return
        time.sleep(TICK_S)
    raise RuntimeError(f"the workers did not open their stores within {OPEN_WAIT_S:.0f} s")


def workload_spec(settings: SoakSettings) -> WorkloadSpec:
    return WorkloadSpec(
        seed=settings.seed,
        layout=LAYOUT,
        chunk_tokens=CHUNK_TOKENS,
        prefixes=settings.prefixes,
        slots=max(1, settings.sessions // settings.processes),
    )


def run(settings: SoakSettings, run_dir: Path, disk_problem: str | None) -> dict[str, Any]:
    """Run the soak in ``run_dir``; the JSON report. ``run_dir / "disk"`` is the
    private disk, or ``disk_problem`` says why it is a plain directory."""
    disk = run_dir / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    redis = faults.RedisProcess(
        run_dir / "redis", maxmemory=settings.processes * settings.redis_bytes * 2 + (16 << 20)
    )
    redis.start()
    start_file = run_dir / "end-time"
    spec = workload_spec(settings)

    def tier(url: str, name: str, **options: Any) -> dict[str, Any]:
        return {"url": url, "name": name, "timeout_s": settings.timeout_s, **options}

    def plan_for(worker: int) -> Callable[[int, str], WorkerPlan]:
        nvme = f"nvme://{nvme_dir(disk, worker)}?capacity={format_size(settings.nvme_bytes)}"
        store = {
            "name": f"soak-{worker}",
            "chunk_tokens": CHUNK_TOKENS,
            "queue_bytes": 16 << 20,
            "io_batch_bytes": 4 << 20,
            "on_queue_full": "drop",
            "tiers": [
                tier(
                    f"cpu://?capacity={format_size(settings.cpu_bytes)}",
                    "cpu",
                    write_policy=settings.write_policy,
                ),
                tier(nvme, "nvme", write_policy=settings.write_policy),
                tier(redis.url("prefix=soak"), "redis", max_bytes=settings.redis_bytes),
            ],
        }
        return lambda number, journal: WorkerPlan(
            worker, number, str(start_file), journal, spec, store
        )

    slots = [Slot(worker, run_dir, plan_for(worker)) for worker in range(settings.processes)]
    injector = FaultInjector(redis, disk, disk_problem, slots, settings.seed)
    active: list[tuple[float, dict[str, Any]]] = []
    redis_rss: list[tuple[float, int]] = []
    hung = 0
    try:
        for slot in slots:
            slot.start()
        _wait_opened(slots)
        start = time.time()
        end_at = start + settings.duration_s
        temporary = start_file.with_suffix(".tmp")
        temporary.write_text(repr(end_at))
        temporary.rename(start_file)
        pending = [(start + at, name) for at, name in settings.schedule()]
        next_sample = start
        while True:
            now = time.time()
            if pending and pending[0][0] <= now and not active:
                _, name = pending.pop(0)
                if now - start <= settings.last_fault_at:
                    active.append((now + settings.fault_s, injector.begin(name, now - start)))
                else:
                    injector.skip(name, now - start)
            ending = [item for item in active if item[0] <= now and injector.can_end(item[1])]
            for due, record in ending:
                injector.end(record, now - start)
                active.remove((due, record))
            restarting = {record.get("worker") for _, record in active}
            for slot in slots:
                if (
                    slot.worker not in restarting
                    and slot.poll(now)
                    and now < end_at - RESTART_DELAY_S
                    and slot.exited_at is not None
                    and now - slot.exited_at >= RESTART_DELAY_S
                ):
                    slot.start()
            if now >= next_sample:
                for slot in slots:
                    slot.sample_rss(now - start)
                if redis.process is not None:
                    redis_rss.append((now - start, rss_of(redis.process.pid) or 0))
                next_sample = now + RSS_EVERY_S
            if now >= end_at and all(slot.poll(now) for slot in slots):
                break
            if now >= end_at + EXIT_GRACE_S:
                for slot in slots:
                    if not slot.poll(now):
                        slot.kill()
                        hung += 1
                break
            time.sleep(TICK_S)
        for _, record in active:
            injector.end(record, time.time() - start)
        hung += _close_out(slots)
        redis_keys = redis.keys()
    finally:
        for slot in slots:
            slot.kill()
        redis.kill()
        faults.free_disk(disk)
        files = {}
        for slot in slots:
            chunk_files = faults.chunk_files(nvme_dir(disk, slot.worker))
            files[slot.worker] = (len(chunk_files), len({path.parent for path in chunk_files}))
        if disk_problem is None:
            faults.release_disk(disk)
    chunk_bytes = _encoded_chunk_bytes()
    private = (
        max(settings.cpu_bytes, settings.nvme_bytes)
        if settings.write_policy == "write-through"
        else settings.cpu_bytes + settings.nvme_bytes
    )
    result = figures(
        [incarnation for slot in slots for incarnation in slot.incarnations],
        private_chunks=private // chunk_bytes,
        shared_chunks=settings.redis_bytes // chunk_bytes,
        warm_at=settings.warmup_s,
        end_at=settings.duration_s,
        files=files,
    )
    for record in injector.log:
        record["slowest_call_s"] = slowest_call(
            result, start + record["start_s"], start + record["end_s"]
        )
    report = _report(settings, result, checks(result, settings.timeout_s, hung), injector)
    report["redis"] = {"keys_at_end": redis_keys, "rss": redis_rss}
    report["rss"] = {f"{i.worker}.{i.number}": i.rss for slot in slots for i in slot.incarnations}
    return report


def _report(
    settings: SoakSettings,
    result: SoakFigures,
    results: list[Check],
    injector: FaultInjector,
) -> dict[str, Any]:
    return {
        "settings": {**asdict(settings), "faults": list(settings.faults)},
        "load_average_at_end": os.getloadavg(),
        "checks": [check.to_json() for check in results],
        "held": all(check.held for check in results),
        "faults": injector.log,
        "figures": {
            key: value for key, value in asdict(result).items() if key not in ("latencies", "calls")
        },
        "hit_rate": result.hit_rate,
    }


def report_tables(report: dict[str, Any]) -> list[Table]:
    settings = report["settings"]
    checks_table = Table(
        title=(
            f"kvstore soak: {settings['processes']} processes, {settings['duration_s']:.0f} s, "
            f"cpu {format_size(settings['cpu_bytes'])} + nvme "
            f"{format_size(settings['nvme_bytes'])} each, shared redis "
            f"{format_size(settings['redis_bytes'])}"
        )
    )
    for column in ("check", "measured", "promise", "held"):
        checks_table.add_column(column)
    for check in report["checks"]:
        held = "[green]yes[/green]" if check["held"] else "[red]no[/red]"
        checks_table.add_row(check["name"], check["measured"], check["promise"], held)
    faults_table = Table(title="faults")
    for column in ("at s", "for s", "fault", "what", "slowest call in it"):
        faults_table.add_column(column)
    for record in report["faults"]:
        faults_table.add_row(
            f"{record['start_s']:.1f}",
            f"{record['end_s'] - record['start_s']:.1f}",
            record["fault"],
            record["detail"],
            f"{record['slowest_call_s']:.2f} s",
        )
    return [checks_table, faults_table]
