"""The conformance suite itself: it passes a correct driver, fails broken ones in
the right area, and its fault-injection wrapper validates its plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kvstore.conformance import DriverTests, FaultPlan, FaultTests, FaultyConfig
from kvstore.errors import CapacityError, ConfigError, IntegrityError
from kvstore.registry import DriverRegistry

THIRDPARTY = Path(__file__).parent / "thirdparty_driver"

MUTANTS = Path(__file__).parent / "mutants"

CLI_WITH_TEST_DRIVERS = """
import sys
from mutants import register_mutants
import kvstore_dictdriver.plugin
from kvstore.cli import main
from kvstore.registry import default_registry

registry = default_registry()
register_mutants(registry)
registry.register(kvstore_dictdriver.plugin, name="dictkv", source="kvstore-dictdriver (source)")
sys.exit(main(sys.argv[1:]))
"""
"""``kvstore`` with the example driver and the mutants registered from their source."""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the kvstore CLI in a fresh process that knows the test drivers."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(THIRDPARTY), str(MUTANTS), os.environ.get("PYTHONPATH")])
        ),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-c", CLI_WITH_TEST_DRIVERS, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )


class TestDictDriverConformance(DriverTests):
    """The suite in-process, as a driver author's own tests run it, on the example
    driver with a capacity (so the capacity area runs too)."""

    @pytest.fixture
    def driver_registry(self, monkeypatch: pytest.MonkeyPatch) -> DriverRegistry:
        """A private registry, so the example driver need not be installed."""
        monkeypatch.syspath_prepend(str(THIRDPARTY))
        import kvstore_dictdriver.plugin

        registry = DriverRegistry()
        registry.register(kvstore_dictdriver.plugin, name="dictkv", source="tests")
        return registry

    @pytest.fixture
    def driver_config(self) -> str:
        return "dictkv://?capacity=64MiB"


class TestFaultInjection(FaultTests):
    """The fault-injection wrapper, over the example driver (the wrapper is
    kvstore's, so this is not part of a driver's suite)."""

    driver_registry = TestDictDriverConformance.driver_registry

    @pytest.fixture
    def driver_config(self) -> str:
        return "dictkv://"


def test_failure_lines_show_the_values_compared(tmp_path: Path) -> None:
    """Asserts of the suite are rewritten, in an editable install too: a failing
    plain assert shows both sides, and the report names the promise and area."""
    report_path = tmp_path / "report.json"
    result = run_cli(
        "conformance", "containsbyprefix://", "--json", str(report_path), "--", "-k", "core"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    (failed,) = [test for test in report["tests"] if test["outcome"] == "failed"]
    assert failed["area"] == "core"
    assert "a key never written is a miss: contains_many" in failed["message"]
    assert "[True] == [False]" in failed["message"]


def test_report_says_what_was_deselected(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run_cli(
        "conformance",
        "dictkv://",
        "--json",
        str(report_path),
        "--",
        "-m",
        "not kvstore_large",
        "-k",
        "core",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["suite_version"] == "2.0"
    assert report["pytest_args"] == ["-m", "not kvstore_large", "-k", "core"]
    assert "test_round_trip_larger_than_32_mib" in report["deselected"]
    assert "test_round_trip[16777219]" in [test["name"] for test in report["tests"]], (
        "the quick filter keeps a value over 16 MiB"
    )
    assert f"{len(report['deselected'])} deselected" in result.stdout
    assert "test_round_trip_larger_than_32_mib" in result.stdout


def test_bad_url_still_writes_the_json_report(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run_cli("conformance", "not a url", "--json", str(report_path))
    assert result.returncode == 2
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    assert report["error"]
    assert report["tests"] == []


def test_report_of_a_passing_run(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run_cli("conformance", "--json", str(report_path), "dictkv://", "--", "-k", "core")
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert report["url"] == "dictkv://"
    assert report["driver"]["class"] == "kvstore_dictdriver.driver:DictDriver"
    assert report["driver"]["capabilities"]["persistent"] is False
    assert list(report["areas"]) == ["core"], "-k core selects the core area only"
    assert report["areas"]["core"]["passed"] == report["totals"]["passed"] > 0
    test = report["tests"][0]
    assert set(test) == {"name", "area", "outcome", "duration_s", "message"}
    assert "PASSED" in result.stdout
    assert "collected" not in result.stdout, "pytest's own output is hidden unless --verbose"


def test_run_with_no_test_is_a_failure(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run_cli(
        "conformance", "--json", str(report_path), "dictkv://", "--", "-k", "nonexistent"
    )
    assert result.returncode != 0
    assert json.loads(report_path.read_text())["passed"] is False


def test_unknown_scheme_is_a_clear_error() -> None:
    result = run_cli("conformance", "nosuchdriver://")
    assert result.returncode == 2
    assert "nosuchdriver" in result.stderr


@pytest.mark.parametrize(
    "bad",
    [
        {"probability": 1.5},
        {"every_nth": 0},
        {"action": "corrupt", "operations": {"put_many"}},
        {"action": "explode"},
        {"operations": {"close"}},
        {"flip_bits": 0},
    ],
)
def test_fault_plan_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FaultPlan.model_validate(bad)


def test_fault_plan_targets() -> None:
    assert FaultPlan(action="corrupt").targets == {"get_many"}
    assert FaultPlan(action="hang").targets == {
        "put_many",
        "get_many",
        "lend_many",
        "borrow_many",
        "contains_many",
        "delete_many",
        "list",
        "usage",
    }
    assert FaultPlan(operations={"usage"}).targets == {"usage"}


def test_faulty_config_from_url() -> None:
    url = (
        "faulty://?inner=dictkv%3A%2F%2F%3Fcapacity%3D1MiB&action=error"
        "&operations=get_many,usage&error=IntegrityError&every_nth=2"
    )
    config = FaultyConfig.from_url(url)
    assert config.inner == "dictkv://?capacity=1MiB"
    assert config.error is IntegrityError
    assert config.targets == {"get_many", "usage"}
    assert FaultyConfig.from_url(config.to_url()) == config
    changed = config.model_copy(update={"error": CapacityError})
    assert FaultyConfig.from_url(changed.to_url()).error is CapacityError
    with pytest.raises(ConfigError, match="unknown error"):
        FaultyConfig.from_url("faulty://?inner=dictkv%3A%2F%2F&error=OopsError")
