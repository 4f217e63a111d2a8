"""``kvstore soak``: the store in steady state, full, shared, stalled and failing.

Several worker processes serve chat sessions over Zipf-popular shared
prefixes through stores whose tiers (a cpu arena and an nvme directory each,
one shared redis-server) hold a fraction of the working set, while faults are
injected on a schedule: redis paused and killed, the disk filled, chunk
files corrupted, a worker killed with SIGKILL. The report checks every
served chunk against recomputed KV, accounts for every store, and compares
hit rate, latency, memory and files on disk with what the store promises
(docs/benchmarks.md).
"""

from __future__ import annotations

from kvstore.soak.command import main, run_soak
from kvstore.soak.options import add_soak_arguments

__all__ = ["add_soak_arguments", "main", "run_soak"]
