"""The node driver passes the conformance suite against a real ``kvstore node`` process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_server import NodeServer

from kvstore.cli import main
from kvstore.conformance import DriverTests


@pytest.fixture(scope="module")
def node_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    server = NodeServer(tmp_path_factory.mktemp("node"), capacity="256MiB")
    server.start()
    yield server
    server.stop()


class TestNodeConformance(DriverTests):
    @pytest.fixture
    def driver_config(self, node_service: NodeServer) -> str:
        return node_service.url


def test_socket_is_owner_only(node_service: NodeServer) -> None:
    assert Path(node_service.socket).stat().st_mode & 0o777 == 0o600


def test_cli_report(node_service: NodeServer, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    assert main(["conformance", "--json", str(report), node_service.url, "--", "-k", "core"]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert data["areas"]["core"]["failed"] == 0
    assert data["areas"]["core"]["passed"] > 0
