"""Mutation testing of the conformance suite: every deliberately broken driver in
tests/mutants fails the suite in the area of the promise it breaks, and the
correct drivers they start from pass.

The whole sweep runs in one subprocess (one interpreter start, one
``run_conformance`` per driver, each writing its JSON report).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE / "mutants"), str(HERE / "thirdparty_driver")]

from mutants import MUTANTS  # noqa: E402

CORRECT = {"filekv": "tests/mutants/filekv.py", "dictkv": "tests/thirdparty_driver"}
"""The correct drivers the mutants start from: both must pass."""

SWEEP = """
import sys
from pathlib import Path
import kvstore_dictdriver.plugin
from mutants import MUTANTS, register_mutants
from kvstore.conformance.runner import run_conformance
from kvstore.registry import default_registry

registry = default_registry()
register_mutants(registry)
registry.register(kvstore_dictdriver.plugin, name="dictkv", source="tests (example)")
reports, scratch = Path(sys.argv[1]), Path(sys.argv[2])
urls = {"dictkv": "dictkv://?capacity=64MiB", "filekv": f"filekv://{scratch / 'filekv'}"}
for scheme in sys.argv[3:]:
    url = MUTANTS[scheme].url(scratch) if scheme in MUTANTS else urls[scheme]
    quick = ["-m", "not kvstore_large"]
    run_conformance(url, json_path=reports / f"{scheme}.json", pytest_args=quick)
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The JSON report of one conformance run per mutant and per correct driver."""
    root = tmp_path_factory.mktemp("mutants")
    (root / "reports").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(
                None,
                [
                    str(HERE / "mutants"),
                    str(HERE / "thirdparty_driver"),
                    os.environ.get("PYTHONPATH"),
                ],
            )
        ),
        "COLUMNS": "200",
    }
    schemes = [*CORRECT, *MUTANTS]
    result = subprocess.run(
        [sys.executable, "-c", SWEEP, str(root / "reports"), str(root / "scratch"), *schemes],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        scheme: json.loads((root / "reports" / f"{scheme}.json").read_text()) for scheme in schemes
    }


@pytest.mark.parametrize("scheme", list(CORRECT))
def test_correct_driver_passes(reports: dict[str, dict[str, Any]], scheme: str) -> None:
    report = reports[scheme]
    failures = [
        f"{t['name']}: {t['message']}"
        for t in report["tests"]
        if t["outcome"] != "passed" and t["outcome"] != "skipped"
    ]
    assert report["passed"], failures


@pytest.mark.parametrize("scheme", list(MUTANTS))
def test_mutant_fails_in_its_area(reports: dict[str, dict[str, Any]], scheme: str) -> None:
    mutant = MUTANTS[scheme]
    report = reports[scheme]
    failing = [test for test in report["tests"] if test["outcome"] in ("failed", "error")]
    shown = [f"{test['area']} {test['name']}: {test['message']}" for test in failing]
    assert not report["passed"], f"{scheme} ({mutant.promise}) passed the suite"
    assert mutant.area in {test["area"] for test in failing}, (
        f"{scheme} ({mutant.promise}) should fail in {mutant.area}, failed in: {shown}"
    )
    assert all(test["message"] for test in failing), shown
