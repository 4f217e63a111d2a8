"""``kvstore bench`` runs end to end and reports every row it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prerequisites import requires
from redis_server import RedisServer, redis_available

from kvstore.bench import lmcache as bench_lmcache
from kvstore.bench.command import results_table
from kvstore.bench.rows import LAYOUTS, Row, Settings
from kvstore.cli import main

TINY = ["--quick", "--chunks", "1", "--repeat", "1", "--warmup", "0"]


def test_bench_reports_every_tier_op_and_verify_setting(tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    code = main(
        ["bench", *TINY, "--tiers", "cpu,nvme", "--dir", str(tmp_path), "--json", str(report_path)]
    )

    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["errors"] == []
    cells = {(r["tier"], r["layout"], r["op"], r["verify"]) for r in report["results"]}
    assert cells == {
        (tier, layout, op, verify)
        for tier in ("cpu", "nvme")
        for layout in LAYOUTS
        for op in ("store", "retrieve")
        for verify in (True, False)
    }
    for row in report["results"]:
        assert row["chunks"] == 1
        assert row["total_bytes"] == row["chunk_bytes"] > 0
        for figure in ("kvstore_gbps", "baseline_gbps", "ratio", "target"):
            assert row[figure] > 0, (figure, row)
        assert len(row["kvstore_seconds"]) == len(row["baseline_seconds"]) == 1


def test_bench_leaves_no_files_behind(tmp_path: Path) -> None:
    code = main(
        ["bench", *TINY, "--layout", "qwen2-0.5b", "--tiers", "nvme", "--dir", str(tmp_path)]
    )

    assert code == 0
    assert list(tmp_path.iterdir()) == []


def test_bench_rejects_an_unknown_tier(tmp_path: Path) -> None:
    assert main(["bench", *TINY, "--tiers", "cpu,tape", "--dir", str(tmp_path)]) == 2


def test_benchmarks_script_runs_the_same_bench(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "benchmarks" / "store_tiers.py"
    report_path = tmp_path / "bench.json"
    args = [*TINY, "--layout", "qwen2-0.5b", "--tiers", "cpu", "--verify", "on"]
    subprocess.run(
        [sys.executable, str(script), *args, "--json", str(report_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )

    rows = json.loads(report_path.read_text())["results"]
    assert [(r["tier"], r["op"], r["verify"]) for r in rows] == [
        ("cpu", "store", True),
        ("cpu", "retrieve", True),
    ]


@pytest.mark.parametrize("option", [["--chunks", "0"], ["--repeat", "0"]])
def test_bench_rejects_empty_runs(tmp_path: Path, option: list[str]) -> None:
    assert main(["bench", "--quick", "--tiers", "cpu", "--dir", str(tmp_path), *option]) == 2


@requires(redis_available(), "redis-server is not installed")
def test_bench_measures_a_remote_tier_against_its_raw_client(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        report_path = tmp_path / "bench.json"
        url = server.url("prefix=bench")
        code = main(["bench", *TINY, "--url", url, "--verify", "on", "--json", str(report_path)])
        assert code == 0
        report = json.loads(report_path.read_text())
        assert report["errors"] == []
        assert {(r["tier"], r["op"]) for r in report["results"]} == {
            ("redis", "store"),
            ("redis", "retrieve"),
        }
        for row in report["results"]:
            assert row["baseline"].startswith("redis-py")
            assert row["ratio"] > 0
        assert not any(server.client().scan_iter(match="bench*"))
    finally:
        server.stop()


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_compare_lmcache_is_reported_never_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tier: str
) -> None:
    report_path = tmp_path / "bench.json"
    arguments = ["--tiers", tier, "--layout", "qwen2-0.5b", "--compare", "lmcache"]
    code = main(
        ["bench", *TINY, *arguments, "--dir", str(tmp_path / "scratch"), "--json", str(report_path)]
    )
    assert code == 0
    tiers = {row["tier"] for row in json.loads(report_path.read_text())["results"]}
    if bench_lmcache.available():
        assert tiers == {tier, bench_lmcache.NAMES[tier]}
    else:
        assert tiers == {tier}
        assert "LMCache is not importable" in capsys.readouterr().out
    assert list((tmp_path / "scratch").iterdir()) == []


def test_lmcache_rows_name_their_backend_in_the_caption() -> None:
    settings = Settings(
        layouts=("qwen2-0.5b",),
        tiers=("nvme",),
        urls=(),
        chunks=1,
        repeat=1,
        warmup=0,
        verify=(False,),
        directory=None,
        json_path=None,
        quick=True,
        compare=("lmcache",),
    )
    rows = [
        Row(tier, "qwen2-0.5b", "store", False, 1, 1 << 20, "raw", [1.0], [1.0])
        for tier in ("nvme", bench_lmcache.DISK_NAME)
    ]

    caption = results_table(rows, settings).caption

    assert isinstance(caption, str)
    assert f"{bench_lmcache.DISK_NAME} = {bench_lmcache.DISK_DESCRIPTION}" in caption
    assert bench_lmcache.CPU_DESCRIPTION not in caption
    assert f"{bench_lmcache.DISK_NAME} baseline: raw" in caption
