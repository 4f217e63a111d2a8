"""``kvstore conformance <url>``: run the suite on any registered driver, report by area.

The suite runs in this process through ``pytest.main`` on ``suite_for_url.py``;
a small plugin object records each test's outcome, which becomes a table on
the console and, if asked, a JSON report (its format is in docs/conformance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities
from kvstore.errors import KVStoreError
from kvstore.registry import DriverRegistry, default_registry

from .plugin import AREA_PROPERTY, SUITE_VERSION, URL_OPTION

SUITE_MODULE = Path(__file__).with_name("suite_for_url.py")
AREA_ORDER = (
    "core",
    "keys",
    "batch",
    "sustained",
    "concurrency",
    "loans",
    "persistence",
    "capacity",
    "footprint",
    "errors",
    "timeouts",
)
OUTCOMES = ("passed", "failed", "skipped", "error")
MESSAGE_CHARS = 300


@dataclass
class TestResult:
    """One test's outcome: ``error`` means its setup or teardown failed."""

    __test__ = False

    name: str
    area: str
    outcome: str = "passed"
    duration_s: float = 0.0
    message: str = ""


class OutcomeCollector:
    """A pytest plugin object recording one ``TestResult`` per test (and collection error)."""

    def __init__(self) -> None:
        self.results: dict[str, TestResult] = {}
        self.deselected: list[str] = []

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected.extend(item.nodeid.rpartition("::")[2] for item in items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        area = str(dict(report.user_properties).get(AREA_PROPERTY, "other"))
        name = report.nodeid.rpartition("::")[2]
        result = self.results.setdefault(report.nodeid, TestResult(name=name, area=area))
        result.duration_s += report.duration
        if report.when == "call":
            result.outcome = report.outcome
            result.message = _reason(report) if not report.passed else ""
        elif report.failed and result.outcome != "failed":
            result.outcome = "error"
            result.message = f"error in {report.when}: {_reason(report)}"
        elif report.skipped:
            result.outcome = "skipped"
            result.message = _reason(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            name = report.nodeid or "collection"
            self.results[name] = TestResult(
                name=name, area="collection", outcome="error", message=_reason(report)
            )


@dataclass
class ConformanceReport:
    """What one run found; ``to_json`` is the JSON report."""

    url: str
    driver: dict[str, Any]
    exit_code: int
    results: list[TestResult] = field(default_factory=list)
    error: str | None = None
    pytest_args: list[str] = field(default_factory=list)
    deselected: list[str] = field(default_factory=list)
    interrupted: bool = False
    """Ctrl-C stopped the run: the report holds what finished before it."""

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def totals(self) -> dict[str, int]:
        counts = Counter(result.outcome for result in self.results)
        return {outcome: counts[outcome] for outcome in OUTCOMES}

    def areas(self) -> dict[str, dict[str, int]]:
        """Outcome counts per area, in report order."""
        found = {result.area for result in self.results}
        ordered = [area for area in AREA_ORDER if area in found]
        ordered += sorted(found - set(AREA_ORDER))
        return {
            area: {
                outcome: sum(r.area == area and r.outcome == outcome for r in self.results)
                for outcome in OUTCOMES
            }
            for area in ordered
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "suite_version": SUITE_VERSION,
            "url": self.url,
            "pytest_args": self.pytest_args,
            "driver": self.driver,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "error": self.error,
            "totals": self.totals(),
            "areas": self.areas(),
            "deselected": self.deselected,
            "tests": [asdict(result) for result in self.results],
        }


def run_conformance(
    url: str,
    json_path: str | os.PathLike[str] | None = None,
    pytest_args: list[str] | None = None,
    verbose: bool = False,
) -> int:
    """Run the conformance suite on the driver ``url`` names; return the exit code.

    0 only when tests ran and none failed or errored. pytest's own output is
    shown only when ``verbose``; ``pytest_args`` go to pytest as they are
    (e.g. ``["-k", "core or batch"]``). A URL that names no loadable driver,
    or a driver that cannot be opened, gives exit code 2 and a report saying
    why; the JSON report is written in every case. Ctrl-C writes the JSON
    report of what finished and raises KeyboardInterrupt.
    """
    console = Console()
    args = list(pytest_args or [])
    try:
        report = _run_suite(url, args, verbose)
    except KVStoreError as exc:
        reason = f"the URL names no driver that can be loaded: {type(exc).__name__}: {exc}"
        report = ConformanceReport(url, {}, exit_code=2, error=reason, pytest_args=args)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if report.interrupted:
        raise KeyboardInterrupt
    print_report(console, report)
    return report.exit_code


def _run_suite(url: str, pytest_args: list[str], verbose: bool) -> ConformanceReport:
    """Load and open the driver once, then run the suite on it; KVStoreError when
    the URL names no loadable driver."""
    registry = default_registry()
    config = registry.parse_url(url)
    shown_url = config.redacted_url()
    registered = registry.get(config.scheme)
    driver_cls = registered.load()
    driver: dict[str, Any] = {
        "scheme": config.scheme,
        "class": f"{driver_cls.__module__}:{driver_cls.__qualname__}",
        "source": registered.source,
    }
    try:
        capabilities = _open_and_close(registry, config)
    except Exception as exc:
        reason = f"could not open the driver: {type(exc).__name__}: {exc}"
        return ConformanceReport(
            shown_url, driver, exit_code=2, error=reason, pytest_args=pytest_args
        )
    driver["capabilities"] = asdict(capabilities)
    collector = OutcomeCollector()
    pytest_code = _run_pytest(url, pytest_args, verbose, collector)
    results = list(collector.results.values())
    report = ConformanceReport(
        shown_url,
        driver,
        exit_code=_exit_code(pytest_code, results),
        results=results,
        pytest_args=pytest_args,
        deselected=collector.deselected,
    )
    if pytest_code == pytest.ExitCode.INTERRUPTED:
        report.interrupted = True
        report.error = "interrupted"
    elif report.exit_code and not results:
        report.error = f"pytest exited with code {pytest_code} and ran no test"
    return report


def print_report(console: Console, report: ConformanceReport) -> None:
    """The per-area table, then every failure and every distinct skip reason."""
    driver = report.driver
    origin = f" ({escape(driver['class'])} from {escape(driver['source'])})" if driver else ""
    console.print(f"kvstore conformance {SUITE_VERSION}: [bold]{escape(report.url)}[/bold]{origin}")
    if report.error:
        Console(stderr=True).print(f"[red]error:[/red] {escape(report.error)}")
    if report.results:
        table = Table()
        for column in ("area", "passed", "failed", "skipped"):
            table.add_column(column, justify="left" if column == "area" else "right")
        for area, counts in report.areas().items():
            failed = counts["failed"] + counts["error"]
            table.add_row(
                area,
                str(counts["passed"]),
                f"[red]{failed}[/red]" if failed else "0",
                str(counts["skipped"]),
            )
        console.print(table)
    for result in report.results:
        if result.outcome in ("failed", "error"):
            console.print(
                f"[red]{result.outcome.upper()}[/red] {result.area} {escape(result.name)}: "
                f"{escape(result.message)}"
            )
    skips = Counter(
        (result.area, result.message) for result in report.results if result.outcome == "skipped"
    )
    for (area, reason), count in skips.items():
        console.print(f"[yellow]skipped[/yellow] {count} in {area}: {escape(reason)}")
    if report.deselected:
        console.print(
            f"[yellow]deselected[/yellow] {len(report.deselected)} by "
            f"{escape(' '.join(report.pytest_args))}: {escape(', '.join(report.deselected))}"
        )
    totals = report.totals()
    verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
    console.print(
        f"{verdict} {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['error']} errors, {totals['skipped']} skipped, "
        f"{len(report.deselected)} deselected"
    )


def _open_and_close(registry: DriverRegistry, config: DriverConfig) -> Capabilities:
    """Open the driver once, on a loop of its own, to read its capabilities."""

    async def probe() -> Capabilities:
        driver = await registry.open(config)
        try:
            return driver.capabilities
        finally:
            await driver.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, probe()).result()


def _run_pytest(url: str, extra_args: list[str], verbose: bool, collector: OutcomeCollector) -> int:
    """Run ``suite_for_url.py`` in this process, isolated from any project config
    and from other installed pytest plugins."""
    here = str(SUITE_MODULE.parent)
    args = [
        str(SUITE_MODULE),
        f"{URL_OPTION}={url}",
        "-c",
        os.devnull,
        f"--rootdir={here}",
        f"--confcutdir={here}",
        "--import-mode=importlib",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:asyncio",
        "-p",
        "kvstore.conformance.plugin",
        "-v" if verbose else "-q",
        *extra_args,
    ]
    if verbose:
        with _only_our_plugin():
            return int(pytest.main(args, plugins=[collector]))
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), _only_our_plugin():
        code = int(pytest.main(args, plugins=[collector]))
    if code in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR):
        sys.stderr.write(output.getvalue())
    return code


@contextlib.contextmanager
def _only_our_plugin() -> Iterator[None]:
    """Keep pytest from loading every installed plugin's entry point: the suite
    needs none but its own, and importing them all can take seconds."""
    name = "PYTEST_DISABLE_PLUGIN_AUTOLOAD"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _exit_code(pytest_code: int, results: list[TestResult]) -> int:
    """Non-zero when pytest failed, a test failed or errored, or no test passed."""
    if pytest_code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return pytest_code
    if pytest_code == pytest.ExitCode.TESTS_FAILED or any(
        result.outcome in ("failed", "error") for result in results
    ):
        return int(pytest.ExitCode.TESTS_FAILED)
    if not any(result.outcome == "passed" for result in results):
        return int(pytest.ExitCode.NO_TESTS_COLLECTED)
    return 0


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """Why a test failed or was skipped on one line (the assertion's message and
    the values it compared), at most MESSAGE_CHARS long."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):
        text = str(longrepr[2]).removeprefix("Skipped: ")
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = str(crash.message) if crash is not None else str(longrepr or "")
    line = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."
