"""The fixtures every area of the suite shares."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import ClassVar

import pytest

from kvstore.config_url import DriverConfig
from kvstore.registry import DriverRegistry, default_registry

from ..harness import DriverHarness


class DriverTestBase:
    """Base of every area class. Subclass ``DriverTests`` (or single areas) and
    define a ``driver_config`` fixture returning a URL or a ``DriverConfig``.

    Override ``driver_registry`` to test a driver that is not installed as an
    entry point, and the class attributes below to fit a slow or large backend.
    """

    conformance_area: ClassVar[str] = ""
    """The area of the tests a class defines, used in reports and ``-k``."""

    call_timeout_s: ClassVar[float] = 120.0
    """The longest one driver call may take before the test fails."""

    max_fill_bytes: ClassVar[int] = 1 << 30
    """Capacity tests that would write more than this to fill the driver are skipped."""

    @pytest.fixture
    def driver_registry(self) -> DriverRegistry:
        """Where the suite looks up the driver: by default the installed entry points."""
        return default_registry()

    @pytest.fixture
    def harness(
        self,
        request: pytest.FixtureRequest,
        driver_config: str | DriverConfig,
        driver_registry: DriverRegistry,
    ) -> Iterator[DriverHarness]:
        """An open driver of ``driver_config`` on a private loop, cleaned up afterwards."""
        harness = DriverHarness.start(
            driver_config,
            driver_registry,
            seed=zlib.crc32(request.node.nodeid.encode()),
            call_timeout_s=self.call_timeout_s,
        )
        try:
            yield harness
        finally:
            harness.cleanup()
