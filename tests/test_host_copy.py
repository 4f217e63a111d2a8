"""Host copies with numpy: the same bytes as torch's, and no OpenMP team on the thread;
torch ops on the store's codec threads run serially, with none either."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
import torch

from kvstore.config import StoreConfig, TierConfig
from kvstore.host_copy import copy_into, serial_torch_thread
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import AsyncKVStore


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.uint8]
)
def test_strided_copies_match_torch(dtype: torch.dtype) -> None:
    source = torch.randn(4, 2, 64, 8, 16).to(dtype)
    strided = source[:, :, 16:48]
    target = torch.zeros(4, 2, 32, 8, 16, dtype=dtype)
    copy_into(target, strided)
    assert torch.equal(target.view(torch.uint8), strided.contiguous().view(torch.uint8))
    transposed = torch.zeros(16, 8, 32, 2, 4, dtype=dtype).permute(4, 3, 2, 1, 0)
    copy_into(transposed, strided)
    assert torch.equal(
        transposed.contiguous().view(torch.uint8), strided.contiguous().view(torch.uint8)
    )


def test_casts_and_broadcasts_go_through_torch() -> None:
    target = torch.zeros(3, 4, dtype=torch.float32)
    copy_into(target, torch.ones(3, 4, dtype=torch.float16))
    assert torch.equal(target, torch.ones(3, 4))
    copy_into(target, torch.full((4,), 2.0))
    assert torch.equal(target, torch.full((3, 4), 2.0))


def _threads_started_by(copy: Callable[[torch.Tensor, torch.Tensor], None]) -> int:
    """How many threads the process has more while a thread that ran ``copy`` of
    64 MiB lives on (it counts itself)."""
    source = torch.ones(16 << 20)
    target = torch.empty_like(source)
    copied, finish = threading.Event(), threading.Event()

    def work() -> None:
        copy(target, source)
        copied.set()
        finish.wait()

    before = len(os.listdir("/proc/self/task"))
    thread = threading.Thread(target=work)
    thread.start()
    copied.wait()
    started = len(os.listdir("/proc/self/task")) - before
    finish.set()
    thread.join()
    return started


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_a_host_copy_starts_no_openmp_team_on_its_thread() -> None:
    if torch.get_num_threads() < 2 or _threads_started_by(torch.Tensor.copy_) < 2:
        pytest.skip("torch starts no OpenMP team here (one thread, or no OpenMP)")
    assert _threads_started_by(copy_into) == 1


def _serial_copy(target: torch.Tensor, source: torch.Tensor) -> None:
    serial_torch_thread()
    target.copy_(source)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_a_serial_torch_thread_starts_no_openmp_team_and_leaves_the_others_be() -> None:
    """Also once ``torch.set_num_threads`` has been called, as an engine does:
    torch then sets each thread's count to it on the thread's first op."""
    threads = torch.get_num_threads()
    if threads < 2 or _threads_started_by(torch.Tensor.copy_) < 2:
        pytest.skip("torch starts no OpenMP team here (one thread, or no OpenMP)")
    torch.set_num_threads(threads)
    assert _threads_started_by(_serial_copy) == 1
    assert torch.get_num_threads() == threads, "this thread's torch keeps its threads"
    assert _threads_started_by(torch.Tensor.copy_) >= 2, "and so does a new thread's"


async def test_the_store_runs_torch_ops_serially_on_its_codec_threads() -> None:
    """A quantizing tier's codec runs torch ops on the codec threads: they run
    there without an OpenMP team, while the caller's torch keeps its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
    namespace = Namespace("serial-codecs", "rev", layout, chunk_tokens=16, codec="int8")
    store = await AsyncKVStore.open(
        StoreConfig(
            tiers=[TierConfig(url="cpu://?capacity=16MiB", codecs="int8")], chunk_tokens=16
        ),
        namespace,
    )
    try:
        kv = torch.randn(layout.shape(64)).half()
        ids = list(range(64))
        assert (await store.store(ids, kv)).written == 4
        loaded = await store.retrieve(ids)
        assert loaded.kv is not None and torch.allclose(loaded.kv.float(), kv.float(), atol=0.05)
        assert await store._run(torch.get_num_threads) == 1
        assert torch.get_num_threads() == threads
    finally:
        await store.close()
