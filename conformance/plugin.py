"""The conformance suite's pytest plugin, loaded through the ``pytest11`` entry point.

It adds the ``--kvstore-url`` option and the ``kvstore_large`` marker, tags each
conformance test with its area (for reports and ``-k <area>``), and registers
the suite for assert rewriting. It imports nothing else from kvstore, so it
costs unrelated pytest runs nothing.
"""

from __future__ import annotations

import pytest

SUITE_VERSION = "2.0"
"""The version of the conformance suite, shown in every report."""

SUITE_PACKAGES = ("kvstore.conformance.suite", "kvstore.conformance.harness")
"""Modules whose asserts pytest rewrites to show the values compared."""

URL_OPTION = "--kvstore-url"
AREA_PROPERTY = "kvstore_area"
"""The ``user_properties`` entry holding a conformance test's area."""

pytest.register_assert_rewrite(*SUITE_PACKAGES)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvstore", "kvstore conformance suite")
    group.addoption(
        URL_OPTION,
        dest="kvstore_url",
        metavar="URL",
        default=None,
        help="driver URL that kvstore.conformance.suite_for_url tests",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Again now that pytest's import hook is installed: when this module was
    # imported before pytest started (as ``kvstore conformance`` does), the
    # registration above had no hook to go to.
    pytest.register_assert_rewrite(*SUITE_PACKAGES)
    config.addinivalue_line(
        "markers",
        "kvstore_large: a conformance test that moves values over 32 MiB "
        "(deselect with -m 'not kvstore_large')",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        area = conformance_area(item)
        if area:
            item.user_properties.append((AREA_PROPERTY, area))
            item.extra_keyword_matches.add(area)


def conformance_area(item: pytest.Item) -> str | None:
    """The ``conformance_area`` of the class that defines ``item``'s test method."""
    cls = getattr(item, "cls", None)
    name = getattr(item, "originalname", item.name)
    if cls is None:
        return None
    for klass in cls.__mro__:
        if name in vars(klass):
            area = getattr(klass, "conformance_area", None)
            return area if isinstance(area, str) and area else None
    return None
