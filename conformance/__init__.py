"""The kvstore conformance suite: base test classes every driver must pass.

A driver's own tests subclass ``DriverTests`` and define one fixture,
``driver_config``; ``kvstore conformance <url>`` runs the same classes on any
registered driver. Names are imported lazily so that loading the pytest
plugin (a submodule) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .faults import FaultPlan, FaultyConfig, FaultyDriver
    from .harness import DriverHarness
    from .runner import run_conformance
    from .suite import (
        BatchTests,
        CapacityTests,
        ConcurrencyTests,
        CoreTests,
        DriverTests,
        ErrorTests,
        FaultTests,
        FootprintTests,
        KeyTests,
        LoanTests,
        PersistenceTests,
        ProcessPersistenceTests,
        SustainedTests,
        TimeoutTests,
    )
    from .suite.keyspec import KeySpecTests

_HOMES = {
    "BatchTests": "kvstore.conformance.suite",
    "CapacityTests": "kvstore.conformance.suite",
    "ConcurrencyTests": "kvstore.conformance.suite",
    "CoreTests": "kvstore.conformance.suite",
    "DriverTests": "kvstore.conformance.suite",
    "ErrorTests": "kvstore.conformance.suite",
    "FaultTests": "kvstore.conformance.suite",
    "FootprintTests": "kvstore.conformance.suite",
    "KeySpecTests": "kvstore.conformance.suite.keyspec",
    "KeyTests": "kvstore.conformance.suite",
    "ProcessPersistenceTests": "kvstore.conformance.suite",
    "SustainedTests": "kvstore.conformance.suite",
    "TimeoutTests": "kvstore.conformance.suite",
    "LoanTests": "kvstore.conformance.suite",
    "PersistenceTests": "kvstore.conformance.suite",
    "DriverHarness": "kvstore.conformance.harness",
    "FaultPlan": "kvstore.conformance.faults",
    "FaultyConfig": "kvstore.conformance.faults",
    "FaultyDriver": "kvstore.conformance.faults",
    "run_conformance": "kvstore.conformance.runner",
}

__all__ = [
    "BatchTests",
    "CapacityTests",
    "ConcurrencyTests",
    "CoreTests",
    "DriverHarness",
    "DriverTests",
    "ErrorTests",
    "FaultPlan",
    "FaultTests",
    "FaultyConfig",
    "FaultyDriver",
    "FootprintTests",
    "KeySpecTests",
    "KeyTests",
    "LoanTests",
    "PersistenceTests",
    "ProcessPersistenceTests",
    "SustainedTests",
    "TimeoutTests",
    "run_conformance",
]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
