"""The s3 driver's botocore client: building it, request bodies read from the caller's
memory, and the translation of botocore, urllib3 and socket errors into kvstore's."""

from __future__ import annotations

import io
import threading
from typing import Any

import botocore.session
import urllib3.exceptions
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from kvstore.errors import (
    CapacityError,
    ConfigError,
    DriverTimeoutError,
    DriverUnavailableError,
    KVStoreError,
    NotFoundError,
    TransientError,
)

from .config import S3Config

_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "TooManyRequests",
        "RequestLimitExceeded",
    }
)
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
_LOADER_LOCK = threading.Lock()
_shared_loader: Any = None


class Body:
    """A read-only, seekable file over a buffer whose reads are views, not copies:
    botocore hashes it and urllib3 sends it piece by piece straight from the
    caller's memory, and a retry rewinds it (a bare memoryview cannot be rewound)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._position = 0

    @classmethod
    def of(cls, view: memoryview) -> Body | bytes:
        """A body for ``view``; ``b""`` for an empty value, which needs no file."""
        return cls(view) if len(view) else b""

    def __len__(self) -> int:
        return len(self._view) - self._position

    def read(self, size: int | None = -1) -> memoryview:
        end = len(self._view)
        if size is not None and size >= 0:
            end = min(end, self._position + size)
        piece = self._view[self._position : end]
        self._position = max(self._position, end)
        return piece

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = min(max(base[whence] + offset, 0), len(self._view))
        return self._position

    def tell(self) -> int:
        return self._position


def open_client(config: S3Config) -> Any:
    """A botocore S3 client built from ``config``, with the bucket checked (or created).

    Blocking: the driver calls it on its pool; the raw-client baseline uses it too.
    Request bodies are files whose reads are views of the caller's buffers, so a
    put copies nothing on the client."""
    try:
        client = _botocore_session(config.profile).create_client(
            "s3",
            region_name=config.region,
            endpoint_url=config.endpoint_url,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            aws_session_token=config.session_token,
            config=BotoConfig(
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                retries={"mode": config.retry_mode, "total_max_attempts": config.max_attempts},
                max_pool_connections=config.io_threads,
                s3={"addressing_style": config.addressing_style},
                request_checksum_calculation=config.checksums,
                response_checksum_validation=config.checksums,
                tcp_keepalive=True,
                user_agent_extra="kvstore",
            ),
        )
    except (BotoCoreError, ValueError) as exc:
        raise translate(exc, "open", config) from exc
    try:
        _check_bucket(client, config)
    except BaseException:
        client.close()
        raise
    return client


def _botocore_session(profile: str | None) -> Any:
    """A fresh botocore session (its own credential chain and settings) that shares
    one loader of service models with the others: opening a driver then takes
    milliseconds instead of reparsing the S3 model each time."""
    global _shared_loader
    session = botocore.session.Session(profile=profile)
    with _LOADER_LOCK:
        if _shared_loader is None:
            _shared_loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _shared_loader)
    return session


def _check_bucket(client: Any, config: S3Config) -> None:
    """Raise NotFoundError if the bucket is missing (unless ``create_bucket``)."""
    try:
        client.head_bucket(Bucket=config.bucket)
        return
    except ClientError as exc:
        if status_of(exc) != 404 or not config.create_bucket:
            raise translate(exc, "open", config) from exc
    except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
        raise translate(exc, "open", config) from exc
    options: dict[str, Any] = {"Bucket": config.bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        options["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**options)
    except ClientError as exc:
        if code_of(exc) != "BucketAlreadyOwnedByYou":
            raise translate(exc, "open", config) from exc
    except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
        raise translate(exc, "open", config) from exc


def code_of(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def status_of(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def missing_key(exc: ClientError) -> bool:
    """A 404 for the object itself; a missing bucket is an error, not a miss."""
    return code_of(exc) in _MISSING_KEY_CODES or (
        status_of(exc) == 404 and code_of(exc) != "NoSuchBucket"
    )


def client_errors(config: S3Config, exc: Exception, operation: str) -> KVStoreError | None:
    """The driver's ErrorMap: botocore, urllib3 and socket failures translated, others not."""
    if isinstance(exc, (BotoCoreError, ClientError, urllib3.exceptions.HTTPError, OSError)):
        return translate(exc, operation, config)
    return None


def translate(exc: Exception, operation: str, config: S3Config) -> KVStoreError:
    """The kvstore error for a botocore, urllib3 or socket failure of ``operation``."""
    where = config.endpoint_url or "AWS S3"
    driver = config.scheme
    if isinstance(exc, ClientError):
        message = str(exc.response.get("Error", {}).get("Message", "")) or str(exc)
        return error_for_code(code_of(exc), status_of(exc), message, operation, config)
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return DriverTimeoutError(f"{operation} timed out at {where}: {exc}", driver=driver)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ProfileNotFound)):
        return ConfigError(f"no usable AWS credentials for {where}: {exc}", driver=driver)
    if isinstance(exc, (NoRegionError, ValueError)):
        return ConfigError(f"cannot build an S3 client for {where}: {exc}", driver=driver)
    return DriverUnavailableError(f"{operation} failed: cannot reach {where}: {exc}", driver=driver)


def error_for_code(
    code: str, status: int, message: str, operation: str, config: S3Config
) -> KVStoreError:
    """The kvstore error for an S3 error response."""
    driver = config.scheme
    where = config.endpoint_url or "AWS S3"
    detail = f"{operation} failed at {where}: {code or status} {message}".rstrip()
    if code == "NoSuchBucket" or (operation == "open" and status == 404):
        return NotFoundError(
            f"bucket {config.bucket!r} does not exist at {where} (create it, or open with "
            "create_bucket=true)",
            driver=driver,
        )
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientError(detail, driver=driver)
    if code in _ACCESS_CODES or status == 403:
        return DriverUnavailableError(
            f"{detail} (access refused: check the credentials and the bucket policy)",
            driver=driver,
        )
    if code == "EntityTooLarge":
        return CapacityError(detail, driver=driver)
    return DriverUnavailableError(detail, driver=driver)
