"""The steady-state soak (kvstore.soak): its parts, then the quick soak itself.

The quick soak runs once for the module (about 35 s of wall time on 2 cores:
2 worker processes, a redis-server, 22 s of traffic with every fault); each
test then asserts one of its checks. The correctness checks (no wrong KV,
every store accounted for, no crash) must always hold; the others are the
steady-state promises of docs/benchmarks.md (issue "Steady state": a full
tier keeps caching, calls are bounded by ``timeout_s``, hit rate near an
ideal LRU, flat memory, no uncounted files).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from redis_server import redis_available

from kvstore.layout import KVLayout
from kvstore.soak.faults import RedisProcess, chunk_files, corrupt_chunk_files
from kvstore.soak.ideal import TraceRequest, replay
from kvstore.soak.options import FAULTS, SoakSettings, add_soak_arguments
from kvstore.soak.report import Incarnation, checks, figures
from kvstore.soak.workload import WorkerTrace, WorkloadSpec, expected_kv, wrong_chunks
from kvstore.sync import SyncDriver

SPEC = WorkloadSpec(
    seed=7, layout=KVLayout(2, 2, 16, "float16"), chunk_tokens=8, prefixes=6, slots=5
)
SOAK_TIMEOUT_S = 240
needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


def test_ideal_lru_hits_the_longest_held_prefix_of_private_or_shared() -> None:
    trace = [
        TraceRequest(0, ["a", "b"], True),
        TraceRequest(1, ["a", "c"], True),  # "a" from the shared LRU
        TraceRequest(0, ["a", "b", "d"], True),  # "a", "b" from its own
        TraceRequest(1, ["e"], False),  # not counted, but used
        TraceRequest(1, ["b", "a"], True),  # own: c, e; shared: b, d, e
    ]
    result = replay(trace, private_chunks=2, shared_chunks=3)
    assert (result.requested_chunks, result.hit_chunks) == (9, 0 + 1 + 2 + 1)


def test_trace_is_deterministic_zipf_and_grows_sessions() -> None:
    def requests(incarnation: int) -> list[tuple[int, str, int]]:
        trace = WorkerTrace(SPEC, worker=1, incarnation=incarnation)
        made = (trace.next_request() for _ in range(400))
        return [(r.prefix, r.session, r.session_chunks) for r in made]

    assert requests(0) == requests(0)
    assert requests(0) != requests(1)
    popularity = np.bincount([prefix for prefix, _, _ in requests(0)], minlength=SPEC.prefixes)
    assert popularity[0] == popularity.max()
    trace = WorkerTrace(SPEC, worker=0, incarnation=0)
    grown: dict[str, int] = {}
    for _ in range(200):
        request = trace.next_request()
        assert len(request.tokens) == request.chunks * SPEC.chunk_tokens
        prefix = SPEC.prefix_tokens(request.prefix)
        assert np.array_equal(request.tokens[: len(prefix)], prefix)
        assert request.session_chunks > grown.get(request.session, 0)
        grown[request.session] = request.session_chunks
        assert len(request.chunk_ids()) == request.chunks


def test_expected_kv_depends_on_the_whole_prefix_and_catches_one_bit() -> None:
    tokens = np.arange(4 * SPEC.chunk_tokens, dtype=np.int32)
    kv = expected_kv(SPEC, tokens)
    assert kv.shape == SPEC.layout.shape(len(tokens))
    assert wrong_chunks(SPEC, expected_kv(SPEC, tokens), kv) == 0
    earlier = tokens.copy()
    earlier[0] += 1
    assert wrong_chunks(SPEC, expected_kv(SPEC, earlier), kv) == 4
    flipped = kv.clone()
    last = flipped[:, :, 3 * SPEC.chunk_tokens :].contiguous()
    last.view(torch.uint8).view(-1)[5] ^= 1
    flipped[:, :, 3 * SPEC.chunk_tokens :] = last
    assert wrong_chunks(SPEC, flipped, kv) == 1


def _settings(*words: str) -> SoakSettings:
    parser = argparse.ArgumentParser()
    add_soak_arguments(parser)
    return SoakSettings.from_args(parser.parse_args(list(words)))


def test_schedule_cycles_through_the_faults_after_warm_up() -> None:
    settings = _settings("--duration", "100", "--warmup", "10", "--fault-interval", "15")
    assert settings.schedule() == [
        (10.0, "pause-redis"),
        (25.0, "kill-redis"),
        (40.0, "fill-disk"),
        (55.0, "corrupt-files"),
        (70.0, "kill-worker"),
        (85.0, "restart-in-outage"),
    ]
    assert _settings("--faults", "none").schedule() == []
    assert _settings("--quick", "--capacities", "cpu=1MiB").cpu_bytes == 1 << 20


def test_corrupted_chunk_files_read_back_changed(tmp_path: Path) -> None:
    driver = SyncDriver.open_url(f"nvme://{tmp_path / 'w'}?capacity=1MiB")
    values = {bytes([i]) * 32: bytes(range(256)) * 40 for i in range(6)}
    try:
        driver.put_many(list(values.items()))
        assert len(chunk_files(tmp_path / "w")) == 6
        assert corrupt_chunk_files([tmp_path / "w"], 2, random.Random(1)) == 2
        read = driver.get_many(list(values))
    finally:
        driver.close()
    changed = [bytes(got) != value for got, value in zip(read, values.values()) if got is not None]
    assert sum(changed) == 2


@needs_redis
def test_redis_process_pauses_resumes_and_restarts(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, maxmemory=16 << 20)
    server.start()
    try:
        with server.client(timeout_s=0.3) as client:
            client.set("k", "v")
            server.pause()
            with pytest.raises(redis.TimeoutError):
                client.get("k")
            server.resume()
        assert server.keys() == 1
        server.kill()
        assert server.keys() is None
        server.start()
        assert server.keys() == 0
    finally:
        server.kill()


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The quick soak's JSON report (``kvstore soak --quick``)."""
    if not redis_available():
        pytest.skip("redis-server is not installed")
    directory = tmp_path_factory.mktemp("soak")
    report = directory / "soak.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kvstore.soak",
            "--quick",
            "--dir",
            str(directory / "run"),
            "--json",
            str(report),
        ],
        check=False,
        timeout=SOAK_TIMEOUT_S,
    )
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    (check,) = [check for check in report["checks"] if check["name"] == name]
    return check


