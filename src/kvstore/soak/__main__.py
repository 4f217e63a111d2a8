"""``python -m kvstore.soak``: the same as ``kvstore soak``."""

from __future__ import annotations

import sys

from kvstore.soak import main

sys.exit(main())
