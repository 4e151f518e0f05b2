"""Secret Manager reads: each version name is read once per process and cached.

`google.cloud.secretmanager` is imported only when the first secret is read. With
`SECRET_MANAGER_ENDPOINT=host:port` set (tests, local runs) the client talks plain gRPC to
that endpoint without credentials; otherwise it is the default client (application
default credentials, the public endpoint). Errors are `SecretError`, one line that names the
secret and never contains its value.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import Any

__all__ = ["SecretError", "access_secret", "reset", "set_client"]

ENDPOINT_ENV = "SECRET_MANAGER_ENDPOINT"
# Per attempt, and in total across retries of UNAVAILABLE: a worker at start should fail
# with a clear line rather than hang.
RPC_TIMEOUT_SECONDS = 10.0
TOTAL_TIMEOUT_SECONDS = 30.0

_NAME = re.compile(
    r"projects/(?P<project>[A-Za-z0-9][A-Za-z0-9.:_-]*)"
    r"/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})"
    r"/versions/(?P<version>[A-Za-z0-9_-]{1,63})"  # latest, a number or an alias
)


class SecretError(Exception):
    """A secret could not be read. `str(error)` is one line naming the secret, not its value."""


class SecretReader:
    """One client and one cache of values per process (the instance's settings read their
    secrets through it once, at start)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Any = None  # SecretManagerServiceClient, created lazily
        self._client_is_ours = False
        self._cache: dict[str, str] = {}

    def set_client(self, client: Any | None) -> None:
        """Use `client` (anything with `access_secret_version`) from now on; None: the
        default. The value cache is cleared too, so the next read goes to the new client."""
        with self._lock:
            self._close_owned_client()
            self._client, self._client_is_ours = client, False
            self._cache.clear()

    def _close_owned_client(self) -> None:
        if self._client is not None and self._client_is_ours:
            with contextlib.suppress(Exception):  # best effort; dropped either way
                self._client.transport.close()
        self._client, self._client_is_ours = None, False

    def access(self, name: str) -> str:
        """The value of the secret version `projects/P/secrets/S/versions/V`, read once.

        The payload is decoded as UTF-8 and one trailing newline is stripped (values written
        with `echo ... | gcloud secrets versions add` end with one).
        """
        if _NAME.fullmatch(name) is None:
            raise SecretError(
                f"{name!r} is not a secret version name like projects/P/secrets/S/versions/latest"
            )
        with self._lock:  # held across the read: concurrent first reads make one call
            cached = self._cache.get(name)
            if cached is not None:
                return cached
            try:
                if self._client is None:
                    self._client, self._client_is_ours = _make_client(), True
                response = self._client.access_secret_version(
                    request={"name": name},
                    retry=_retry(),
                    timeout=min(RPC_TIMEOUT_SECONDS, TOTAL_TIMEOUT_SECONDS),
                )
            except Exception as error:
                # The cause is kept for tracebacks: it carries the name and status, never a
                # value.
                raise SecretError(f"secret {name}: {_describe(error)}") from error
            value = _payload_text(name, bytes(response.payload.data))
            self._cache[name] = value
            return value


# The process's reader: settings call `access_secret`, tests `set_client` and `reset`.
READER = SecretReader()
access_secret = READER.access
set_client = READER.set_client


def reset() -> None:
    """Forget cached values and the client (tests; a changed `SECRET_MANAGER_ENDPOINT`)."""
    READER.set_client(None)


def _make_client() -> Any:
    from google.cloud import secretmanager_v1  # deferred: only deployments using secrets pay

    endpoint = os.environ.get(ENDPOINT_ENV, "").strip()
    if not endpoint:
        return secretmanager_v1.SecretManagerServiceClient()

    import grpc
    from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
        SecretManagerServiceGrpcTransport,
    )

    # Given a channel, the transport uses no credentials at all (anonymous): nothing looks
    # for application default credentials.
    transport = SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(endpoint))
    return secretmanager_v1.SecretManagerServiceClient(transport=transport)


def _retry() -> Any:
    from google.api_core import exceptions, retry

    return retry.Retry(
        initial=0.2,
        maximum=5.0,
        multiplier=2.0,
        predicate=retry.if_exception_type(
            exceptions.ServiceUnavailable, exceptions.ResourceExhausted
        ),
        timeout=TOTAL_TIMEOUT_SECONDS,
    )


def _describe(error: Exception) -> str:
    """Why a read failed, without the server's free text (which we do not control)."""
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    if isinstance(error, auth_exceptions.DefaultCredentialsError):
        return "no application default credentials (or set SECRET_MANAGER_ENDPOINT locally)"
    if isinstance(error, exceptions.NotFound):
        return "not found"
    if isinstance(error, exceptions.PermissionDenied):
        return "permission denied (the service account needs roles/secretmanager.secretAccessor)"
    if isinstance(error, exceptions.Unauthenticated):
        return "unauthenticated (no usable credentials)"
    if isinstance(error, exceptions.FailedPrecondition):
        return "version is disabled or destroyed"
    if isinstance(error, exceptions.InvalidArgument):
        return "rejected as invalid"
    if isinstance(error, exceptions.RetryError | exceptions.DeadlineExceeded):
        return f"Secret Manager did not answer within {TOTAL_TIMEOUT_SECONDS:g} seconds"
    if isinstance(error, exceptions.ServiceUnavailable):
        return "Secret Manager is unavailable"
    if isinstance(error, exceptions.GoogleAPICallError) and error.code is not None:
        return f"failed with status {int(error.code)} ({type(error).__name__})"
    return f"failed ({type(error).__name__})"


def _payload_text(name: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"secret {name}: value is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text
