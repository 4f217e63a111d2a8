"""Tenant isolation: with tenant salts, tenant B cannot read, list, pin, clear or
probe (hit counts, driver calls) tenant A's chunks, through the store API (two
stores sharing a tier) or through the control API (a real server process)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from control_server import ControlProcess

from kvstore.config import StoreConfig
from kvstore.conformance.faults import FaultPlan, FaultyDriver
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
    kv = torch.randn(LAYOUT.shape(tokens), generator=generator).to(LAYOUT.torch_dtype)
    return ids, kv


A_PROMPT, A_KV = prompt(0, 4 * CHUNK)
B_PROMPT, B_KV = prompt(1, 2 * CHUNK)
UNSEEN, _ = prompt(2, 4 * CHUNK)


# ------------------------------------------------------------------ store API


class Tenants:
    """Tenant A's and tenant B's stores: a private cpu tier each, one shared tier."""

    def __init__(self, a: AsyncKVStore, b: AsyncKVStore, shared_b: FaultyDriver) -> None:
        self.a = a
        self.b = b
        self.shared_b = shared_b


async def open_tenant(salt: str, root: str) -> tuple[AsyncKVStore, FaultyDriver]:
    config = StoreConfig.parse(
        {
            "chunk_tokens": CHUNK,
            "tenant": salt,
            "tiers": [
                {"url": "cpu://?capacity=16MiB", "name": "cpu"},
                {"url": "fsspec+memory://", "name": "shared", "max_bytes": 64 << 20},
            ],
        }
    )
    shared = FaultyDriver.wrap(
        await open_driver(f"fsspec+memory://{root}"), FaultPlan(probability=0.0)
    )
    store = await AsyncKVStore.open(
        config,
        dataclasses.replace(NAMESPACE, tenant=salt),
        drivers=[await open_driver("cpu://?capacity=16MiB"), shared],
    )
    return store, shared


@pytest.fixture
async def tenants(tmp_path: Path) -> AsyncIterator[Tenants]:
    root = f"/kvstore-tenants-{tmp_path.name}"
    a, _ = await open_tenant("salt-of-a", root)
    b, shared_b = await open_tenant("salt-of-b", root)
    await a.store(A_PROMPT, A_KV)
    await a.flush()
    await b.store(B_PROMPT, B_KV)
    await b.flush()
    yield Tenants(a, b, shared_b)
    await a.close()
    await b.close()


async def test_b_cannot_read_a(tenants: Tenants) -> None:
    assert tenants.shared_b.capabilities.shared  # B's store asks the shared tier itself
    assert (await tenants.b.lookup(A_PROMPT)).tokens == 0
    assert (await tenants.b.retrieve(A_PROMPT)).tokens == 0
    assert await tenants.b.contains(A_PROMPT) == [False] * 4
    loaded = await tenants.a.retrieve(A_PROMPT)
    assert loaded.kv is not None and torch.equal(loaded.kv, A_KV)


async def test_same_salt_shares(tenants: Tenants, tmp_path: Path) -> None:
    again, _ = await open_tenant("salt-of-a", f"/kvstore-tenants-{tmp_path.name}")
    try:
        assert (await again.lookup(A_PROMPT)).chunk_tiers == ("shared",) * 4
    finally:
        await again.close()


async def test_b_cannot_list_a(tenants: Tenants) -> None:
    shared = [tier.entries for tier in tenants.b.scope_stats().tiers]
    assert shared == [2, 2]  # B's own chunks only
    moved = await tenants.b.move("shared", "cpu")
    assert moved.chunks == 2  # a tier-wide move sees B's chunks only
    entries = [entry.key async for entry in tenants.shared_b.inner.list()]
    assert len(entries) == 6  # the tier itself holds both tenants' chunks


async def test_b_cannot_pin_a(tenants: Tenants) -> None:
    assert await tenants.b.pin(A_PROMPT) == 0
    assert tenants.b.stats().pinned_chunks == 0


async def test_b_cannot_clear_a(tenants: Tenants) -> None:
    deleted = await tenants.b.clear()  # a salted store clears its own tenant by default
    assert deleted == 4  # B's 2 chunks in each tier
    assert (await tenants.b.lookup(B_PROMPT)).tokens == 0
    await tenants.a.clear("cpu")
    assert (await tenants.a.lookup(A_PROMPT)).chunk_tiers == ("shared",) * 4


async def test_b_cannot_probe_a(tenants: Tenants) -> None:
    """B's lookup of A's prompt is a miss that does exactly the work of any miss."""
    calls = tenants.shared_b.calls
    before = dict(calls)
    probe = await tenants.b.lookup(A_PROMPT)
    after_probe = dict(calls)
    unseen = await tenants.b.lookup(UNSEEN)
    after_unseen = dict(calls)
    assert probe == unseen
    probe_calls = {op: n - before.get(op, 0) for op, n in after_probe.items()}
    unseen_calls = {op: n - after_probe.get(op, 0) for op, n in after_unseen.items()}
    probe_calls = {op: n for op, n in probe_calls.items() if n}
    unseen_calls = {op: n for op, n in unseen_calls.items() if n}
    assert probe_calls == unseen_calls == {"contains_many": 1}
    a_counters = tenants.a.scope_stats().counters
    assert (a_counters.lookups, a_counters.retrieves) == (0, 0)  # B's probes are not A's
    b_counters = tenants.b.scope_stats().counters
    assert (b_counters.lookups, b_counters.hit_tokens) == (2, 0)


# ---------------------------------------------------------------- control API

ALPHA_TOKEN = "alpha-token-abcdef"
BETA_TOKEN = "beta-token-abcdef"
ADMIN_TOKEN = "admin-token-abcdef"
ALPHA = dataclasses.replace(NAMESPACE, tenant="alpha-salt")
BETA = dataclasses.replace(NAMESPACE, tenant="beta-salt")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    """A server with tenants alpha and beta; its nvme tier holds a prompt of
    alpha's, one of beta's and one of the store's own (no tenant)."""
    directory = tmp_path_factory.mktemp("tenants")
    config: dict[str, Any] = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://?capacity=16MiB", "name": "cpu"},
            {"url": f"nvme://{directory}/nvme?capacity=64MiB", "name": "nvme"},
        ],
        "control": {
            "token": ADMIN_TOKEN,
            "tenants": [
                {"name": "alpha", "token": ALPHA_TOKEN, "salt": ALPHA.tenant},
                {"name": "beta", "token": BETA_TOKEN, "salt": BETA.tenant},
            ],
        },
    }
    with KVStore.open(StoreConfig.parse(config), NAMESPACE) as store:
        store.scoped(ALPHA).store(A_PROMPT, A_KV)
        store.scoped(BETA).store(B_PROMPT, B_KV)
        store.store(UNSEEN, A_KV)
        store.flush()
    with ControlProcess(directory / "server", config, [NAMESPACE]) as process:
        yield process


