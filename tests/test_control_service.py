"""The control API from Python: ``ControlService`` on a real store (several
namespaces, text lookups with a local tokenizer, tenants), and the server a
connector starts from the store config."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch

from kvstore.config import ControlConfig, StoreConfig
from kvstore.control import ADMIN, ControlService, Principal, maybe_start_control_server
from kvstore.control.models import (
    ClearRequest,
    LookupRequest,
    MoveRequest,
    PinRequest,
    UnpinRequest,
)
from kvstore.errors import ConfigError, NotFoundError, PermissionDeniedError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import AsyncKVStore, KVStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 4
NAMESPACE = Namespace("test-model", "rev", LAYOUT, chunk_tokens=CHUNK)
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "slept", "[UNK]"]


def config(tmp_path: Path, **control: object) -> StoreConfig:
    return StoreConfig.parse(
        {
            "chunk_tokens": CHUNK,
            "tiers": [
                {"url": "cpu://?capacity=16MiB", "name": "cpu"},
                {"url": f"nvme://{tmp_path}/nvme?capacity=64MiB", "name": "nvme"},
            ],
            "control": control,
        }
    )


def kv(tokens: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(tokens)).to(
        LAYOUT.torch_dtype
    )


def save_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer built and saved locally (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(directory)
    return directory


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncKVStore]:
    opened = await AsyncKVStore.open(config(tmp_path), NAMESPACE)
    yield opened
    await opened.close()


async def test_namespaces_by_name(store: AsyncKVStore) -> None:
    other = dataclasses.replace(NAMESPACE, revision="rev2")
    service = ControlService(store, namespaces={"test-model@rev2": other})
    ids = list(range(3 * CHUNK))
    await store.scoped(other).store(ids, kv(len(ids)))
    own = await service.lookup(LookupRequest(tokens=ids))
    assert (own.model, own.tokens) == ("test-model", 0)
    named = await service.lookup(LookupRequest(tokens=ids, model="test-model@rev2"))
    assert (named.model, named.tokens, named.chunks) == ("test-model@rev2", 3 * CHUNK, ["cpu"] * 3)
    pinned = await service.pin(PinRequest(tokens=ids, model="test-model@rev2", ttl_s=60))
    assert pinned.chunks == 3
    assert (await service.unpin(UnpinRequest(tokens=ids, model="test-model@rev2"))).chunks == 3
    job = await service.clear(ClearRequest(scope="namespace", model="test-model@rev2"))
    assert (await service.wait(job.id)).result == {"deleted": 6}  # 3 in each tier
    with pytest.raises(NotFoundError):
        await service.lookup(LookupRequest(tokens=ids, model="nope"))
    with pytest.raises(ConfigError):
        ControlService(
            store, namespaces={"wide": dataclasses.replace(NAMESPACE, layout=KVLayout(2, 4, 32))}
        )


async def test_lookup_by_text(store: AsyncKVStore, tmp_path: Path) -> None:
    directory = save_tokenizer(tmp_path / "tokenizer")
    service = ControlService(store, ControlConfig(tokenizers={"test-model": str(directory)}))
    text = "the cat sat on a mat and slept the cat"
    ids = [WORDS.index(word) for word in text.split()]
    await store.store(ids, kv(len(ids)))
    reply = await service.lookup(LookupRequest(text=text))
    assert (reply.tokens, reply.chunks) == (2 * CHUNK, ["cpu", "cpu"])
    job = await service.move(MoveRequest(source="cpu", target="nvme", text="the cat sat on"))
    assert (await service.wait(job.id)).result is not None


async def test_tenant_principals(store: AsyncKVStore) -> None:
    service = ControlService(
        store,
        ControlConfig(tenants=[{"name": "acme", "token": "t-acme", "salt": "acme-salt"}]),
    )
    acme = Principal("acme")
    ids = list(range(2 * CHUNK))
    await store.scoped(dataclasses.replace(NAMESPACE, tenant="acme-salt")).store(ids, kv(len(ids)))
    assert (await service.lookup(LookupRequest(tokens=ids), acme)).tokens == 2 * CHUNK
    assert (await service.lookup(LookupRequest(tokens=ids), ADMIN)).tokens == 0
    assert (await service.lookup(LookupRequest(tokens=ids, tenant="acme"), ADMIN)).tokens == 8
    with pytest.raises(PermissionDeniedError):
        await service.clear(ClearRequest(scope="all"), acme)
    with pytest.raises(NotFoundError):
        await service.lookup(LookupRequest(tokens=ids, tenant="nobody"), ADMIN)
    stats = await service.stats(acme)
    assert stats.scope == "tenant" and stats.tiers[0].entries == 2
    with pytest.raises(ConfigError, match="salts must differ"):
        ControlService(
            store,
            ControlConfig(
                tenants=[
                    {"name": "a", "token": "1", "salt": "same"},
                    {"name": "b", "token": "2", "salt": "same"},
                ]
            ),
        )


def test_connector_starts_the_configured_server(tmp_path: Path) -> None:
    with KVStore.open(config(tmp_path, enabled=True, port=0), NAMESPACE) as store:
        server = maybe_start_control_server(store)
        assert server is not None
        try:
            health = httpx.get(f"{server.url}/v1/health", timeout=10).json()
            assert health["ok"] is True
        finally:
            server.close()
    with KVStore.open(config(tmp_path, enabled=False), NAMESPACE) as store:
        assert maybe_start_control_server(store) is None
