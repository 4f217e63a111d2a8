"""``python -m kvstore.bench``: the same as ``kvstore bench``."""

import sys

from kvstore.bench.command import main

sys.exit(main())
