"""borrow_chunks: chunks read as views of the first tier's memory, with no copy."""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_store import CHUNK, LAYOUT, NAMESPACE, config, prompt

from kvstore.conformance.faults import FaultPlan, FaultyDriver
from kvstore.errors import InvalidKeyError
from kvstore.registry import open_driver
from kvstore.store import AsyncKVStore, KVStore


def _chunks(kv: torch.Tensor) -> list[torch.Tensor]:
    return [kv[:, :, i * CHUNK : (i + 1) * CHUNK] for i in range(kv.shape[2] // CHUNK)]


async def test_the_first_tier_lends_a_prefix_that_outlives_eviction(tmp_path: Path) -> None:
    store = await AsyncKVStore.open(
        config("cpu://?capacity=16MiB", f"nvme://{tmp_path}/n?capacity=64MiB"), NAMESPACE
    )
    try:
        ids, kv = prompt(1, 4 * CHUNK)
        await store.store(ids[: 3 * CHUNK], kv[:, :, : 3 * CHUNK])
        await store.flush()
        keys = store.keys(ids)
        cpu = store.tiers[0]
        async with await store.borrow_chunks(keys) as loan:
            assert loan.tiers == (cpu.name,) * 3 and loan.tiers.tokens == 3 * CHUNK
            assert all(torch.equal(a, b) for a, b in zip(loan.chunks, _chunks(kv)))
            await store.clear(tier=cpu.name)
            assert cpu.held_bytes > 0, "the ledger counts lent chunks until the loan ends"
            other_ids, other_kv = prompt(9, 6 * CHUNK)
            assert (await store.store(other_ids, other_kv)).written == 6
            assert all(torch.equal(a, b) for a, b in zip(loan.chunks, _chunks(kv))), (
                "lent memory is not reused while the loan lasts"
            )
        assert loan.chunks == []
        assert cpu.held_bytes == 0
        await store.clear(tier=cpu.name)

        async with await store.borrow_chunks(keys) as loan:
            assert loan.chunks == [], "only the first tier lends; the rest is retrieve_chunks'"
        outs = [torch.empty_like(chunk) for chunk in _chunks(kv)]
        assert (await store.retrieve_chunks(keys, outs)).chunks == 3
        assert store.metrics.prefix_tokens["borrow_chunks"] == 3 * CHUNK
        assert store.metrics.requested_tokens["borrow_chunks"] == 8 * CHUNK
    finally:
        await store.close()


async def test_a_damaged_chunk_ends_the_lent_prefix_where_the_tier_verifies() -> None:
    store = await AsyncKVStore.open(
        config({"url": "cpu://?capacity=16MiB", "verify": True}), NAMESPACE
    )
    try:
        ids, kv = prompt(2, 3 * CHUNK)
        await store.store(ids, kv)
        keys = store.keys(ids)
        cpu = store.tiers[0]
        async with cpu.driver.borrow_many([keys[1]]) as (view,):
            assert view is not None
            address = np.frombuffer(view, dtype=np.uint8).ctypes.data
            ctypes.memset(address + len(view) - 1, 0x55, 1)  # one byte of the payload
        async with await store.borrow_chunks(keys) as loan:
            assert len(loan.chunks) == 1 and torch.equal(loan.chunks[0], kv[:, :, :CHUNK])
        assert cpu.stats.integrity_failures == 1
        assert (await store.lookup(ids)).tokens == CHUNK, "the damaged chunk was dropped"
    finally:
        await store.close()


async def test_a_driver_that_lends_nothing_lends_no_chunks() -> None:
    cpu = await open_driver("cpu://?capacity=16MiB")
    wrapped = FaultyDriver.wrap(cpu, FaultPlan(action="corrupt"))  # type: ignore[arg-type]
    store = await AsyncKVStore.open(config("cpu://?capacity=16MiB"), NAMESPACE, drivers=[wrapped])
    try:
        ids, kv = prompt(4, 2 * CHUNK)
        await store.store(ids, kv)
        async with await store.borrow_chunks(store.keys(ids)) as loan:
            assert loan.chunks == []
        assert store.tiers[0].stats.misses == 0
        assert all(key in store.tiers[0].index for key in store.keys(ids)), "nothing forgotten"
    finally:
        await store.close()


def test_the_blocking_store_lends_for_a_with_block() -> None:
    store = KVStore.open(config("cpu://?capacity=16MiB"), NAMESPACE)
    try:
        ids, kv = prompt(3, 2 * CHUNK + 5)
        store.store(ids, kv)
        with store.borrow_chunks(store.keys(ids)) as loan:
            assert len(loan.chunks) == 2
            assert loan.chunks[0].shape == LAYOUT.shape(CHUNK)
            assert torch.equal(torch.cat(loan.chunks, dim=2), kv[:, :, : 2 * CHUNK])
        with pytest.raises(InvalidKeyError):
            store.borrow_chunks([b"not a key"]).__enter__()
    finally:
        store.close()


def test_keys_hash_on_from_a_storage_key_of_this_namespace() -> None:
    store = KVStore.open(config("cpu://?capacity=16MiB"), NAMESPACE)
    other = KVStore.open(
        config("cpu://?capacity=16MiB"), dataclasses.replace(NAMESPACE, model="other-model")
    )
    try:
        ids = list(range(5 * CHUNK))
        keys = store.keys(ids)
        assert store.keys(ids[2 * CHUNK :], after=keys[1]) == keys[2:]
        with pytest.raises(InvalidKeyError):
            store.keys(ids[2 * CHUNK :], after=other.keys(ids)[1])
    finally:
        store.close()
        other.close()
