"""Fuzz the control server's HTTP API with schemathesis against its own live
OpenAPI spec: whatever the input, only documented replies (2xx, or 4xx with a
typed error body), never a crash or a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from control_server import ControlProcess
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import ignored_auth, negative_data_rejection

from kvstore.config import StoreConfig
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import KVStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
NAMESPACE = Namespace("test-model", "rev", LAYOUT, chunk_tokens=16)
TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def store_config(directory: Path) -> dict[str, Any]:
    return {
        "chunk_tokens": 16,
        "tiers": [
            {"url": "cpu://?capacity=16MiB", "name": "cpu"},
            {"url": f"nvme://{directory}/nvme?capacity=64MiB", "name": "nvme"},
        ],
        "control": {
            "token": TOKEN,
            "tenants": [{"name": "acme", "token": "fuzz-acme-token", "salt": "acme-salt"}],
        },
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    directory = tmp_path_factory.mktemp("fuzz")
    config = store_config(directory)
    with KVStore.open(StoreConfig.parse(config), NAMESPACE) as store:
        import torch

        store.store(list(range(64)), torch.zeros(LAYOUT.shape(64), dtype=LAYOUT.torch_dtype))
        store.flush()
    with ControlProcess(directory / "server", config, [NAMESPACE]) as process:
        yield process


@pytest.fixture(scope="module")
def api_schema(server: ControlProcess) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_only_answers_with_documented_replies(case: Case) -> None:
    """Every default check but ``negative_data_rejection``: the server ignores
    query parameters it does not know, as HTTP servers do. ``ignored_auth``
    also sends each request without the token and expects a 401."""
    case.call_and_validate(
        headers=AUTH,
        timeout=30,
        excluded_checks=[negative_data_rejection],
        additional_checks=[ignored_auth],
    )
