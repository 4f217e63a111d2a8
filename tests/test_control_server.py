"""The control server as a real process (``kvstore serve``) over a real store
(cpu + nvme tiers), driven over HTTP and through ``kvstore ctl``; and jobs
(progress, cancel) on an in-process server with a tier that hangs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from control_server import ControlProcess

from kvstore.cli import main
from kvstore.config import ControlConfig, StoreConfig
from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.control.server import ControlServer, serve_control
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore, KVStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("test-model", "rev", LAYOUT, chunk_tokens=CHUNK)


def prompt(seed: int, tokens: int) -> tuple[list[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=generator).tolist()
    kv = torch.randint(0, 4, LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


CTL = [sys.executable, "-m", "kvstore.cli", "ctl"]
LONG, LONG_KV = prompt(0, 4 * CHUNK + 5)
SHORT, SHORT_KV = prompt(1, 2 * CHUNK)


def store_config(directory: Path) -> dict[str, Any]:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://?capacity=16MiB", "name": "cpu"},
            {"url": f"nvme://{directory}/nvme?capacity=64MiB", "name": "nvme"},
        ],
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    """A server whose nvme tier already holds LONG and SHORT (its cpu tier starts empty)."""
    directory = tmp_path_factory.mktemp("control")
    config = store_config(directory)
    with KVStore.open(StoreConfig.parse(config), NAMESPACE) as store:
        store.store(LONG, LONG_KV)
        store.store(SHORT, SHORT_KV)
        store.flush()
    process = ControlProcess(directory / "server", config, [NAMESPACE])
    process.start()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def http(server: ControlProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def wait_job(http: httpx.Client, job: dict[str, Any], timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    return job


def test_lookup(http: httpx.Client) -> None:
    reply = http.post("/v1/lookup", json={"tokens": LONG})
    assert reply.status_code == 200
    assert reply.json() == {
        "model": "test-model",
        "tokens": 4 * CHUNK,
        "chunk_tokens": CHUNK,
        "chunks": ["nvme"] * 4,
    }
    other = http.post("/v1/lookup", json={"tokens": [5] * (3 * CHUNK), "model": "test-model"})
    assert other.json()["tokens"] == 0


def test_bad_requests_are_typed_4xx(http: httpx.Client) -> None:
    unknown_model = http.post("/v1/lookup", json={"tokens": LONG, "model": "nope"})
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"] == "NotFoundError"
    assert http.post("/v1/lookup", json={"tokens": [-1]}).status_code == 422
    assert http.post("/v1/lookup", json={"tokens": [1], "text": "x"}).status_code == 422
    assert http.post("/v1/lookup", content=b"{not json").status_code == 422
    no_tokenizer = http.post("/v1/lookup", json={"text": "hello"})
    assert no_tokenizer.status_code == 404, no_tokenizer.text
    assert http.post("/v1/clear", json={"tier": "nope"}).status_code == 404
    lossy = http.post("/v1/compress", json={"tier": "nvme", "codecs": "int8"})
    assert (lossy.status_code, lossy.json()["error"]) == (400, "InvalidArgumentError")
    assert http.post("/v1/compress", json={"tier": "nvme", "codecs": "bogus"}).status_code == 400
    assert http.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert http.get("/v1/jobs/not-a-job").status_code == 422
    assert http.get("/v1/health", params={"timeout_s": -1}).status_code == 422


def test_move_job_warms_a_prefix(http: httpx.Client) -> None:
    started = http.post(
        "/v1/move", json={"source": "nvme", "target": "cpu", "tokens": LONG[: 2 * CHUNK]}
    )
    assert started.status_code == 202
    assert started.json()["kind"] == "move"
    job = wait_job(http, started.json())
    assert job["state"] == "succeeded", job
    assert job["result"]["copied"] == 2
    assert job["done_chunks"] == job["total_chunks"] == 2
    assert job["done_bytes"] == job["total_bytes"] > 0
    chunks = http.post("/v1/lookup", json={"tokens": LONG}).json()["chunks"]
    assert chunks == ["cpu", "cpu", "nvme", "nvme"]
    listed = http.get("/v1/jobs").json()["jobs"]
    assert job["id"] in [entry["id"] for entry in listed]


def test_pin_with_expiry(http: httpx.Client) -> None:
    assert http.post("/v1/pin", json={"tokens": LONG, "ttl_s": 60}).json() == {"chunks": 4}
    assert http.get("/v1/stats").json()["pinned_chunks"] == 4
    assert http.post("/v1/unpin", json={"tokens": LONG}).json() == {"chunks": 4}
    assert http.post("/v1/pin", json={"tokens": SHORT, "ttl_s": 0.2}).json() == {"chunks": 2}
    time.sleep(0.3)  # an expired pin no longer counts, swept or not
    assert http.get("/v1/stats").json()["pinned_chunks"] == 0
    assert http.post("/v1/pin", json={"tokens": SHORT, "ttl_s": 0}).status_code == 422


def test_compress_job(http: httpx.Client) -> None:
    job = wait_job(http, http.post("/v1/compress", json={"tier": "nvme", "codecs": "zstd"}).json())
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["recoded"] == 6
    assert result["bytes_after"] < result["bytes_before"] / 2


def test_health_stats_and_metrics(http: httpx.Client, server: ControlProcess) -> None:
    health = http.get("/v1/health").json()
    assert health["ok"] is True
    assert [tier["name"] for tier in health["tiers"]] == ["cpu", "nvme"]
    assert all(tier["reachable"] and tier["latency_ms"] >= 0 for tier in health["tiers"])
    assert health["tiers"][1]["entries"] == 6
    stats = http.get("/v1/stats").json()
    assert stats["scope"] == "all"
    assert stats["counters"]["lookups"] >= 1
    assert stats["tiers"][1]["capacity_bytes"] == 64 << 20
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "kvstore_" in metrics.text
    spec = http.get("/openapi.json").json()
    assert {"/v1/lookup", "/v1/move", "/v1/jobs/{job_id}/cancel"} <= set(spec["paths"])


def test_cli_drives_the_server(
    server: ControlProcess, http: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = ",".join(map(str, LONG))
    run = subprocess.run(
        [*CTL, "lookup", "--endpoint", server.url, "--tokens", tokens, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"] == 4 * CHUNK

    assert main(["ctl", "move", "--endpoint", server.url, "--from", "nvme", "--to", "cpu"]) == 0
    assert "(move): succeeded" in capsys.readouterr().out
    assert main(["ctl", "lookup", "--endpoint", server.url, "--tokens", tokens]) == 0
    assert "64 tokens cached (4 chunks of 16): cpu x4" in capsys.readouterr().out
    assert main(["ctl", "health", "--endpoint", server.url]) == 0
    assert "nvme" in capsys.readouterr().out
    assert main(["ctl", "stats", "--endpoint", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scope"] == "all"

    assert main(["ctl", "clear", "--endpoint", server.url, "--tier", "cpu", "--no-wait"]) == 0
    job_id = capsys.readouterr().out.split()[1]
    assert main(["ctl", "jobs", job_id, "--wait", "--endpoint", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "succeeded"
    assert http.post("/v1/lookup", json={"tokens": LONG}).json()["chunks"] == ["nvme"] * 4

    compress = ["ctl", "compress", "--endpoint", server.url, "--tier", "nvme", "--codecs"]
    assert main([*compress, "fp8"]) == 2
    assert "InvalidArgumentError" in capsys.readouterr().err
    assert main(["ctl", "lookup", "--endpoint", server.url]) == 2


# ------------------------------------------------- jobs on an in-process server


@pytest.fixture
async def hanging(tmp_path: Path) -> AsyncIterator[tuple[AsyncKVStore, ControlServer]]:
    """A store whose second tier never answers a read, and its control server."""
    cpu = await open_driver("cpu://?capacity=16MiB")
    slow = FaultyDriver.wrap(
        await open_driver(f"nvme://{tmp_path}/nvme?capacity=64MiB"),
        FaultPlan(action="hang", operations={"get_many"}, hang_seconds=60),
    )
    config = StoreConfig.parse(
        {
            "chunk_tokens": CHUNK,
            "tiers": [{"url": "cpu://", "name": "cpu"}, {"url": "nvme://", "name": "slow"}],
        }
    )
    store = await AsyncKVStore.open(config, NAMESPACE, drivers=[cpu, slow])
    server = await serve_control(store, ControlConfig(port=0))
    yield store, server
    await server.aclose()
    await store.close()


async def test_job_progress_and_cancel(hanging: tuple[AsyncKVStore, ControlServer]) -> None:
    store, server = hanging
    await store.store(LONG, LONG_KV)
    await store.flush()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        started = (await http.post("/v1/move", json={"source": "slow", "target": "cpu"})).json()
        assert started["state"] == "running"
        await asyncio.sleep(0.2)
        job = (await http.get(f"/v1/jobs/{started['id']}")).json()
        assert (job["state"], job["total_chunks"], job["done_chunks"]) == ("running", 4, 0)
        cancelled = await http.post(f"/v1/jobs/{started['id']}/cancel")
        assert cancelled.json()["state"] == "cancelled"
        again = await http.post(f"/v1/jobs/{started['id']}/cancel")
        assert again.json()["state"] == "cancelled"
        # the store is unharmed: the cpu tier still serves the prompt
        lookup = (await http.post("/v1/lookup", json={"tokens": LONG})).json()
        assert lookup["chunks"] == ["cpu"] * 4
