"""A third-party driver, installed as its own distribution, is discovered through
its entry point and passes ``kvstore conformance``.

The example package is installed with pip into a temporary ``--target``
directory that only the subprocesses below put on their path, so nothing
outside the test's temporary directory changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "thirdparty_driver"


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example distribution (and nothing else)."""
    root = tmp_path_factory.mktemp("thirdparty")
    source = root / "source"
    shutil.copytree(SOURCE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    return site


def kvstore_cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )


def test_driver_is_discovered_through_its_entry_point(site_dir: Path) -> None:
    result = kvstore_cli(site_dir, "drivers")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "dictkv" in line)
    assert "kvstore-dictdriver 0.1.0" in row
    assert "ok" in row


def test_conformance_passes(site_dir: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "dictkv.json"
    result = kvstore_cli(site_dir, "conformance", "dictkv://", "--json", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert report["driver"]["source"] == "kvstore-dictdriver 0.1.0"
    areas = report["areas"]
    assert {"core", "keys", "batch", "sustained", "concurrency", "errors"} <= set(areas)
    assert all(counts["failed"] == counts["error"] == 0 for counts in areas.values())
    assert areas["core"]["passed"] > 0
    skipped = [test for test in report["tests"] if test["outcome"] == "skipped"]
    assert all("capability" in test["message"] for test in skipped)
    assert any(test["area"] == "persistence" for test in skipped)
