"""The SGLang HiCache storage backend, against SGLang's own storage code.

SGLang 0.5.23 is installed with ``pip --no-deps --target`` into a cache
directory (its own dependencies would replace torch). Its storage modules
(``HiCacheStorage``, ``HiCacheStorageConfig``, ``HiCacheStorageExtraInfo`` and
``StorageBackendFactory``, which loads ``--hicache-storage-backend dynamic``
backends) are SGLang's code, unchanged. SGLang's host memory pool classes
cannot be imported without its GPU stack, so ``MHAHostPool``/``MLAHostPool``
allocate buffers with SGLang's shapes and run SGLang's own page methods
(``get_data_page``, ``set_from_flat_data_page``, ``get_dummy_flat_data_page``),
read from the wheel's ``pool_host/mha.py`` and ``mla.py``.

In this process the top-level ``sglang/__init__`` is not run (it patches
transformers process-wide and needs the server's dependencies): ``sglang`` is
a bare package over the wheel's directory. ``test_under_a_full_sglang_import``
reruns the core tests in a child process that does ``import sglang`` for real.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from redis_server import RedisServer, redis_available

from kvstore.connectors.stores import shared_stores
from kvstore.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidKeyError,
    NotSupportedError,
)
from kvstore.sync import shared_loop

SGLANG_VERSION = "0.5.23"
# What ``import sglang`` needs beyond this project's dependencies, none of them GPU code.
SGLANG_IMPORT_DEPS = (
    "psutil==7.2.2",
    "pybase64==1.5.1",
    "pillow==13.0.0",
    "msgspec==0.23.0",
    "pyzmq==27.3.0",
    "orjson==3.13.0",
    "ipython==9.18.1",
    "traitlets==5.16.1",
)
FULL_IMPORT = os.environ.get("KVSTORE_TEST_SGLANG_FULL_IMPORT") == "1"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvstore-tests"


def pip_target(name: str, requirements: tuple[str, ...]) -> Path:
    """``requirements`` installed with ``pip --no-deps --target`` into a cached directory.

    The directory's name carries a digest of ``requirements``, so a changed list
    is installed afresh instead of reusing an older directory.
    """
    digest = hashlib.blake2b("\n".join(requirements).encode(), digest_size=6).hexdigest()
    target = _cache_dir() / f"{name}-{digest}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=target.parent))
    try:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
        subprocess.run(
            [*pip, str(staging), *requirements],
            check=True,
            timeout=900,
        )
        (staging / ".complete").touch()
        staging.rename(target)
    except OSError:
        if not (target / ".complete").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


SGLANG_HOME = pip_target(f"sglang-{SGLANG_VERSION}", (f"sglang=={SGLANG_VERSION}",))
if FULL_IMPORT:
    import sglang  # noqa: F401  (the real package init, as in an SGLang server)
elif "sglang" not in sys.modules:
    _spec = importlib.machinery.ModuleSpec("sglang", None, is_package=True)
    _spec.submodule_search_locations = [str(SGLANG_HOME / "sglang")]
    sys.modules["sglang"] = importlib.util.module_from_spec(_spec)

from sglang.srt.mem_cache.hicache_storage import (  # noqa: E402
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from kvstore.connectors.sglang import KVStoreHiCacheStorage  # noqa: E402

# ------------------------------------------------------------------ host pools


def sglang_methods(module: str, class_name: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Methods of one of SGLang's classes, compiled from the installed wheel's source."""
    path = SGLANG_HOME / "sglang" / "srt" / "mem_cache" / "pool_host" / module
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    functions = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(f.name for f in functions) == sorted(names), f"{class_name} changed"
    code = compile(
        ast.Module(body=list(functions), type_ignores=[]),
        str(path),
        "exec",
        flags=annotations.compiler_flag,  # SGLang's modules postpone annotations too
        dont_inherit=True,
    )
    namespace: dict[str, Any] = {"torch": torch}
    exec(code, namespace)
    return {name: namespace[name] for name in names}


