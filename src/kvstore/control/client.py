"""A blocking HTTP client of the control API (what ``kvstore ctl`` uses).

Replies come back as the same pydantic models the server sends; an error
reply is raised as the kvstore error it names (``NotFoundError``,
``PermissionDeniedError``, ...), so callers branch on types, never on text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from kvstore.control.models import (
    ClearRequest,
    CompressRequest,
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
from kvstore.errors import (
    ALL_ERRORS,
    AuthenticationError,
    DriverUnavailableError,
    InvalidArgumentError,
    KVStoreError,
    PermissionDeniedError,
)

M = TypeVar("M", bound=BaseModel)
_KNOWN: tuple[type[KVStoreError], ...] = (
    KVStoreError,
    *ALL_ERRORS,
    AuthenticationError,
    PermissionDeniedError,
)
_ERRORS: dict[str, type[KVStoreError]] = {cls.__name__: cls for cls in _KNOWN}
_BY_STATUS: dict[int, type[KVStoreError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    422: InvalidArgumentError,
}


class ControlClient:
    """Talk to a control server at ``endpoint`` (``http://127.0.0.1:8740``).

    token: the bearer token (admin or tenant). cacert: the CA that signed the
    server's certificate (HTTPS). cert / key: a client certificate (mTLS).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | None = None,
        cacert: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: Any = True
        if cacert is not None:
            import ssl

            verify = ssl.create_default_context(cafile=str(cacert))
            if cert is not None:
                verify.load_cert_chain(str(cert), str(key) if key is not None else None)
        self.endpoint = endpoint.rstrip("/")
        self._http = httpx.Client(
            base_url=self.endpoint, headers=headers, verify=verify, timeout=timeout_s
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        reply: type[M],
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
    ) -> M:
        try:
            response = self._http.request(
                method,
                path,
                json=None if body is None else body.model_dump(mode="json", exclude_none=True),
                params={k: v for k, v in (params or {}).items() if v is not None},
            )
        except httpx.HTTPError as exc:
            raise DriverUnavailableError(
                f"cannot reach the control server at {self.endpoint}: {exc}"
            ) from None
        if response.is_success:
            try:
                return reply.model_validate_json(response.content)
            except ValidationError as exc:
                raise KVStoreError(f"the control server sent an unexpected reply: {exc}") from None
        raise _error(response)

    def lookup(self, request: LookupRequest) -> LookupReply:
        return self._call("POST", "/v1/lookup", LookupReply, request)

    def pin(self, request: PinRequest) -> PinReply:
        return self._call("POST", "/v1/pin", PinReply, request)

    def unpin(self, request: UnpinRequest) -> PinReply:
        return self._call("POST", "/v1/unpin", PinReply, request)

    def clear(self, request: ClearRequest) -> JobInfo:
        return self._call("POST", "/v1/clear", JobInfo, request)

    def move(self, request: MoveRequest) -> JobInfo:
        return self._call("POST", "/v1/move", JobInfo, request)

    def compress(self, request: CompressRequest) -> JobInfo:
        return self._call("POST", "/v1/compress", JobInfo, request)

    def health(self, timeout_s: float | None = None) -> HealthReply:
        return self._call("GET", "/v1/health", HealthReply, params={"timeout_s": timeout_s})

    def stats(self, tenant: str | None = None) -> StatsReply:
        return self._call("GET", "/v1/stats", StatsReply, params={"tenant": tenant})

    def jobs(self) -> JobList:
        return self._call("GET", "/v1/jobs", JobList)

    def job(self, job_id: str) -> JobInfo:
        return self._call("GET", f"/v1/jobs/{job_id}", JobInfo)

    def cancel(self, job_id: str) -> JobInfo:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel", JobInfo)

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 0.2,
        on_progress: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """Poll a job until it is no longer running; ``on_progress`` sees every poll."""
        while True:
            info = self.job(job_id)
            if on_progress is not None:
                on_progress(info)
            if info.state != "running":
                return info
            time.sleep(poll_s)


def _error(response: httpx.Response) -> KVStoreError:
    """The kvstore error an error reply names (by status where it names none)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        cls = _ERRORS.get(body["error"], KVStoreError)
        return cls(str(body.get("message", "")))
    cls = _BY_STATUS.get(response.status_code, KVStoreError)
    detail = body.get("detail") if isinstance(body, dict) else response.text
    return cls(f"HTTP {response.status_code}: {detail}")
