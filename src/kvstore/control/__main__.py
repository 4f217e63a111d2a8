"""``python -m kvstore.control --config store.yaml --namespace ns.yaml``: ``kvstore serve``."""

from __future__ import annotations

import sys

from kvstore.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
