"""The whole suite against the driver named on the command line.

``kvstore conformance <url>`` runs this module with ``--kvstore-url=<url>``;
running it by hand works the same way. It imports the suite by its package
name, whatever name pytest gives this file, so the suite's asserts are
rewritten to show their values in editable and wheel installs alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .suite import DriverTests
else:  # by its package name, not the one pytest derives from this file's path
    from kvstore.conformance.suite import DriverTests


class TestDriver(DriverTests):
    """The driver of ``--kvstore-url``."""

    @pytest.fixture
    def driver_config(self, request: pytest.FixtureRequest) -> str:
        url = request.config.getoption("kvstore_url")
        if not url:
            pytest.skip("no driver to test: pass --kvstore-url=<url>")
        return str(url)
