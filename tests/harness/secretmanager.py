"""A local Secret Manager: a real gRPC server speaking `SecretManagerService.AccessSecretVersion`.

The `secret_manager` fixture starts it on 127.0.0.1 (a free port), points
`SECRET_MANAGER_ENDPOINT` at it and resets `worker.core.secrets` before and after the test, so the
real client library (insecure channel, anonymous credentials) talks to it:

    def test_x(secret_manager):
        secret_manager.secrets["projects/p/secrets/db/versions/latest"] = "postgresql://..."
        ...
        assert secret_manager.calls == 1

Unknown names answer NOT_FOUND; `secret_manager.errors[name] = grpc.StatusCode.X` makes a
name answer with that status instead.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.cloud.secretmanager_v1.types import (
    AccessSecretVersionRequest,
    AccessSecretVersionResponse,
    SecretPayload,
)

from worker.core import secrets

SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalSecretManager:
    """The server and what it holds; `secrets` values may be `str` (UTF-8) or `bytes`."""

    def __init__(self) -> None:
        self.secrets: dict[str, str | bytes] = {}
        self.errors: dict[str, grpc.StatusCode] = {}
        self.requested: list[str] = []
        self._lock = threading.Lock()
        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "AccessSecretVersion": grpc.unary_unary_rpc_method_handler(
                    self._access_secret_version,
                    request_deserializer=AccessSecretVersionRequest.deserialize,
                    response_serializer=AccessSecretVersionResponse.serialize,
                )
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        bound = self._server.add_insecure_port(self.endpoint)
        if bound != self.port:
            raise RuntimeError(f"could not bind the local Secret Manager to {self.endpoint}")

    @property
    def calls(self) -> int:
        """How many AccessSecretVersion requests arrived (any name, any outcome)."""
        with self._lock:
            return len(self.requested)

    def _access_secret_version(
        self, request: AccessSecretVersionRequest, context: grpc.ServicerContext
    ) -> AccessSecretVersionResponse:
        name = str(request.name)
        with self._lock:
            self.requested.append(name)
            status = self.errors.get(name)
            value = self.secrets.get(name)
        if status is not None:
            context.abort(status, f"{status.name} for {name}")
        if value is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Secret Version [{name}] not found.")
        data = value.encode("utf-8") if isinstance(value, str) else value
        return AccessSecretVersionResponse(name=name, payload=SecretPayload(data=data))

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)


@pytest.fixture
def secret_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalSecretManager]:
    server = LocalSecretManager()
    server.start()
    monkeypatch.setenv(secrets.ENDPOINT_ENV, server.endpoint)
    secrets.reset()
    try:
        yield server
    finally:
        secrets.reset()
        server.stop()


__all__ = ["LocalSecretManager", "secret_manager"]
