"""Timeouts: a call's buffers are the driver's until its coroutine ends, and a store
abandons a stalled call at its tier's ``timeout_s`` without waiting for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

import torch

from kvstore.config import StoreConfig
from kvstore.inflight import InflightCalls
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import AsyncKVStore
from kvstore.tier import Tier

from ..faults import FaultPlan, FaultyDriver
from ..harness import DriverHarness
from .base import DriverTestBase

T = TypeVar("T")

TIMEOUT_S = 0.3
"""The tier timeout of the stalled store."""

GRACE_S = 0.5
"""How far past ``TIMEOUT_S`` a call to a stalled tier may return."""

SETTLE_S = 30.0
"""How long the abandoned calls may take to end once the stall is over."""

CANCEL_DELAYS_S = (0.0, 0.0005, 0.002, 0.01)
"""When a call is cancelled after it started: at once, and part way through."""

_LAYOUT = KVLayout(num_layers=1, num_kv_heads=2, head_dim=32)
_NAMESPACE = Namespace("conformance-timeouts", "v1", _LAYOUT, chunk_tokens=16)
_SENTINEL = -7.0


class StallingDriver(FaultyDriver):
    """The driver under test, stalled: while ``stall`` holds, each ``put_many`` and
    ``get_many`` waits until ``resume``, then runs on the driver under test. Like
    a driver whose work runs on a thread it cannot stop, a call cancelled meanwhile
    still runs to its end before it returns, writing its buffers late. It lends
    nothing, so every write and read of a store over it takes those two calls."""

    forwards_loans = False

    def __init__(self, config: Any, inner: Any) -> None:
        super().__init__(config, inner)
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._inflight = InflightCalls()

    def stall(self) -> None:
        self._open_gate.clear()

    def resume(self) -> None:
        self._open_gate.set()

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await self._inflight.complete(self._after_stall(super()._put_many(items)))

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        return await self._inflight.complete(self._after_stall(super()._get_many(keys, into)))

    async def _after_stall(self, call: Any) -> Any:
        await self._open_gate.wait()
        return await call

    async def _close(self) -> None:
        await self._inflight.drain()
        await super()._close()


async def _timed(call: Awaitable[T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = await call
    return time.perf_counter() - start, result


async def _settle(tier: Tier) -> None:
    """Wait until the calls ``tier`` abandoned have ended (the stall is over)."""
    if tier.abandoned:
        await asyncio.wait(set(tier.abandoned), timeout=SETTLE_S)
    assert not tier.abandoned, f"stalled calls still running {SETTLE_S} s after the stall"


class TimeoutTests(DriverTestBase):
    """Every driver: a cancelled call, once its coroutine has ended, writes nothing
    more into its ``into`` buffers and publishes nothing more; and a store over
    this driver, stalled, answers within its tier's ``timeout_s`` with a miss or
    a failed write, never writes its caller's buffers after a call returned, and
    counts what the stalled calls stored once they end."""

    conformance_area: ClassVar[str] = "timeouts"

    def test_a_cancelled_get_leaves_its_buffers_alone_once_it_ended(
        self, harness: DriverHarness
    ) -> None:
        size = 256 * 1024
        keys = harness.keys(4)
        values = [harness.value(size) for _ in keys]
        harness.require_room(len(keys) * size)
        harness.put(list(zip(keys, values)))
        for delay in CANCEL_DELAYS_S:
            buffers = [bytearray(b"\xa5" * size) for _ in keys]

            async def cancelled_get(buffers: list[bytearray], delay: float) -> bytes:
                call = asyncio.ensure_future(harness.driver.get_many(keys, into=buffers))
                await asyncio.sleep(delay)
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                return b"".join(buffers)

            when_ended = harness.run(cancelled_get(buffers, delay))
            harness.get(keys)
            time.sleep(0.05)
            assert b"".join(buffers) == when_ended, (
                f"get_many cancelled after {delay} s wrote its into buffers after it had ended"
            )

    def test_a_cancelled_put_publishes_nothing_once_it_ended(self, harness: DriverHarness) -> None:
        size = 256 * 1024
        harness.require_room(len(CANCEL_DELAYS_S) * size)
        for delay in CANCEL_DELAYS_S:
            key, value = harness.key(f"put-{delay}"), harness.value(size)

            async def cancelled_put(key: bytes, value: bytes, delay: float) -> None:
                call = asyncio.ensure_future(harness.driver.put_many([(key, value)]))
                await asyncio.sleep(delay)
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

            harness.run(cancelled_put(key, value, delay))
            (first,) = harness.get([key])
            time.sleep(0.05)
            (later,) = harness.get([key])
            seen = [None if got is None else bytes(got) for got in (first, later)]
            assert seen[0] in (None, value), "a cancelled put left a partial value"
            assert seen[1] == seen[0], (
                f"put_many cancelled after {delay} s published its value after it had ended"
            )

    def test_a_stalled_tier_answers_within_its_timeout(self, harness: DriverHarness) -> None:
        if harness.driver.closed:
            harness.reopen()
        stalling = StallingDriver.wrap(harness.driver, FaultPlan(operations=frozenset()))
        assert isinstance(stalling, StallingDriver)
        # Room for every chunk of the test, counted as the store counts it: in footprints.
        chunk_bytes = harness.driver.footprint(_LAYOUT.nbytes(_NAMESPACE.chunk_tokens) + 4096)
        capacity = harness.capabilities.capacity_bytes
        harness.require_room(8 * chunk_bytes)
        config = StoreConfig.parse(
            {
                "tiers": [
                    {
                        "url": harness.config.to_url(),
                        "max_bytes": min(capacity or 1 << 30, 64 * chunk_bytes),
                        "timeout_s": TIMEOUT_S,
                    }
                ],
                "chunk_tokens": _NAMESPACE.chunk_tokens,
            }
        )
        harness.run(self._stalled_store(harness, stalling, config), timeout=SETTLE_S + 30)

    async def _stalled_store(
        self, harness: DriverHarness, stalling: StallingDriver, config: StoreConfig
    ) -> None:
        tokens = 2 * _NAMESPACE.chunk_tokens
        generator = torch.Generator().manual_seed(12)
        stored_ids, late_ids = (
            [harness.random.randrange(50_000) for _ in range(tokens)] for _ in "ab"
        )
        stored_kv, late_kv = (
            torch.randn(_LAYOUT.shape(tokens), generator=generator).to(_LAYOUT.torch_dtype)
            for _ in "ab"
        )
        store = await AsyncKVStore.open(config, _NAMESPACE, drivers=[stalling])
        tier = store.tiers[0]
        try:
            for key in store.keys(stored_ids) + store.keys(late_ids):
                harness.remember(key)
            assert (await store.store(stored_ids, stored_kv)).written == 2
            out = torch.full(_LAYOUT.shape(tokens), _SENTINEL, dtype=_LAYOUT.torch_dtype)
            stalling.stall()
            read_s, missed = await _timed(store.retrieve(stored_ids, out=out))
            again_s, again_missed = await _timed(store.retrieve(stored_ids))
            stalling.resume()
            await _settle(tier)
            stalling.stall()
            write_s, failed = await _timed(store.store(late_ids, late_kv))
            stalling.resume()
            assert (missed.tokens, again_missed.tokens) == (0, 0), "a stalled read must be a miss"
            assert failed.written == 0, "a stalled write must fail"
            for what, took in (("retrieve", read_s), ("store", write_s)):
                assert took < TIMEOUT_S + GRACE_S, (
                    f"{what} over a stalled tier took {took:.2f} s; timeout_s is {TIMEOUT_S}"
                )
            assert again_s < TIMEOUT_S / 2, (
                f"a retrieve while an abandoned call still ran took {again_s:.2f} s: "
                "a stalled tier is not asked again"
            )
            await _settle(tier)
            assert bool((out == _SENTINEL).all()), "the caller's out was written after retrieve"
            loaded = await store.retrieve(stored_ids)
            assert loaded.kv is not None and torch.equal(loaded.kv, stored_kv)
            assert all(key in tier.index for key in store.keys(late_ids)), (
                "a write that landed after its timeout must be counted in the tier's index"
            )
            again = await store.retrieve(late_ids)
            assert again.kv is not None and torch.equal(again.kv, late_kv)
        finally:
            await store.close()
