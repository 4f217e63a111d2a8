"""kvstore's own drivers pass the conformance suite, through the classes and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvstore.cli import main
from kvstore.conformance import DriverTests


class TestCpuConformance(DriverTests):
    @pytest.fixture
    def driver_config(self) -> str:
        return "cpu://?capacity=256MiB&page_size=64KiB"


class TestNvmeConformance(DriverTests):
    @pytest.fixture
    def driver_config(self, tmp_path: Path) -> str:
        return f"nvme://{tmp_path}/kv?capacity=512MiB"


@pytest.mark.parametrize("scheme", ["cpu", "nvme"])
def test_cli_report(scheme: str, tmp_path: Path) -> None:
    url = "cpu://?capacity=128MiB" if scheme == "cpu" else f"nvme://{tmp_path}/kv?capacity=256MiB"
    report = tmp_path / "report.json"
    assert main(["conformance", "--json", str(report), url, "--", "-k", "core or errors"]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert data["areas"]["core"]["failed"] == 0
    assert data["areas"]["core"]["passed"] > 0
