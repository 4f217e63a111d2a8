"""The connector helpers: config forms, namespaces, weights fingerprints, shared
stores with their control servers, and the configuration reference."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
import yaml

from kvstore.config import StoreConfig, TierConfig
from kvstore.connectors.config import store_config, text_option
from kvstore.connectors.stores import SharedStores
from kvstore.connectors.weights import weights_revision
from kvstore.errors import ConfigError, KVStoreError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import KVStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16)
CPU = "cpu://?capacity=4MiB"
KEY_A, KEY_B = (base64.b64encode(bytes([byte]) * 32).decode() for byte in (1, 2))
DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_form_becomes_the_same_config(tmp_path: Path) -> None:
    expected = StoreConfig.from_urls(CPU)
    yaml_path = tmp_path / "store.yaml"
    yaml_path.write_text(yaml.safe_dump({"tiers": [CPU]}))
    forms: list[object] = [
        expected,
        CPU,
        [CPU],
        (CPU,),
        [{"url": CPU}],
        {"tiers": [CPU]},
        str(yaml_path),
        yaml_path,
    ]
    assert all(store_config(form) == expected for form in forms)
    mixed = store_config([CPU, {"url": f"nvme://{tmp_path}/nvme?capacity=8MiB", "name": "disk"}])
    assert [tier.name for tier in mixed.tiers] == [None, "disk"]
    whole = store_config({"tiers": [CPU], "tenant": "team-a", "chunk_tokens": 64})
    assert (whole.tenant, whole.chunk_tokens) == ("team-a", 64)


def test_wrong_forms_name_the_option() -> None:
    for wrong in (None, 3, "", [], [3], {"url": CPU}, [CPU, None]):
        with pytest.raises(ConfigError, match=r"^backend\.config must be a kvstore YAML path"):
            store_config(wrong, option="backend.config")
    with pytest.raises(ConfigError, match="cannot read store config"):
        store_config("/no/such/kvstore.yaml")
    with pytest.raises(ConfigError, match="invalid store config in config"):
        store_config({"tiers": [CPU], "chunk_tokens": 0})


def test_options_and_namespace_follow_the_config() -> None:
    assert text_option({"model_name": "m"}, "model_name") == "m"
    assert text_option({}, "model_name") == ""
    with pytest.raises(ConfigError, match="model_revision must be a string"):
        text_option({"model_revision": 3}, "model_revision")
    config = StoreConfig.from_urls(
        {"url": CPU, "codecs": "int8+zstd"}, tenant="salt", chunk_tokens=64
    )
    namespace = config.namespace(model="m", revision="r", layout=LAYOUT, tp_rank=1, tp_size=2)
    assert namespace == Namespace(
        "m", "r", LAYOUT, chunk_tokens=64, tp_rank=1, tp_size=2, codec="int8", tenant="salt"
    )


def test_weights_revision_of_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001.safetensors").write_bytes(b"one")
    first = weights_revision(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not weights")
    assert weights_revision(str(tmp_path)) == first
    (tmp_path / "model-00002.safetensors").write_bytes(b"two")
    assert weights_revision(str(tmp_path)) != first
    with pytest.raises(ConfigError, match="no model path"):
        weights_revision("")


def test_shared_stores_share_and_close_once(tmp_path: Path) -> None:
    stores = SharedStores()
    config = StoreConfig.from_urls(CPU)
    namespace = Namespace("m", "r", LAYOUT)
    first = stores.acquire(config, namespace, control=False)
    assert stores.acquire(StoreConfig.from_urls(CPU), namespace, control=False) is first
    other_revision = stores.acquire(config, Namespace("m", "r2", LAYOUT), control=False)
    secret = StoreConfig.from_urls(CPU, encryption_keys={"k": KEY_A})
    other_secret = StoreConfig.from_urls(CPU, encryption_keys={"k": KEY_B})
    keyed = stores.acquire(secret, namespace, control=False)
    assert len({id(first), id(other_revision), id(keyed)}) == 3
    other_keyed = stores.acquire(other_secret, namespace, control=False)
    assert other_keyed is not keyed

    stores.release(first)
    assert first.retrieve(list(range(256))).tokens == 0
    stores.release(first)
    with pytest.raises(KVStoreError, match="closed"):
        first.retrieve(list(range(256)))
    reopened = stores.acquire(config, namespace, control=False)
    assert reopened is not first
    for store in (reopened, other_revision, keyed, other_keyed):
        stores.release(store)
    unshared = KVStore.open(config, namespace)
    stores.release(unshared)
    with pytest.raises(KVStoreError, match="closed"):
        unshared.retrieve(list(range(256)))


def test_the_control_server_runs_once_per_shared_store() -> None:
    stores = SharedStores()
    config = StoreConfig.parse({"tiers": [CPU], "control": {"enabled": True, "port": 0}})
    namespace = Namespace("m", "r", LAYOUT)
    store = stores.acquire(config, namespace, control=False)
    assert stores.control(store) is None
    assert stores.acquire(config, namespace, control=True) is store
    server = stores.control(store)
    assert server is not None
    assert stores.acquire(config, namespace, control=True) is store
    assert stores.control(store) is server
    for _ in range(2):
        stores.release(store)
        assert httpx.get(f"{server.url}/v1/stats", timeout=10).status_code == 200
    stores.release(store)
    assert stores.control(store) is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v1/stats", timeout=2)


def test_the_configuration_reference_names_every_field() -> None:
    text = (DOCS / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))
    fields = set(StoreConfig.model_fields) | set(TierConfig.model_fields)
    assert fields <= documented, f"undocumented: {sorted(fields - documented)}"
    for page in re.findall(r"docs/[\w/.-]+\.md", text):
        assert (DOCS.parent / page).is_file(), page
    examples = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert len(examples) == 7
    for example in examples:
        StoreConfig.parse(yaml.safe_load(example), source=example.splitlines()[0])


def test_a_tiers_capacity_field_is_now_max_bytes() -> None:
    """The 0.1 name of the tier ledger still works for one release, with a warning."""
    with pytest.warns(DeprecationWarning, match="now called max_bytes"):
        old = StoreConfig.from_urls({"url": CPU, "capacity": "2MiB"})
    assert old.tiers[0].max_bytes == 2 << 20
    assert old == StoreConfig.from_urls({"url": CPU, "max_bytes": "2MiB"})
    with pytest.raises(ConfigError, match="not both"):
        StoreConfig.from_urls({"url": CPU, "capacity": "2MiB", "max_bytes": "2MiB"})
