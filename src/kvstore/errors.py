"""The closed error taxonomy of kvstore.

Every failure a driver or the store reports is one of the classes below, so
callers can branch on the kind of failure instead of parsing messages. Each
error carries the name of the driver it came from (``None`` for the core).
A miss is never an error: ``get_many`` returns ``None`` for absent keys.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every error kvstore raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, driver: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.driver = driver

    def __str__(self) -> str:
        return f"[{self.driver}] {self.message}" if self.driver else self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.driver))


def _rebuild(cls: type[KVStoreError], message: str, driver: str | None) -> KVStoreError:
    return cls(message, driver=driver)


class NotFoundError(KVStoreError):
    """A named thing (a driver scheme, a tier, a path) does not exist."""


class InvalidArgumentError(KVStoreError, ValueError):
    """An argument has the wrong type, size or value."""


class InvalidKeyError(InvalidArgumentError):
    """A key is not bytes, is empty, or is longer than ``MAX_KEY_BYTES``."""


class ConfigError(KVStoreError, ValueError):
    """A URL, YAML file or config value cannot be turned into a valid config."""


class DriverLoadError(ConfigError):
    """A driver's plugin or implementation could not be imported or registered."""


class DriverUnavailableError(KVStoreError):
    """The backing service or device cannot be reached; calls may succeed later."""

    retryable = True


class ClosedError(KVStoreError):
    """A driver or a store was closed; it will not serve calls again."""


class DriverClosedError(DriverUnavailableError, ClosedError):
    """The driver was closed; it will not serve calls again."""

    retryable = False


class StoreClosedError(ClosedError, InvalidArgumentError):
    """The store was closed; it will not serve calls again.

    It is also an ``InvalidArgumentError``, what a closed store raised in 0.1,
    for one release: catch ``ClosedError`` or ``StoreClosedError``.
    """


class TransientError(KVStoreError):
    """A failure that a retry may fix (throttling, a dropped connection)."""

    retryable = True


class DriverTimeoutError(TransientError):
    """A call took longer than its configured timeout and was abandoned."""


class NotSupportedError(KVStoreError):
    """The driver does not offer this operation (see its ``Capabilities``)."""


class CapacityError(KVStoreError):
    """A value does not fit: larger than the driver's limit or its free capacity."""


class IntegrityError(KVStoreError):
    """Stored bytes failed verification: corrupt, truncated or foreign."""


class InternalError(KVStoreError):
    """A bug: an exception outside this taxonomy escaped a driver call. The store
    logs its traceback, counts it (``kvstore_internal_errors_total``) and serves
    a miss; drivers never raise it."""


class AuthenticationError(KVStoreError):
    """A control request carried no credentials where they are required (HTTP 401)."""


class PermissionDeniedError(KVStoreError):
    """A control request's credentials are wrong or do not allow it (HTTP 403)."""


ALL_ERRORS: tuple[type[KVStoreError], ...] = (
    NotFoundError,
    InvalidArgumentError,
    InvalidKeyError,
    ConfigError,
    DriverLoadError,
    DriverUnavailableError,
    ClosedError,
    DriverClosedError,
    StoreClosedError,
    TransientError,
    DriverTimeoutError,
    NotSupportedError,
    CapacityError,
    IntegrityError,
    InternalError,
    AuthenticationError,
    PermissionDeniedError,
)
