"""The conformance suite's test classes, one per area, and ``DriverTests`` with all of them.

The plugin registers this package for pytest's assert rewriting, which
applies when the package is first imported by a test module or conftest.
"""

from .base import DriverTestBase
from .batch import BatchTests
from .capacity import CapacityTests
from .concurrency import ConcurrencyTests
from .core import CoreTests
from .errors import ErrorTests
from .faults import FaultTests
from .keyspec import KeySpecTests
from .loans import LoanTests
from .persistence import PersistenceTests
from .timeouts import TimeoutTests


class DriverTests(
    TimeoutTests,
    FaultTests,
    LoanTests,
    ErrorTests,
    CapacityTests,
    PersistenceTests,
    ConcurrencyTests,
    BatchTests,
    CoreTests,
    KeySpecTests,
):
    """The whole conformance suite. Subclass it as ``TestMyDriver`` and define a
    ``driver_config`` fixture returning your driver's URL or config.

    pytest runs inherited tests in reverse MRO order, so the bases are listed
    last area first: core runs first, faults last.
    """


__all__ = [
    "BatchTests",
    "CapacityTests",
    "ConcurrencyTests",
    "CoreTests",
    "DriverTestBase",
    "DriverTests",
    "ErrorTests",
    "FaultTests",
    "KeySpecTests",
    "LoanTests",
    "PersistenceTests",
    "TimeoutTests",
]
