"""One nvme directory, many processes: each gets a private slot that works.

vLLM opens a store per worker process, so with tensor parallelism every rank
opens the same ``nvme:///var/cache/kvstore`` tier. Each real process here
opens the directory, writes, and keeps it open while the others do the same;
after they exit (one killed with SIGKILL) a new set reuses the same slots and
finds what the first set wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import AsyncKVStore

WORKER = """
import asyncio, json, sys
from kvstore.registry import open_driver

async def main(url, rank):
    driver = await open_driver(url)
    held = sorted([entry.key.decode() async for entry in driver.list()])
    await driver.put_many([(f"rank-{rank}".encode(), b"kv of rank " + rank.encode())])
    print(json.dumps({"path": driver.capabilities.detail("path"), "held": held}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await driver.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
RANKS = 3


def start_ranks(url: str, ranks: range) -> list[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """One worker process per rank, each holding the directory open once it has reported."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(rank)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in ranks
    ]
    reports = []
    for worker in workers:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if not line:
            worker.wait(timeout=60)
            assert worker.stderr is not None
            pytest.fail(f"a worker failed to open its tier: {worker.stderr.read()}")
        reports.append(json.loads(line))
    return list(zip(workers, reports))


def stop(worker: subprocess.Popen[str]) -> None:
    assert worker.stdin is not None
    worker.stdin.write("close\n")
    worker.stdin.flush()
    assert worker.wait(timeout=60) == 0


def test_every_process_gets_a_private_slot_reused_after_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "kvstore"
    url = f"nvme://{root}?capacity=64MiB&fsync=false"
    first = start_ranks(url, range(RANKS))
    expected = {str(root)} | {str(root / "slots" / str(n)) for n in range(1, RANKS)}
    assert {report["path"] for _, report in first} == expected
    *clean, (crashed, _) = first
    for worker, _ in clean:
        stop(worker)
    os.kill(crashed.pid, signal.SIGKILL)  # its lock goes with it
    crashed.wait(timeout=60)
    second = start_ranks(url, range(RANKS))
    try:
        assert {report["path"] for _, report in second} == expected
        held = sorted(key for _, report in second for key in report["held"])
        assert held == [f"rank-{rank}" for rank in range(RANKS)]
        assert sorted(os.listdir(root / "slots")) == [str(n) for n in range(1, RANKS)]
    finally:
        for worker, _ in second:
            stop(worker)


async def test_two_stores_of_the_documented_config_share_one_directory(tmp_path: Path) -> None:
    """Two engines (or ranks) with ``cpu + nvme`` over one directory: both nvme tiers work."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
    tiers = ["cpu://?capacity=16MiB", f"nvme://{tmp_path}/kvstore?capacity=64MiB"]
    config = StoreConfig.parse({"tiers": tiers, "chunk_tokens": 16})
    stores = [
        await AsyncKVStore.open(
            config, Namespace("model", "rev", layout, 16, tp_rank=rank, tp_size=2)
        )
        for rank in range(2)
    ]
    try:
        tokens = list(range(64))
        for rank, store in enumerate(stores):
            kv = torch_kv(layout, 64, seed=rank)
            assert (await store.store(tokens, kv)).written == 4
            await store.flush()
            await store.clear(store.tiers[0].name)
            loaded = await store.retrieve(tokens)
            assert loaded.chunk_tiers == (store.tiers[1].name,) * 4
            assert loaded.kv is not None and torch.equal(loaded.kv, kv)
        paths = [store.tiers[1].driver.capabilities.detail("path") for store in stores]
        assert paths == [f"{tmp_path}/kvstore", f"{tmp_path}/kvstore/slots/1"]
    finally:
        for store in stores:
            await store.close()


def torch_kv(layout: KVLayout, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(tokens), generator=generator).to(layout.torch_dtype)
