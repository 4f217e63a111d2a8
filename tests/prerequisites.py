"""What a test needs from outside Python: a server binary, a tool, an environment.

The README's test command (scripts/test) installs all of it and sets
``KVSTORE_TEST_REQUIRE_ALL=1``: there a missing prerequisite fails its test
loudly, so a fresh machine can never pass by skipping. Run by hand without
that variable, such a test is skipped with the reason.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ALL = os.environ.get("KVSTORE_TEST_REQUIRE_ALL") == "1"


def missing(reason: str) -> NoReturn:
    """Fail where every prerequisite was promised, else skip, with ``reason``."""
    if REQUIRE_ALL:
        pytest.fail(f"{reason} (scripts/test installs every prerequisite)", pytrace=False)
    pytest.skip(reason)


def requires(available: bool, reason: str) -> pytest.MarkDecorator:
    """A marker for tests or modules that cannot run unless ``available``."""
    return pytest.mark.kvstore_requires(available=available, reason=reason)


def check_marked_prerequisites(item: pytest.Item) -> None:
    """Apply every ``kvstore_requires`` marker of ``item`` (called from conftest)."""
    for marker in item.iter_markers("kvstore_requires"):
        if not marker.kwargs["available"]:
            missing(marker.kwargs["reason"])
