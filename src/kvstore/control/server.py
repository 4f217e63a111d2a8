"""The HTTP control server: a FastAPI app over ``ControlService``, run by uvicorn.

The app has one route per control operation under ``/v1`` (OpenAPI spec at
``/openapi.json``) and Prometheus metrics at ``/metrics``. An ASGI middleware
authenticates every request, ``/openapi.json`` and ``/metrics`` included,
before any route runs, so a request without valid credentials gets 401 or 403
and changes nothing. Errors map from kvstore's error taxonomy to 4xx codes
(503 only for a tier that cannot be reached). No endpoint runs code or loads
anything but JSON.

The server runs on the store's own event loop (``serve_control``), so every
operation calls the store directly; ``start_control_server`` does the same
for a blocking ``KVStore`` from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from kvstore.config import ControlConfig
from kvstore.control.auth import Credentials, Principal
from kvstore.control.models import (
    ClearRequest,
    CompressRequest,
    ErrorBody,
    HealthReply,
    JobInfo,
    JobList,
    LookupReply,
    LookupRequest,
    MoveRequest,
    PinReply,
    PinRequest,
    StatsReply,
    UnpinRequest,
)
from kvstore.control.service import ControlService
from kvstore.errors import (
    AuthenticationError,
    CapacityError,
    ConfigError,
    DriverUnavailableError,
    InvalidArgumentError,
    KVStoreError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    TransientError,
)
from kvstore.keys import Namespace
from kvstore.metrics import render_metrics
from kvstore.store import AsyncKVStore, KVStore
from kvstore.sync import LoopThread

_STATUS: tuple[tuple[type[KVStoreError], int], ...] = (
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (CapacityError, 409),
    (InvalidArgumentError, 400),
    (ConfigError, 400),
    (NotSupportedError, 400),
    (DriverUnavailableError, 503),
    (TransientError, 503),
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "bad request (invalid argument, config or unsupported operation)"),
        (401, "no bearer token where one is required"),
        (403, "the token is not valid or does not allow this"),
        (404, "no such tier, namespace, tenant or job"),
        (409, "a tier has no room"),
        (503, "a tier cannot be reached"),
    )
}
JOB_ID = Path(pattern=r"^[0-9a-f]{32}$", description="a job id, as returned when it started")


def status_of(error: KVStoreError) -> int:
    """The HTTP status of a kvstore error (400 for any kind not listed)."""
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 400


def _error_response(error: KVStoreError) -> JSONResponse:
    status = status_of(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = ErrorBody(error=type(error).__name__, message=str(error))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class AuthMiddleware:
    """Authenticate every HTTP request before routing; the caller goes in ``request.state``."""

    def __init__(self, app: ASGIApp, credentials: Credentials) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
        try:
            principal = self.credentials.authenticate(header)
        except KVStoreError as exc:
            await _error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="the admin's or a tenant's control token")


def _caller(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    principal: Principal = request.state.principal
    return principal


Caller = Annotated[Principal, Depends(_caller)]


def create_app(service: ControlService, credentials: Credentials) -> FastAPI:
    """The control API as an ASGI app (OpenAPI at ``/openapi.json``, no docs UI)."""
    app = FastAPI(
        title="kvstore control API",
        version="1",
        description="Inspect and steer a kvstore hierarchical KV-cache store.",
        docs_url=None,
        redoc_url=None,
        responses=_ERRORS,
    )
    app.add_middleware(AuthMiddleware, credentials=credentials)

    @app.exception_handler(KVStoreError)
    async def _kvstore_error(request: Request, exc: KVStoreError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route, unreadable body) in the same typed body."""
        error = {400: "InvalidArgumentError", 404: "NotFoundError"}.get(
            exc.status_code, "HTTPError"
        )
        body = ErrorBody(error=error, message=str(exc.detail))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.post("/v1/lookup", tags=["prompts"])
    async def lookup(body: LookupRequest, caller: Caller) -> LookupReply:
        """How many leading tokens of a prompt are cached, and the tier of each chunk."""
        return await service.lookup(body, caller)

    @app.post("/v1/pin", tags=["prompts"])
    async def pin(body: PinRequest, caller: Caller) -> PinReply:
        """Pin a prompt's cached prefix (optionally for ``ttl_s`` seconds)."""
        return await service.pin(body, caller)

    @app.post("/v1/unpin", tags=["prompts"])
    async def unpin(body: UnpinRequest, caller: Caller) -> PinReply:
        """Unpin every chunk of a prompt."""
        return await service.unpin(body, caller)

    @app.post("/v1/clear", status_code=202, tags=["jobs"])
    async def clear(body: ClearRequest, caller: Caller) -> JobInfo:
        """Start a job deleting a scope's chunks from one tier or every tier."""
        return await service.clear(body, caller)

    @app.post("/v1/move", status_code=202, tags=["jobs"])
    async def move(body: MoveRequest, caller: Caller) -> JobInfo:
        """Start a job copying or migrating chunks between tiers."""
        return await service.move(body, caller)

    @app.post("/v1/compress", status_code=202, tags=["jobs"])
    async def compress(body: CompressRequest, caller: Caller) -> JobInfo:
        """Start a job re-encoding a tier's chunks with a lossless codec stack."""
        return await service.compress(body, caller)

    @app.get("/v1/jobs", tags=["jobs"])
    async def jobs(caller: Caller) -> JobList:
        """The caller's jobs, running and recently finished."""
        return service.job_list(caller)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def job(job_id: Annotated[str, JOB_ID], caller: Caller) -> JobInfo:
        """One job's state and progress."""
        return service.job(job_id, caller)

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel(job_id: Annotated[str, JOB_ID], caller: Caller) -> JobInfo:
        """Cancel a running job and report its state."""
        return await service.cancel(job_id, caller)

    @app.get("/v1/health", tags=["store"])
    async def health(
        caller: Caller,
        timeout_s: Annotated[float, Query(gt=0, le=60)] = 5.0,
    ) -> HealthReply:
        """Probe every tier: reachable, latency, error rate, capacity used."""
        return await service.health(caller, timeout_s)

    @app.get("/v1/stats", tags=["store"])
    async def stats(
        caller: Caller,
        tenant: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    ) -> StatsReply:
        """Usage and counters of the caller's scope (the whole store for the admin)."""
        return await service.stats(caller, tenant)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request, caller: Caller) -> Response:
        """Prometheus metrics of every store in this process (admin only)."""
        if not caller.admin:
            raise PermissionDeniedError("metrics cover every tenant: admin only")
        body, content_type = render_metrics(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: the embedding process owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ControlServer:
    """A control server running on a store's event loop."""

    def __init__(
        self,
        service: ControlService,
        server: uvicorn.Server,
        task: asyncio.Task[None],
        url: str,
        loop: LoopThread | None = None,
    ) -> None:
        self.service = service
        self.url = url
        self._server = server
        self._task = task
        self._loop = loop

    async def aclose(self) -> None:
        """Stop serving, cancel running jobs (on the store's loop)."""
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        await self.service.close()

    async def wait(self) -> None:
        """Serve until ``aclose`` (or a failure) ends the server."""
        await asyncio.shield(self._task)

    def close(self) -> None:
        """``aclose`` from another thread, for servers started with ``start_control_server``."""
        if self._loop is None:
            raise InvalidArgumentError("this server runs on your event loop: await aclose()")
        self._loop.run(self.aclose())


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket (so a busy port is an error here, not inside uvicorn)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot resolve control host {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


async def serve_control(
    store: AsyncKVStore,
    config: ControlConfig | None = None,
    *,
    namespaces: Mapping[str, Namespace] | None = None,
    environ: Mapping[str, str] | None = None,
    loop: LoopThread | None = None,
) -> ControlServer:
    """Start a control server for ``store`` on the running loop (the store's) and
    return once it accepts connections; ``config`` defaults to ``store.config.control``."""
    config = config or store.config.control or ControlConfig()
    credentials = Credentials(config, environ)
    service = ControlService(store, config, namespaces=namespaces, environ=environ)
    tls: dict[str, Any] = {}
    if config.tls_cert is not None:
        tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
        if config.tls_client_ca is not None:
            tls["ssl_ca_certs"] = str(config.tls_client_ca)
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    uvicorn_config = uvicorn.Config(
        create_app(service, credentials),
        log_config=None,
        access_log=False,
        lifespan="off",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        **tls,
    )
    try:
        uvicorn_config.load()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"control server TLS setup failed: {exc}") from None
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    server = _Server(uvicorn_config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="kvstore-control-server")
    while not server.started:
        done, _ = await asyncio.wait([task], timeout=0.01)
        if done:
            sock.close()
            task.result()
            raise ConfigError(f"the control server on {url} stopped while starting")
    return ControlServer(service, server, task, url, loop)


def start_control_server(
    store: KVStore | AsyncKVStore,
    config: ControlConfig | None = None,
    *,
    namespaces: Mapping[str, Namespace] | None = None,
) -> ControlServer:
    """Start a control server for a blocking ``KVStore`` (from any thread but its
    loop's); for an ``AsyncKVStore``, await ``serve_control`` on its loop instead."""
    if isinstance(store, AsyncKVStore):
        raise InvalidArgumentError("for an AsyncKVStore, await serve_control(store) on its loop")
    loop = store.loop_thread
    return loop.run(serve_control(store.async_store, config, namespaces=namespaces, loop=loop))