@pytest.mark.slow
def test_soak_injected_every_fault(soak: dict[str, Any]) -> None:
    """Every fault ran; filling the disk takes a private tmpfs, so root."""
    details = {record["fault"]: record["detail"] for record in soak["faults"]}
    assert list(details) == list(FAULTS)
    must_run = [name for name in FAULTS if name != "fill-disk" or os.geteuid() == 0]
    assert not [name for name in must_run if "not injected" in details[name]], details
    assert "in 0 chunk files" not in details["corrupt-files"]


@pytest.mark.slow
def test_soak_serves_no_wrong_kv(soak: dict[str, Any]) -> None:
    assert soak["figures"]["wrong"] == 0
    assert soak["figures"]["hit"] > 0
    assert _check(soak, "wrong KV served")["held"]


@pytest.mark.slow
def test_soak_accounts_for_every_store(soak: dict[str, Any]) -> None:
    figures = soak["figures"]
    assert figures["unaccounted"] == 0
    assert figures["attempted"] == (
        figures["written"] + figures["already"] + figures["failed"] + figures["interrupted"]
    )
    assert _check(soak, "stores accounted")["held"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "promise",
    [
        "no crash",
        "full tiers keep caching",
        "opens with a tier down",
        "call latency",
        "hit rate",
        "memory flat",
        "files vs entries",
    ],
)
def test_soak_keeps_its_promise(soak: dict[str, Any], promise: str) -> None:
    check = _check(soak, promise)
    assert check["held"], check["measured"]


def _journal(path: Path, *events: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps({"t": 1.0, **event}) + "\n" for event in events))
    return path


def _request(n: int, session: str, session_chunks: int) -> dict[str, Any]:
    return {
        "event": "req",
        "n": n,
        "prefix": 0,
        "prefix_chunks": 2,
        "session": session,
        "session_chunks": session_chunks,
    }


def _done(n: int, chunks: int, *, hit: int, written: int, wrong: int = 0) -> dict[str, Any]:
    return {
        "event": "done",
        "n": n,
        "chunks": chunks,
        "hit": hit,
        "wrong": wrong,
        "retrieve_s": 0.01,
        "store_s": 2.0,
        "stored": chunks,
        "written": written,
        "already": chunks - written,
        "failed": 0,
    }


def test_report_accounts_for_requests_cut_short_only_by_a_kill(tmp_path: Path) -> None:
    served = _journal(
        tmp_path / "w0.jsonl",
        _request(0, "a", 1),
        _done(0, 3, hit=0, written=3),
        _request(1, "a", 2),
        _done(1, 4, hit=3, written=1, wrong=1),
    )
    killed = _journal(tmp_path / "w1.jsonl", _request(0, "b", 1))
    lost = _journal(tmp_path / "w2.jsonl", _request(0, "c", 1))
    incarnations = [
        Incarnation(0, 0, served, rss=[(10.0, 100 << 20), (95.0, 104 << 20)]),
        Incarnation(1, 0, killed, killed=True),
    ]

    def report(*extra: Incarnation) -> dict[str, bool]:
        result = figures(
            [*incarnations, *extra],
            private_chunks=8,
            shared_chunks=8,
            warm_at=10.0,
            end_at=100.0,
            files={0: (3, 1)},
        )
        assert (result.attempted, result.written, result.interrupted) == (10 + 3 * len(extra), 4, 3)
        assert (result.wrong, result.hit, result.requested) == (1, 3, 7)
        assert result.memory["0.0"]["growth"] == pytest.approx(0.04)
        return {check.name: check.held for check in checks(result, timeout_s=1.0, hung=0)}

    held = report()
    assert held["stores accounted"]
    assert not held["wrong KV served"]
    assert not held["call latency"]
    assert held["memory flat"]
    assert not held["files vs entries"]
    assert not report(Incarnation(2, 0, lost))["stores accounted"]
