"""Who is calling the control API: bearer tokens mapped to the admin or a tenant.

Tokens come from the ``control`` config (directly or from environment
variables) and are kept only as SHA-256 digests, compared in constant time.
With no token and no tenant configured (loopback only, which the config
enforces), every caller is the admin; client certificates (mTLS) are checked
by TLS itself before a request gets here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import SecretStr

from kvstore.config import ControlConfig
from kvstore.errors import AuthenticationError, ConfigError, PermissionDeniedError


@dataclass(frozen=True)
class Principal:
    """The caller: the admin (``tenant`` None) or one tenant."""

    tenant: str | None = None

    @property
    def admin(self) -> bool:
        return self.tenant is None


ADMIN = Principal()


def secret_value(
    value: SecretStr | None, env: str | None, what: str, environ: Mapping[str, str]
) -> str | None:
    """A secret given directly or by the name of an environment variable (which must be set)."""
    if value is not None:
        secret = value.get_secret_value()
    elif env is not None:
        secret = environ.get(env, "")
        if not secret:
            raise ConfigError(f"{what}: environment variable {env} is not set")
    else:
        return None
    if not secret:
        raise ConfigError(f"{what} must not be empty")
    return secret


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Credentials:
    """Token digests and whom each names; ``authenticate`` turns a header into a Principal."""

    def __init__(self, config: ControlConfig, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._tokens: list[tuple[bytes, Principal]] = []
        admin = secret_value(config.token, config.token_env, "control token", env)
        if admin is not None:
            self._tokens.append((_digest(admin), ADMIN))
        for tenant in config.tenants:
            token = secret_value(tenant.token, tenant.token_env, f"tenant {tenant.name}", env)
            if token is None:
                raise ConfigError(f"tenant {tenant.name} has no token")
            self._tokens.append((_digest(token), Principal(tenant.name)))
        if len({digest for digest, _ in self._tokens}) != len(self._tokens):
            raise ConfigError("control tokens must differ from each other")
        self.required = bool(self._tokens)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an ``Authorization`` header value.

        AuthenticationError without a bearer token where one is required,
        PermissionDeniedError for a token that matches nobody.
        """
        if not self.required:
            return ADMIN
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("this control server needs a bearer token")
        digest = _digest(token.strip())
        found: Principal | None = None
        for known, principal in self._tokens:
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise PermissionDeniedError("the bearer token is not valid")
        return found
