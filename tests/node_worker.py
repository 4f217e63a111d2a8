"""Client processes of a node service for tests/test_node.py: ``node_worker.py MODE URL ARG``.

store URL SEED: store a prompt's KV (from SEED) through a store whose one tier is URL.
write URL SIZE: put values ``value_of(i, SIZE)`` under ``key_of(i)``, i = 0, 1, ...
    (modulo WRITTEN_KEYS, so the service never needs to evict), printing each i
    once its put has returned, until killed.
hold URL KEY: write a value into room the driver lends (never committed) and borrow
    KEY, print ``holding``, and wait to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import numpy as np

from kvstore.drivers.node.driver import NodeConfig, NodeDriver

if TYPE_CHECKING:
    import torch

    from kvstore.config import StoreConfig
    from kvstore.keys import Namespace

# The write and hold modes import no torch, so they start in a fraction of a second.

CHUNK_TOKENS = 16
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
HELD_ROOM = 1 << 20
WRITTEN_KEYS = 64


def namespace() -> Namespace:
    from kvstore.keys import Namespace
    from kvstore.layout import KVLayout

    layout = KVLayout(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    return Namespace(model="node-test", revision="0", layout=layout, chunk_tokens=CHUNK_TOKENS)


def store_config(url: str) -> StoreConfig:
    from kvstore.config import StoreConfig

    return StoreConfig.from_urls(url, chunk_tokens=CHUNK_TOKENS)


def prompt(seed: int, chunks: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and their KV ([layers, 2, tokens, heads, dim]), the same for a seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (chunks * CHUNK_TOKENS,), generator=generator)
    shape = (LAYERS, 2, chunks * CHUNK_TOKENS, KV_HEADS, HEAD_DIM)
    kv = torch.randn(shape, generator=generator).to(torch.float16)
    return tokens, kv


def key_of(index: int) -> bytes:
    return b"node-test-%08d" % index


def value_of(index: int, size: int) -> bytes:
    """A value whose every 8 bytes are ``index``: a torn one shows."""
    return np.full(size // 8, index, dtype=np.int64).tobytes()


def _store(url: str, seed: int) -> None:
    from kvstore.store import KVStore

    tokens, kv = prompt(seed)
    with KVStore.open(store_config(url), namespace()) as store:
        result = store.store(tokens, kv)
        store.flush()
    print(f"stored {result.written}", flush=True)


async def _write(url: str, size: int) -> None:
    driver = await NodeDriver.open(NodeConfig.from_url(url))
    index = 0
    while True:
        key = index % WRITTEN_KEYS
        await driver.put_many([(key_of(key), value_of(key, size))])
        print(key, flush=True)
        index += 1


async def _hold(url: str, key: bytes) -> None:
    driver = await NodeDriver.open(NodeConfig.from_url(url))
    await driver.put_many([(key, value_of(7, HELD_ROOM))])
    async with driver.lend_many([(b"held", HELD_ROOM)]) as (room,), driver.borrow_many([key]):
        assert room is not None
        room[:] = value_of(8, HELD_ROOM)
        print("holding", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    mode, url, argument = sys.argv[1:4]
    if mode == "store":
        _store(url, int(argument))
    elif mode == "write":
        asyncio.run(_write(url, int(argument)))
    elif mode == "hold":
        asyncio.run(_hold(url, argument.encode()))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
