"""The conformance suite's test classes, one per area, and ``DriverTests`` with all of them.

The plugin registers this package for pytest's assert rewriting, which
applies when the package is first imported by a test module or conftest.
``FaultTests`` (the fault-injection wrapper) and ``KeySpecTests`` (the key
spec's vectors, in ``keyspec``, which imports torch) test kvstore itself, not
a driver: they are not part of ``DriverTests``.
"""

from .base import DriverTestBase
from .batch import BatchTests
from .capacity import CapacityTests
from .concurrency import ConcurrencyTests
from .core import CoreTests
from .errors import ErrorTests
from .faults import FaultTests
from .footprint import FootprintTests
from .keys import KeyTests
from .lends import LendTests
from .loans import LoanTests
from .persistence import PersistenceTests
from .processes import ProcessPersistenceTests
from .sustained import SustainedTests
from .timeouts import TimeoutTests


class DriverTests(
    TimeoutTests,
    ErrorTests,
    FootprintTests,
    CapacityTests,
    ProcessPersistenceTests,
    PersistenceTests,
    LoanTests,
    LendTests,
    ConcurrencyTests,
    SustainedTests,
    BatchTests,
    KeyTests,
    CoreTests,
):
    """The whole conformance suite. Subclass it as ``TestMyDriver`` and define a
    ``driver_config`` fixture returning your driver's URL or config.

    pytest runs inherited tests in reverse MRO order, so the bases are listed
    last area first: core runs first, errors last.
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
    "FootprintTests",
    "KeyTests",
    "LendTests",
    "LoanTests",
    "PersistenceTests",
    "ProcessPersistenceTests",
    "SustainedTests",
    "TimeoutTests",
]
