"""Store/retrieve throughput of the cpu and nvme tiers against raw baselines.

The same code as ``kvstore bench`` (kvstore.bench), runnable from a checkout::

    python benchmarks/store_tiers.py --quick
    python benchmarks/store_tiers.py --tiers cpu,nvme --json results.json
"""

from __future__ import annotations

import sys

from kvstore.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
