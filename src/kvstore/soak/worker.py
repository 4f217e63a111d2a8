"""One soak worker process: an engine's use of the store, journaled line by line.

``python -m kvstore.soak.worker PLAN.json`` opens a store on the soak's
tiers and, until the run's end time, serves its trace: for each request it
retrieves the cached prefix (checking every chunk against the KV recomputed
from the tokens), then stores the whole prompt's KV, as an engine does after
prefill. Each request is journaled before it starts and when it is done, so a
worker killed with SIGKILL leaves a journal saying exactly which request it
was in. At the end it flushes, journals the store's per-tier counters and
closes the store.

Exit status: 0 done, 3 the store could not be opened, 4 a store call raised
(a crash: a failing tier must be a miss, never an exception).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from kvstore.config import StoreConfig
from kvstore.errors import KVStoreError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.soak.workload import WorkerTrace, WorkloadSpec, expected_kv, wrong_chunks
from kvstore.store import KVStore

OPEN_FAILED = 3
CRASHED = 4
USAGE_TIMEOUT_S = 10.0
START_WAIT_S = 600.0


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker process needs, written as JSON by the runner."""

    worker: int
    incarnation: int
    start_file: str
    journal: str
    spec: WorkloadSpec
    store: dict[str, Any]

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> WorkerPlan:
        data = json.loads(text)
        spec = data["spec"]
        spec["layout"] = KVLayout(**spec["layout"])
        data["spec"] = WorkloadSpec(**spec)
        return cls(**data)


class Journal:
    """JSON lines, each handed to the OS as it is written (so a SIGKILL loses none)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _tier_report(store: KVStore) -> list[dict[str, Any]]:
    """Per tier: entries and bytes the store counts, its counters, and the driver's own count."""
    tiers = []
    for tier in store.tiers:
        try:
            usage = store.loop_thread.run(tier.driver.usage(), timeout=USAGE_TIMEOUT_S)
            driver_entries: int | None = usage.entries
        except (KVStoreError, TimeoutError):
            driver_entries = None
        stats = dataclasses.asdict(tier.stats)
        stats["errors"] = dict(tier.stats.errors)
        tiers.append(
            {
                "name": tier.name,
                "scheme": tier.driver.name,
                "entries": len(tier.index),
                "used_bytes": tier.index.used_bytes,
                "capacity_bytes": tier.capacity,
                "driver_entries": driver_entries,
                "stats": stats,
            }
        )
    return tiers


def end_time(start_file: Path) -> float:
    """The run's end time, which the runner writes to ``start_file`` once every
    first worker has opened its store (so slow starts do not eat the run)."""
    deadline = time.monotonic() + START_WAIT_S
    while not start_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the runner did not write {start_file}")
        time.sleep(0.05)
    return float(start_file.read_text())


def serve(plan: WorkerPlan, store: KVStore, journal: Journal) -> None:
    """Run the trace until the run's end time, then flush and journal the counters."""
    spec = plan.spec
    trace = WorkerTrace(spec, plan.worker, plan.incarnation)
    end_at = end_time(Path(plan.start_file))
    number = 0
    while time.time() < end_at:
        request = trace.next_request()
        journal.write(
            "req",
            n=number,
            prefix=request.prefix,
            prefix_chunks=request.prefix_chunks,
            session=request.session,
            session_chunks=request.session_chunks,
        )
        expected = expected_kv(spec, request.tokens)
        start = time.perf_counter()
        got = store.retrieve(request.tokens)
        retrieve_s = time.perf_counter() - start
        hit_chunks = got.tokens // spec.chunk_tokens
        if got.kv is None:
            wrong = 0
        elif got.tokens > expected.shape[2]:
            wrong = hit_chunks
        else:
            wrong = wrong_chunks(spec, got.kv, expected[:, :, : got.tokens])
        start = time.perf_counter()
        result = store.store(request.tokens, expected)
        store_s = time.perf_counter() - start
        journal.write(
            "done",
            n=number,
            chunks=request.chunks,
            hit=hit_chunks,
            wrong=wrong,
            retrieve_s=retrieve_s,
            store_s=store_s,
            stored=result.chunks,
            written=result.written,
            already=result.already_cached,
            failed=result.failed,
        )
        number += 1
    start = time.perf_counter()
    store.flush()
    journal.write("final", flush_s=time.perf_counter() - start, tiers=_tier_report(store))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    plan = WorkerPlan.from_json(Path(args[0]).read_text())
    torch.set_num_threads(1)
    journal = Journal(Path(plan.journal))
    spec = plan.spec
    namespace = Namespace(
        "kvstore-soak", revision=str(spec.seed), layout=spec.layout, chunk_tokens=spec.chunk_tokens
    )
    start = time.perf_counter()
    try:
        store = KVStore.open(StoreConfig.parse(plan.store, source="soak plan"), namespace)
    except KVStoreError as exc:
        journal.write("open_failed", error=f"{type(exc).__name__}: {exc}")
        return OPEN_FAILED
    journal.write("open", open_s=time.perf_counter() - start)
    try:
        with store:
            serve(plan, store, journal)
    except Exception:
        journal.write("crash", error=traceback.format_exc())
        return CRASHED
    finally:
        journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
