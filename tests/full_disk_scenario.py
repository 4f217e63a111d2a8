"""Fill a small filesystem through an nvme tier whose capacity is far larger than it.

Run as ``python full_disk_scenario.py DIR`` with DIR on a filesystem of about
12 MiB (``test_full_disk.py`` mounts a tmpfs there in a private mount
namespace): 32 MiB of 1 MiB chunks are stored in batches of four; it prints,
as JSON, how many stores failed, how many of the newest four chunks hit, the
value files on disk and the entries and bytes the store counts for the tier.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import torch

from kvstore.config import StoreConfig
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import AsyncKVStore

LAYOUT = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128)
CHUNK = 32  # 1 MiB of KV a chunk
BATCHES = 8
PER_BATCH = 4


def value_files(root: str) -> tuple[int, int]:
    """How many value files lie under ``root``, and their bytes."""
    count = size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if not name.startswith("."):
                count += 1
                size += os.path.getsize(os.path.join(directory, name))
    return count, size


async def main(directory: str) -> None:
    root = os.path.join(directory, "kv")
    namespace = Namespace("full-disk", "rev", LAYOUT, chunk_tokens=CHUNK)
    config = StoreConfig.parse({"tiers": [f"nvme://{root}?capacity=1GiB"], "chunk_tokens": CHUNK})
    store = await AsyncKVStore.open(config, namespace)
    try:
        prompts = []
        failed = 0
        for batch in range(BATCHES):
            ids = [batch * 10_000 + token for token in range(PER_BATCH * CHUNK)]
            kv = torch.randn(LAYOUT.shape(PER_BATCH * CHUNK)).to(LAYOUT.torch_dtype)
            failed += (await store.store(ids, kv)).failed
            prompts.append((ids, kv))
        ids, kv = prompts[-1]
        loaded = await store.retrieve(ids)
        newest_hits = loaded.tokens // CHUNK
        intact = loaded.kv is not None and torch.equal(loaded.kv, kv[:, :, : loaded.tokens])
        tier = store.tiers[0]
        files, file_bytes = value_files(root)
        report = {
            "failed": failed,
            "stored": BATCHES * PER_BATCH,
            "newest_hits": newest_hits,
            "intact": intact,
            "files": files,
            "file_bytes": file_bytes,
            "counted": len(tier.index),
            "counted_bytes": tier.index.used_bytes,
            "evictions": tier.stats.evictions,
        }
    finally:
        await store.close()
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