def client(server: ControlProcess, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def finished(http: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    return job


def test_tenants_read_only_their_own(server: ControlProcess) -> None:
    with client(server, ALPHA_TOKEN) as alpha, client(server, BETA_TOKEN) as beta:
        assert alpha.post("/v1/lookup", json={"tokens": A_PROMPT}).json()["tokens"] == 4 * CHUNK
        probe = beta.post("/v1/lookup", json={"tokens": A_PROMPT}).json()
        miss = beta.post("/v1/lookup", json={"tokens": prompt(3, 4 * CHUNK)[0]}).json()
        assert (
            probe == miss == {"model": "test-model", "tokens": 0, "chunk_tokens": 16, "chunks": []}
        )
        assert beta.post("/v1/lookup", json={"tokens": UNSEEN}).json()["tokens"] == 0
        denied = beta.post("/v1/lookup", json={"tokens": A_PROMPT, "tenant": "alpha"})
        assert denied.status_code == 403


def test_tenants_list_and_count_only_their_own(server: ControlProcess) -> None:
    with client(server, ALPHA_TOKEN) as alpha, client(server, BETA_TOKEN) as beta:
        alpha_before = alpha.get("/v1/stats").json()
        for _ in range(3):
            beta.post("/v1/lookup", json={"tokens": A_PROMPT})
        alpha_after = alpha.get("/v1/stats").json()
        assert alpha_after["counters"] == alpha_before["counters"]  # beta's probes are not seen
        beta_stats = beta.get("/v1/stats").json()
        assert beta_stats["scope"] == "tenant"
        assert [tier["entries"] for tier in beta_stats["tiers"]] == [0, 2]
        assert beta_stats["counters"]["hit_tokens"] == 0
        assert beta_stats["tiers"][1]["hits"] is None  # tier-wide counters are the admin's
        assert beta_stats["queued_bytes"] is None
    with client(server, ADMIN_TOKEN) as admin:
        assert [tier["entries"] for tier in admin.get("/v1/stats").json()["tiers"]] == [0, 10]


def test_tenants_pin_only_their_own(server: ControlProcess) -> None:
    with client(server, BETA_TOKEN) as beta, client(server, ALPHA_TOKEN) as alpha:
        assert beta.post("/v1/pin", json={"tokens": A_PROMPT}).json() == {"chunks": 0}
        assert alpha.post("/v1/pin", json={"tokens": A_PROMPT, "ttl_s": 30}).json() == {"chunks": 4}
        assert beta.get("/v1/stats").json()["pinned_chunks"] == 0
        assert alpha.get("/v1/stats").json()["pinned_chunks"] == 4
        assert beta.post("/v1/unpin", json={"tokens": A_PROMPT}).json() == {"chunks": 0}
        assert alpha.post("/v1/unpin", json={"tokens": A_PROMPT}).json() == {"chunks": 4}


def test_tenants_see_only_their_own_jobs(server: ControlProcess) -> None:
    with client(server, ALPHA_TOKEN) as alpha, client(server, BETA_TOKEN) as beta:
        job = alpha.post("/v1/compress", json={"tier": "nvme", "codecs": "lz4"}).json()
        assert beta.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert beta.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert job["id"] not in [entry["id"] for entry in beta.get("/v1/jobs").json()["jobs"]]
        done = finished(alpha, job)
        assert done["state"] == "succeeded"
        assert done["total_chunks"] == 4  # alpha's chunks only
    with client(server, ADMIN_TOKEN) as admin:
        assert admin.get(f"/v1/jobs/{job['id']}").json()["tenant"] == "alpha"


def test_tenants_clear_only_their_own(server: ControlProcess) -> None:
    with client(server, BETA_TOKEN) as beta:
        assert beta.post("/v1/clear", json={"scope": "all"}).status_code == 403
        job = finished(beta, beta.post("/v1/clear", json={}).json())
        assert (job["state"], job["result"]) == ("succeeded", {"deleted": 2})
        assert beta.post("/v1/lookup", json={"tokens": B_PROMPT}).json()["tokens"] == 0
    with client(server, ALPHA_TOKEN) as alpha, client(server, ADMIN_TOKEN) as admin:
        assert alpha.post("/v1/lookup", json={"tokens": A_PROMPT}).json()["tokens"] == 4 * CHUNK
        assert admin.post("/v1/lookup", json={"tokens": UNSEEN}).json()["tokens"] == 4 * CHUNK
