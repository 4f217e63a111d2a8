"""Control server security: bearer tokens (401 without, 403 wrong), tenant tokens
limited to their tenant, loopback-only without credentials, HTTPS and mTLS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from control_server import ControlProcess, namespace_file
from prerequisites import requires
from pydantic import ValidationError
from redis_server import TlsFiles

from kvstore.cli import main
from kvstore.config import ControlConfig, StoreConfig
from kvstore.control.client import ControlClient
from kvstore.control.models import LookupRequest
from kvstore.control.server import serve_control
from kvstore.errors import AuthenticationError, ConfigError, PermissionDeniedError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import AsyncKVStore, KVStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32)
CHUNK = 16
NAMESPACE = Namespace("test-model", "rev", LAYOUT, chunk_tokens=CHUNK)
ADMIN_TOKEN = "admin-token-0123456789"
ACME_TOKEN = "acme-token-0123456789"
IDS = list(range(3 * CHUNK))


def store_config(directory: Path, control: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://?capacity=16MiB", "name": "cpu"},
            {"url": f"nvme://{directory}/nvme?capacity=64MiB", "name": "nvme"},
        ],
    }
    if control is not None:
        config["control"] = control
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    """An admin token and one tenant, all secrets from the environment."""
    directory = tmp_path_factory.mktemp("auth")
    control = {
        "token_env": "TEST_ADMIN_TOKEN",
        "tenants": [{"name": "acme", "token_env": "TEST_ACME_TOKEN", "salt_env": "TEST_ACME_SALT"}],
    }
    config = store_config(directory, control)
    with KVStore.open(StoreConfig.parse(config), NAMESPACE) as store:
        store.store(IDS, torch.zeros(LAYOUT.shape(len(IDS)), dtype=LAYOUT.torch_dtype))
        store.flush()
    env = {
        "TEST_ADMIN_TOKEN": ADMIN_TOKEN,
        "TEST_ACME_TOKEN": ACME_TOKEN,
        "TEST_ACME_SALT": "acme-salt",
    }
    with ControlProcess(directory / "server", config, [NAMESPACE], env) as process:
        yield process


def client(server: ControlProcess, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def test_no_token_is_401_and_changes_nothing(server: ControlProcess) -> None:
    with client(server) as anonymous:
        for method, path in (
            ("POST", "/v1/clear"),
            ("POST", "/v1/lookup"),
            ("GET", "/v1/stats"),
            ("GET", "/openapi.json"),
            ("GET", "/metrics"),
            ("GET", "/nowhere"),
        ):
            reply = anonymous.request(method, path, json={})
            assert reply.status_code == 401, (path, reply.text)
            assert reply.headers["www-authenticate"] == "Bearer"
            assert reply.json()["error"] == "AuthenticationError"
        assert (
            anonymous.post("/v1/clear", headers={"Authorization": "Basic eDp5"}).status_code == 401
        )
    with client(server, ADMIN_TOKEN) as admin:
        assert admin.post("/v1/lookup", json={"tokens": IDS}).json()["tokens"] == 3 * CHUNK


def test_wrong_token_is_403_and_changes_nothing(server: ControlProcess) -> None:
    with client(server, "not-the-token") as wrong:
        reply = wrong.post("/v1/clear", json={})
        assert reply.status_code == 403
        assert reply.json()["error"] == "PermissionDeniedError"
        assert wrong.get("/openapi.json").status_code == 403
    with client(server, ADMIN_TOKEN) as admin:
        assert admin.post("/v1/lookup", json={"tokens": IDS}).json()["tokens"] == 3 * CHUNK
        assert admin.get("/v1/jobs").json() == {"jobs": []}


def test_admin_token(server: ControlProcess) -> None:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"bearer  {ADMIN_TOKEN}"}
    ) as admin:
        assert admin.get("/v1/stats").json()["scope"] == "all"
        assert admin.get("/metrics").status_code == 200
        assert admin.get("/v1/stats", params={"tenant": "acme"}).json()["scope"] == "tenant"
        assert admin.get("/v1/stats", params={"tenant": "nobody"}).status_code == 404


def test_tenant_token_is_limited_to_its_tenant(server: ControlProcess) -> None:
    with client(server, ACME_TOKEN) as acme:
        assert acme.post("/v1/lookup", json={"tokens": IDS}).json()["tokens"] == 0
        assert acme.get("/v1/stats").json()["tiers"][1]["entries"] == 0
        assert acme.get("/metrics").status_code == 403
        assert acme.post("/v1/clear", json={"scope": "all"}).status_code == 403
        assert acme.post("/v1/clear", json={"tenant": "other"}).status_code == 403
        assert acme.get("/v1/stats", params={"tenant": "other"}).status_code == 403
        move = acme.post("/v1/move", json={"source": "nvme", "target": "cpu", "scope": "all"})
        assert move.status_code == 403
        health = acme.get("/v1/health").json()
        assert health["ok"] and health["tiers"][1]["used_bytes"] == 0


def test_cli_token_from_the_environment(
    server: ControlProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KVSTORE_CONTROL_TOKEN", raising=False)
    assert main(["ctl", "stats", "--endpoint", server.url]) == 2
    assert "AuthenticationError" in capsys.readouterr().err
    monkeypatch.setenv("KVSTORE_CONTROL_TOKEN", ADMIN_TOKEN)
    assert main(["ctl", "stats", "--endpoint", server.url, "--json"]) == 0
    assert '"scope": "all"' in capsys.readouterr().out
    with ControlClient(server.url, token="wrong") as wrong, pytest.raises(PermissionDeniedError):
        wrong.lookup(LookupRequest(tokens=IDS))
    with ControlClient(server.url) as anonymous, pytest.raises(AuthenticationError):
        anonymous.health()


def test_non_loopback_bind_needs_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.com"):
        with pytest.raises(ValidationError, match="only with a token or client certificates"):
            ControlConfig(host=host)
    assert ControlConfig(host="0.0.0.0", token_env="X").has_credentials
    assert ControlConfig(host="::1").host == "::1"
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump(store_config(tmp_path)))
    namespace = namespace_file(tmp_path / "ns.yaml", NAMESPACE)
    args = ["serve", "--config", str(config), "--namespace", str(namespace), "--host", "0.0.0.0"]
    assert main(args) == 2
    assert "only with a token or client certificates" in capsys.readouterr().err


async def test_missing_token_variable_refuses_to_start(tmp_path: Path) -> None:
    config = StoreConfig.parse(store_config(tmp_path))
    async with await AsyncKVStore.open(config, NAMESPACE) as store:
        with pytest.raises(ConfigError, match="UNSET_TOKEN_VARIABLE is not set"):
            await serve_control(store, ControlConfig(port=0, token_env="UNSET_TOKEN_VARIABLE"))


@requires(
    shutil.which("openssl") is not None, "openssl, which makes the certificates, is not installed"
)
async def test_https_with_client_certificates(tmp_path: Path) -> None:
    tls = TlsFiles.create(tmp_path / "tls")
    control = ControlConfig(
        host="127.0.0.1",
        port=0,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        tls_client_ca=tls.ca,
    )
    config = StoreConfig.parse(store_config(tmp_path))
    async with await AsyncKVStore.open(config, NAMESPACE) as store:
        server = await serve_control(store, control)
        try:
            assert server.url.startswith("https://127.0.0.1:")
            trusted = ssl.create_default_context(cafile=str(tls.ca))
            with_cert = ssl.create_default_context(cafile=str(tls.ca))
            with_cert.load_cert_chain(str(tls.client_cert), str(tls.client_key))
            async with httpx.AsyncClient(base_url=server.url, verify=with_cert) as mtls:
                assert (await mtls.get("/v1/health")).json()["ok"] is True
            async with httpx.AsyncClient(base_url=server.url, verify=trusted) as no_cert:
                with pytest.raises(httpx.HTTPError):
                    await no_cert.get("/v1/health")
            async with httpx.AsyncClient(base_url=server.url.replace("https", "http")) as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get("/v1/health")

            def with_control_client() -> int:
                with ControlClient(
                    server.url, cacert=tls.ca, cert=tls.client_cert, key=tls.client_key
                ) as control_client:
                    return len(control_client.health().tiers)

            assert await asyncio.to_thread(with_control_client) == 2
        finally:
            await server.aclose()
