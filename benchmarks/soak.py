"""The steady-state soak, the same code as ``kvstore soak`` (kvstore.soak), from a checkout::

python benchmarks/soak.py --quick
python benchmarks/soak.py --duration 600 --json soak.json
"""

from __future__ import annotations

import sys

from kvstore.soak import main

if __name__ == "__main__":
    sys.exit(main())