PAGE_METHODS = ("get_data_page", "get_dummy_flat_data_page", "set_from_flat_data_page")
MHA_METHODS = sglang_methods("mha.py", "MHATokenToKVPoolHost", PAGE_METHODS)
MLA_METHODS = sglang_methods(
    "mla.py", "MLATokenToKVPoolHost", (*PAGE_METHODS, "_storage_page_index")
)

LAYERS, HEADS, HEAD_DIM, LATENT_DIM, PAGE, PAGES = 3, 2, 16, 24, 4, 24


class MHAHostPool:
    """An MHA host KV pool with SGLang's buffer shapes (``MHATokenToKVPoolHost.init_kv_buffer``)."""

    get_data_page = MHA_METHODS["get_data_page"]
    get_dummy_flat_data_page = MHA_METHODS["get_dummy_flat_data_page"]
    set_from_flat_data_page = MHA_METHODS["set_from_flat_data_page"]

    def __init__(self, layout: str, seed: int, heads: int = HEADS) -> None:
        self.layout, self.page_size, self.page_num = layout, PAGE, PAGES
        self.layer_num, self.head_num, self.head_dim = LAYERS, heads, HEAD_DIM
        self.size = PAGES * PAGE
        self.dtype, self.device, self.pin_memory = torch.float16, "cpu", False
        L, H, D, P, N = LAYERS, heads, HEAD_DIM, PAGE, PAGES
        dims = {
            "layer_first": (2, L, N * P, H, D),
            "page_first": (2, N * P, L, H, D),
            "page_first_direct": (2, N, L, P, H, D),
            "page_head": (2, N, H, P, L, D),
            "page_unified": (N, 2 * L * P * H * D),
        }[layout]
        generator = torch.Generator().manual_seed(seed)
        self.kv_buffer = torch.randn(dims, generator=generator).to(self.dtype)

    def token(self, p: int) -> torch.Tensor:
        """K and V of host token ``p``, ``[layers, 2, heads, dim]``, read by hand."""
        P = self.page_size
        b = self.kv_buffer
        per_layer = {
            "layer_first": lambda kv, layer: b[kv, layer, p],
            "page_first": lambda kv, layer: b[kv, p, layer],
            "page_first_direct": lambda kv, layer: b[kv, p // P, layer, p % P],
            "page_head": lambda kv, layer: b[kv, p // P, :, p % P, layer],
        }[self.layout]
        return torch.stack(
            [torch.stack([per_layer(kv, layer) for kv in (0, 1)]) for layer in range(LAYERS)]
        )


class MLAHostPool:
    """An MLA host KV pool with SGLang's buffer shapes (``MLATokenToKVPoolHost.init_kv_buffer``)."""

    get_data_page = MLA_METHODS["get_data_page"]
    get_dummy_flat_data_page = MLA_METHODS["get_dummy_flat_data_page"]
    set_from_flat_data_page = MLA_METHODS["set_from_flat_data_page"]
    _storage_page_index = MLA_METHODS["_storage_page_index"]
    dcp_size = 1

    def __init__(self, layout: str, seed: int) -> None:
        self.layout, self.page_size, self.page_num = layout, PAGE, PAGES
        self.layer_num, self.kv_cache_dim = LAYERS, LATENT_DIM
        self.size = PAGES * PAGE
        self.dtype, self.device, self.pin_memory = torch.bfloat16, "cpu", False
        L, C, P, N = LAYERS, LATENT_DIM, PAGE, PAGES
        dims = {
            "layer_first": (L, N * P, 1, C),
            "page_first": (N * P, L, 1, C),
            "page_first_direct": (N, L, P, 1, C),
        }[layout]
        generator = torch.Generator().manual_seed(seed)
        self.kv_buffer = torch.randn(dims, generator=generator).to(self.dtype)

    def token(self, p: int) -> torch.Tensor:
        """The latent of host token ``p``, ``[layers, 1, 1, dim]``, read by hand."""
        P = self.page_size
        b = self.kv_buffer
        per_layer = {
            "layer_first": lambda layer: b[layer, p],
            "page_first": lambda layer: b[p, layer],
            "page_first_direct": lambda layer: b[p // P, layer, p % P],
        }[self.layout]
        return torch.stack([per_layer(layer) for layer in range(LAYERS)]).unsqueeze(1)


MXFP8_METHODS = sglang_methods(
    "mha_mxfp8.py", "MHATokenToKVPoolMXFP8Host", ("get_data_page", "_storage_pages_unsupported")
)


class MXFP8HostPool(MHAHostPool):
    """SGLang's MXFP8 pool keeps scales outside its pages: its page methods refuse."""

    get_data_page = MXFP8_METHODS["get_data_page"]
    _storage_pages_unsupported = MXFP8_METHODS["_storage_pages_unsupported"]


HostPool = MHAHostPool | MLAHostPool


def host_indices(pages: list[int]) -> torch.Tensor:
    """Host token indices of whole pages, as SGLang's controller passes them."""
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


def page_hashes(seed: str, count: int) -> list[str]:
    """Chained page hashes shaped like SGLang's (sha256 hex, each over the one before)."""
    hashes: list[str] = []
    prior = seed.encode()
    for page in range(count):
        prior = hashlib.sha256(prior + page.to_bytes(4, "little")).digest()
        hashes.append(prior.hex())
    return hashes


def same_tokens(a: HostPool, a_pages: list[int], b: HostPool, b_pages: list[int]) -> bool:
    """Whether pages ``a_pages`` of ``a`` hold the KV of pages ``b_pages`` of ``b``."""
    return all(
        torch.equal(a.token(pa * PAGE + t), b.token(pb * PAGE + t))
        for pa, pb in zip(a_pages, b_pages, strict=True)
        for t in range(PAGE)
    )


# -------------------------------------------------------------------- backends

DYNAMIC = {
    "backend_name": "kvstore",
    "module_path": "kvstore.connectors.sglang",
    "class_name": "KVStoreHiCacheStorage",
    "interface_v1": 1,
}


def storage_config(
    config: Any,
    *,
    mla: bool = False,
    tp: tuple[int, int] = (0, 1),
    pp: tuple[int, int] = (0, 1),
    model: str = "test-org/tiny-llama",
    **extra: Any,
) -> HiCacheStorageConfig:
    """The config SGLang's cache controller builds, with the dynamic backend's extra config.

    ``model`` is no checkpoint on disk, so a ``model_revision`` is given unless
    ``extra`` sets one (``None``: leave it out and fingerprint the weights).
    """
    extra = {"model_revision": "tiny-llama-rev1", **extra}
    if extra["model_revision"] is None:
        del extra["model_revision"]
    return HiCacheStorageConfig(
        tp_rank=tp[0],
        tp_size=tp[1],
        pp_rank=pp[0],
        pp_size=pp[1],
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name=model,
        extra_config={**DYNAMIC, "config": config, **extra},
    )


Attach = Callable[..., KVStoreHiCacheStorage]


@pytest.fixture
def attach() -> Iterator[Attach]:
    """Build backends as SGLang's controller attaches storage: the factory, then
    ``register_mem_pool_host``; closed at the end of the test."""
    made: list[KVStoreHiCacheStorage] = []

    def make(pool: HostPool, store: Any, **options: Any) -> KVStoreHiCacheStorage:
        config = storage_config(store, mla=isinstance(pool, MLAHostPool), **options)
        backend = StorageBackendFactory.create_backend("dynamic", config, pool)
        made.append(backend)
        backend.register_mem_pool_host(pool)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def local_tiers(tmp_path: Path) -> list[str]:
    return ["cpu://?capacity=4MiB", f"nvme://{tmp_path}/nvme?capacity=16MiB"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_tiers(redis_server: RedisServer, tmp_path: Path) -> Path:
    """A YAML store config: a CPU tier over the shared Redis tier, emptied first."""
    with redis_server.client() as client:
        client.flushall()
    path = tmp_path / "kvstore.yaml"
    tiers = [{"url": "cpu://?capacity=4MiB"}, {"url": redis_server.url(), "max_bytes": "64MiB"}]
    path.write_text(yaml.safe_dump({"tiers": tiers}))
    return path


# ----------------------------------------------------------------------- tests


def test_the_dynamic_factory_builds_it(attach: Attach, local_tiers: list[str]) -> None:
    backend = attach(MHAHostPool("page_first", seed=0), local_tiers)
    assert isinstance(backend, HiCacheStorage)
    assert isinstance(backend, KVStoreHiCacheStorage)
    layout = backend.store.async_store.layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (LAYERS, HEADS, HEAD_DIM)
    assert backend.store.async_store.chunk_tokens == PAGE


def test_v1_stores_and_loads_pages_in_host_memory(attach: Attach, local_tiers: list[str]) -> None:
    pool = MHAHostPool("page_first", seed=1)
    backend = attach(pool, local_tiers)
    keys = page_hashes("v1", 6)
    source, target = [3, 1, 5, 0, 2, 4], [12, 8, 20, 9, 15, 11]
    info = HiCacheStorageExtraInfo(prefix_keys=[])
    assert backend.batch_set_v1(keys, host_indices(source), info) == [True] * 6
    assert backend.batch_exists(keys, info) == 6
    assert not same_tokens(pool, source, pool, target)
    assert backend.batch_get_v1(keys, host_indices(target), info) == [True] * 6
    for s, t in zip(source, target):
        assert torch.equal(pool.get_data_page(s * PAGE), pool.get_data_page(t * PAGE))


def test_exists_counts_leading_pages(attach: Attach, local_tiers: list[str]) -> None:
    pool = MHAHostPool("layer_first", seed=2)
    backend = attach(pool, local_tiers)
    keys = page_hashes("exists", 6)
    assert backend.batch_exists(keys) == 0
    assert all(backend.batch_set_v1(keys[:3], host_indices([0, 1, 2])))
    assert all(backend.batch_set_v1(keys[4:5], host_indices([4])))
    assert backend.batch_exists(keys) == 3
    assert backend.exists(keys[4]) and not backend.exists(keys[3])
    assert backend.batch_exists([]) == 0
    assert (
        backend.batch_get_v1(keys, host_indices([10, 11, 12, 13, 14, 15]))
        == [True] * 3 + [False] * 3
    )


def test_flat_pages_round_trip(attach: Attach, local_tiers: list[str]) -> None:
    """The non-zero-copy interface: SGLang's get_data_page pages in, set_from_flat_data_page out."""
    pool = MHAHostPool("page_head", seed=3)
    backend = attach(pool, local_tiers)
    keys = page_hashes("flat", 4)
    assert backend.batch_set(keys[:3], [pool.get_data_page(p * PAGE) for p in (0, 1, 2)])
    pages = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert [page is None for page in pages] == [False, False, False, True]
    for source, target, page in zip((0, 1, 2), (20, 21, 22), pages):
        assert page is not None
        pool.set_from_flat_data_page(target * PAGE, page)
        assert same_tokens(pool, [source], pool, [target])
    single = backend.get(keys[1])
    assert single is not None and torch.equal(single, pool.get_data_page(1 * PAGE))
    assert backend.set(keys[3], pool.get_data_page(3 * PAGE)) and backend.exists(keys[3])


@pytest.mark.parametrize(
    ("pool_type", "writer", "reader"),
    [
        (MHAHostPool, "layer_first", "page_first"),
        (MHAHostPool, "page_first", "layer_first"),
        (MHAHostPool, "page_first_direct", "page_head"),
        (MHAHostPool, "page_head", "page_first_direct"),
        (MLAHostPool, "layer_first", "page_first"),
        (MLAHostPool, "page_first", "page_first_direct"),
        (MLAHostPool, "page_first_direct", "layer_first"),
    ],
)
def test_engines_with_other_memory_layouts_share_pages(
    attach: Attach, tmp_path: Path, pool_type: type[HostPool], writer: str, reader: str
) -> None:
    """Pages persist on NVMe in kvstore's layout: another engine reads them into its own."""
    tiers = f"nvme://{tmp_path}/nvme?capacity=16MiB"
    keys = page_hashes("layouts", 5)
    written = pool_type(writer, seed=4)
    first = attach(written, tiers)
    assert all(first.batch_set_v1(keys, host_indices([0, 1, 2, 3, 4])))
    first.close()
    read = pool_type(reader, seed=5)
    second = attach(read, tiers)
    assert second.batch_exists(keys) == 5
    assert second.batch_get_v1(keys, host_indices([7, 9, 11, 13, 15])) == [True] * 5
    assert same_tokens(written, [0, 1, 2, 3, 4], read, [7, 9, 11, 13, 15])


def test_engines_share_pages_through_redis(attach: Attach, redis_tiers: Path) -> None:
    producer_pool, consumer_pool = MHAHostPool("page_first", 6), MHAHostPool("page_first", 7)
    producer = attach(producer_pool, str(redis_tiers))
    consumer = attach(consumer_pool, str(redis_tiers))
    keys = page_hashes("redis", 8)
    assert all(producer.batch_set_v1(keys, host_indices(list(range(8)))))
    producer.store.flush()
    assert consumer.batch_exists(keys) == 8
    assert consumer.batch_get_v1(keys, host_indices(list(range(10, 18)))) == [True] * 8
    assert same_tokens(producer_pool, list(range(8)), consumer_pool, list(range(10, 18)))
    # the consumer's own CPU tier now holds them too (promoted from Redis)
    consumer.store.flush()
    assert consumer.store.locate(consumer.keys(keys)) == ("0:cpu",) * 8


def test_keys_follow_sglang_sharding(attach: Attach, redis_tiers: Path) -> None:
    """MHA ranks own their heads; MLA KV is the same on every TP rank; PP stages differ."""
    keys = page_hashes("ranks", 3)
    pages = host_indices([0, 1, 2])
    mha = [attach(MHAHostPool("page_first", 8 + r, 1), str(redis_tiers), tp=(r, 2)) for r in (0, 1)]
    assert all(mha[0].batch_set_v1(keys, pages))
    mha[0].store.flush()
    assert (mha[0].batch_exists(keys), mha[1].batch_exists(keys)) == (3, 0)

    mla_pools = [MLAHostPool("page_first", 10), MLAHostPool("page_first", 11)]
    mla = [attach(pool, str(redis_tiers), tp=(r, 2)) for r, pool in enumerate(mla_pools)]
    assert all(mla[0].batch_set_v1(keys, pages))
    mla[0].store.flush()
    assert mla[1].batch_exists(keys) == 3
    assert all(mla[1].batch_get_v1(keys, host_indices([5, 6, 7])))
    assert same_tokens(mla_pools[0], [0, 1, 2], mla_pools[1], [5, 6, 7])

    stage = attach(MLAHostPool("page_first", 12), str(redis_tiers), tp=(0, 2), pp=(1, 2))
    assert stage.batch_exists(keys) == 0
    other_model = attach(MLAHostPool("page_first", 13), str(redis_tiers), model="test-org/other")
    assert other_model.batch_exists(keys) == 0


def _damage(backend: KVStoreHiCacheStorage, key: str, tiers: list[int]) -> None:
    """Flip one payload byte of a stored page in the given tiers, through their drivers."""
    (storage_key,) = backend.keys([key])
    loop = shared_loop()
    for position in tiers:
        driver = backend.store.tiers[position].driver
        (value,) = loop.run(driver.get_many([storage_key]))
        assert value is not None
        damaged = bytearray(value)
        damaged[-1] ^= 0xFF
        loop.run(driver.put_many([(storage_key, bytes(damaged))]))


def test_a_corrupt_page_is_a_miss(attach: Attach, local_tiers: list[str]) -> None:
    pool = MHAHostPool("page_first", seed=14)
    # The cpu arena is in-process memory, not re-verified unless asked: ask, to damage it.
    backend = attach(pool, [{"url": local_tiers[0], "verify": True}, local_tiers[1]])
    keys = page_hashes("corrupt", 4)
    assert all(backend.batch_set_v1(keys, host_indices([0, 1, 2, 3])))
    backend.store.flush()

    _damage(backend, keys[1], [0])  # the CPU copy only: NVMe still has a good one
    assert backend.batch_get_v1(keys, host_indices([4, 5, 6, 7])) == [True] * 4
    assert same_tokens(pool, [0, 1, 2, 3], pool, [4, 5, 6, 7])

    backend.store.flush()
    _damage(backend, keys[2], [0, 1])  # every copy
    assert backend.batch_get_v1(keys, host_indices([8, 9, 10, 11])) == [True, True, False, False]
    assert same_tokens(pool, [0, 1], pool, [8, 9])
    assert backend.batch_exists(keys) == 2  # the bad copies were dropped
    assert backend.batch_get(keys[2:3]) == [None]


def test_concurrent_batches(attach: Attach, redis_tiers: Path) -> None:
    """SGLang's prefetch and backup threads call the backend at the same time."""
    pool = MHAHostPool("page_first_direct", seed=15)
    backend = attach(pool, str(redis_tiers))
    keys = page_hashes("threads", 12)

    def round_trip(worker: int) -> bool:
        mine = keys[worker * 3 : worker * 3 + 3]
        source = [worker * 3 + i for i in range(3)]
        target = [12 + s for s in source]
        stored = backend.batch_set_v1(mine, host_indices(source))
        loaded = backend.batch_get_v1(mine, host_indices(target))
        return all(stored) and all(loaded) and same_tokens(pool, source, pool, target)

    with ThreadPoolExecutor(max_workers=4) as threads:
        assert all(threads.map(round_trip, range(4)))
    assert backend.batch_exists(keys) == 12


def test_configuration(attach: Attach, tmp_path: Path, local_tiers: list[str]) -> None:
    pool = MHAHostPool("layer_first", seed=16)
    yaml_path = tmp_path / "store.yaml"
    yaml_path.write_text(yaml.safe_dump({"tiers": local_tiers, "tenant": "team-a"}))
    backend = attach(pool, str(yaml_path), model_revision="abc123")
    assert backend.store.async_store.namespace.tenant == "team-a"
    assert backend.store.async_store.namespace.revision == "abc123"
    assert attach(pool, local_tiers[0]).store.async_store.chunk_tokens == PAGE

    config = storage_config(local_tiers)
    assert config.extra_config is not None
    del config.extra_config["config"]
    with pytest.raises(ConfigError, match="needs config"):
        StorageBackendFactory.create_backend("dynamic", config, pool)
    for wrong in (None, 42, [], [3]):
        with pytest.raises(ConfigError, match="YAML path, a tier URL"):
            StorageBackendFactory.create_backend("dynamic", storage_config(wrong), pool)
    with pytest.raises(ConfigError, match="model_revision"):
        StorageBackendFactory.create_backend(
            "dynamic", storage_config(local_tiers, model_revision=1), pool
        )

    other_chunks = tmp_path / "chunks.yaml"
    other_chunks.write_text(yaml.safe_dump({"tiers": local_tiers[:1], "chunk_tokens": 256}))
    with pytest.raises(ConfigError, match="chunk_tokens=256"):
        attach(pool, str(other_chunks))
    with pytest.raises(NotSupportedError, match="page_unified"):
        attach(MHAHostPool("page_unified", seed=17), local_tiers)
    with pytest.raises(NotSupportedError, match="no plain KV pages"):
        attach(MXFP8HostPool("page_first", seed=17), local_tiers)
    mla_pool = MLAHostPool("page_first", seed=17)
    as_mha = StorageBackendFactory.create_backend("dynamic", storage_config(local_tiers), mla_pool)
    with pytest.raises(NotSupportedError, match="not the MHA page layout"):
        as_mha.register_mem_pool_host(mla_pool)
    split = storage_config(local_tiers)
    split.should_split_heads = True
    with pytest.raises(NotSupportedError, match="head splitting"):
        StorageBackendFactory.create_backend("dynamic", split, pool)
    unregistered = StorageBackendFactory.create_backend(
        "dynamic", storage_config(local_tiers), pool
    )
    with pytest.raises(InvalidArgumentError, match="not registered"):
        unregistered.batch_exists(page_hashes("x", 1))


def checkpoint(directory: Path, weights: bytes) -> Path:
    """A tiny local checkpoint: a config and one weight file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def test_weights_are_fingerprinted_by_default(attach: Attach, tmp_path: Path) -> None:
    """Without a model_revision the namespace binds a digest of the checkpoint: the
    same checkpoint shares pages, a changed one under the same name never does."""
    nvme = [f"nvme://{tmp_path}/nvme?capacity=16MiB"]
    model = str(checkpoint(tmp_path / "tiny-llama", b"weights v1"))
    keys, pages = page_hashes("weights", 3), host_indices([0, 1, 2])
    pool = MHAHostPool("page_first", seed=30)
    first = attach(pool, nvme, model=model, model_revision=None)
    assert first.revision.startswith("blake3:")
    assert all(first.batch_set_v1(keys, pages))
    first.close()

    same_pool = MHAHostPool("page_first", seed=31)
    same = attach(same_pool, nvme, model=model, model_revision=None)
    assert same.revision == first.revision
    assert same.batch_get_v1(keys, host_indices([5, 6, 7])) == [True] * 3
    assert same_tokens(pool, [0, 1, 2], same_pool, [5, 6, 7])
    same.close()

    (tmp_path / "tiny-llama" / "model.safetensors").write_bytes(b"weights v2")
    changed_pool = MHAHostPool("page_first", seed=32)
    changed = attach(changed_pool, nvme, model=model, model_revision=None)
    assert changed.revision != first.revision
    assert changed.batch_exists(keys) == 0
    assert changed.batch_get_v1(keys, host_indices([5, 6, 7])) == [False] * 3
    assert not same_tokens(pool, [0, 1, 2], changed_pool, [5, 6, 7])
    changed.close()

    other = str(checkpoint(tmp_path / "other-llama", b"weights v1 but elsewhere, retrained"))
    served = attach(
        MHAHostPool("page_first", seed=33),
        nvme,
        model="tiny-llama",
        model_revision=None,
        model_path=other,
    )
    assert served.store.async_store.namespace.model == "tiny-llama"
    assert served.revision not in (first.revision, changed.revision)
    assert served.batch_exists(keys) == 0


def test_unfingerprintable_weights_refuse_to_start(tmp_path: Path) -> None:
    pool = MHAHostPool("page_first", seed=34)
    tiers = ["cpu://?capacity=4MiB"]
    not_cached = storage_config(tiers, model="no-such-org/no-such-model", model_revision=None)
    with pytest.raises(ConfigError, match=r"give model_revision .* or model_path"):
        StorageBackendFactory.create_backend("dynamic", not_cached, pool)
    (tmp_path / "empty").mkdir()
    no_weights = storage_config(tiers, model_revision=None, model_path=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no weight files"):
        StorageBackendFactory.create_backend("dynamic", no_weights, pool)


def test_config_forms_and_the_old_option_name(attach: Attach, tmp_path: Path) -> None:
    """``config`` takes tier mappings and whole store configs like every connector;
    ``kvstore_config`` still works for one release, with a DeprecationWarning."""
    pool = MHAHostPool("page_first", seed=35)
    mapped = attach(pool, [{"url": "cpu://?capacity=4MiB", "name": "hot"}])
    assert [tier.name for tier in mapped.store.tiers] == ["hot"]
    whole = attach(pool, {"tiers": ["cpu://?capacity=4MiB"], "tenant": "team-b"})
    assert whole.store.async_store.namespace.tenant == "team-b"
    quantized = attach(pool, [{"url": "cpu://?capacity=4MiB", "codecs": "int8"}])
    assert quantized.store.async_store.namespace.codec == "int8"
    keys = page_hashes("int8", 2)
    assert all(quantized.batch_set_v1(keys, host_indices([0, 1])))
    assert quantized.batch_get_v1(keys, host_indices([4, 5])) == [True, True]

    old = storage_config(None, kvstore_config="cpu://?capacity=4MiB")
    assert old.extra_config is not None
    del old.extra_config["config"]
    with pytest.warns(DeprecationWarning, match="kvstore_config .* now called config"):
        backend = StorageBackendFactory.create_backend("dynamic", old, pool)
    backend.register_mem_pool_host(pool)
    assert backend.store.async_store.chunk_tokens == PAGE
    backend.close()
    both = storage_config("cpu://?capacity=4MiB", kvstore_config="cpu://?capacity=4MiB")
    with pytest.raises(ConfigError, match="not both"):
        StorageBackendFactory.create_backend("dynamic", both, pool)


def test_the_first_rank_serves_the_control_api(attach: Attach) -> None:
    """Every rank would listen on the same port: rank 0 starts the control server."""
    config = {"tiers": ["cpu://?capacity=4MiB"], "control": {"enabled": True, "port": 0}}
    ranks = [attach(MHAHostPool("page_first", 40 + r), config, tp=(r, 2)) for r in (0, 1)]
    server = shared_stores.control(ranks[0].store)
    assert server is not None
    assert shared_stores.control(ranks[1].store) is None
    assert httpx.get(f"{server.url}/v1/stats", timeout=10).status_code == 200
    ranks[0].close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v1/stats", timeout=2)


def test_a_namespace_refuses_other_keys(attach: Attach, local_tiers: list[str]) -> None:
    ours = attach(MHAHostPool("page_first", 20), local_tiers[:1])
    theirs = attach(MHAHostPool("page_first", 21), local_tiers[:1], model="test-org/other")
    foreign = theirs.keys(page_hashes("foreign", 1))
    with pytest.raises(InvalidKeyError):
        ours.store.locate(foreign)
    assert ours.pages is not None
    with pytest.raises(InvalidKeyError):
        ours.store.store_chunks(foreign, [ours.pages.chunk(0)])


def test_clear_drops_this_namespace_only(attach: Attach, redis_tiers: Path) -> None:
    keys = page_hashes("clear", 2)
    ours = attach(MHAHostPool("page_first", 18), str(redis_tiers))
    theirs = attach(MHAHostPool("page_first", 19), str(redis_tiers), model="test-org/other")
    for backend in (ours, theirs):
        assert all(backend.batch_set_v1(keys, host_indices([0, 1])))
        backend.store.flush()
    ours.clear()
    assert (ours.batch_exists(keys), theirs.batch_exists(keys)) == (0, 2)


def test_under_a_full_sglang_import(tmp_path: Path) -> None:
    """The core tests again, in a process that runs ``import sglang`` as a server does."""
    if FULL_IMPORT:
        pytest.skip("this is the full-import run")
    deps = pip_target(f"sglang-{SGLANG_VERSION}-import-deps", SGLANG_IMPORT_DEPS)
    env = {
        **os.environ,
        "KVSTORE_TEST_SGLANG_FULL_IMPORT": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, (str(SGLANG_HOME), str(deps), os.environ.get("PYTHONPATH")))
        ),
        "SGLANG_CACHE_DIR": str(tmp_path / "sglang-cache"),
    }
    selected = " or ".join(
        (
            "test_the_dynamic_factory_builds_it",
            "test_v1_stores_and_loads_pages_in_host_memory",
            "test_flat_pages_round_trip",
            "test_a_corrupt_page_is_a_miss",
        )
    )
    pytest_args = ["-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "child")]
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, *pytest_args, "-k", selected],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    assert "4 passed" in child.stdout, child.stdout[-2000:]
