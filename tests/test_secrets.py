"""Secret Manager reads through the real client and a local gRPC Secret Manager."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from tests.harness.secretmanager import LocalSecretManager
from worker.core import secrets
from worker.core.settings import SettingsError, database_settings
from worker.delivery.config import smtp_settings

ROOT = Path(__file__).resolve().parents[1]
NAME = "projects/test-project/secrets/database-url/versions/latest"
DB_URL = "postgresql://worker:s3cr3t-pa55@db.internal:5432/email"


def test_reads_a_secret_through_the_client(secret_manager: LocalSecretManager) -> None:
    secret_manager.secrets[NAME] = DB_URL
    assert secrets.access_secret(NAME) == DB_URL
    assert secret_manager.requested == [NAME]


def test_second_read_is_cached(secret_manager: LocalSecretManager) -> None:
    secret_manager.secrets[NAME] = DB_URL
    assert secrets.access_secret(NAME) == DB_URL
    secret_manager.secrets[NAME] = "changed"
    assert secrets.access_secret(NAME) == DB_URL
    assert secret_manager.calls == 1


def test_each_name_is_read_once(secret_manager: LocalSecretManager) -> None:
    other = "projects/test-project/secrets/smtp-password/versions/3"
    secret_manager.secrets[NAME] = DB_URL
    secret_manager.secrets[other] = "pw"
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda n=n: results.append(secrets.access_secret(n)))
        for n in [NAME, other] * 4
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted([DB_URL, "pw"] * 4)
    assert sorted(secret_manager.requested) == sorted([NAME, other])


def test_one_trailing_newline_is_stripped(secret_manager: LocalSecretManager) -> None:
    names = [f"projects/test-project/secrets/s{i}/versions/1" for i in range(4)]
    values: list[str | bytes] = ["a\n", "a\n\n", "a\r\n", b"caf\xc3\xa9"]
    for name, value in zip(names, values, strict=True):
        secret_manager.secrets[name] = value
    assert [secrets.access_secret(name) for name in names] == ["a", "a\n", "a", "café"]


def test_non_utf8_value_is_an_error_without_the_value(
    secret_manager: LocalSecretManager,
) -> None:
    secret_manager.secrets[NAME] = b"\xffs3cr3t"
    with pytest.raises(secrets.SecretError) as caught:
        secrets.access_secret(NAME)
    assert NAME in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_unknown_secret_is_a_secret_error_naming_it(secret_manager: LocalSecretManager) -> None:
    with pytest.raises(secrets.SecretError) as caught:
        secrets.access_secret(NAME)
    text = str(caught.value)
    assert NAME in text
    assert "not found" in text
    assert "\n" not in text


def test_permission_denied_is_a_secret_error(secret_manager: LocalSecretManager) -> None:
    secret_manager.secrets[NAME] = DB_URL
    secret_manager.errors[NAME] = grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(secrets.SecretError, match="permission denied") as caught:
        secrets.access_secret(NAME)
    assert NAME in str(caught.value)
    assert DB_URL not in str(caught.value)


def test_a_failed_read_is_not_cached(secret_manager: LocalSecretManager) -> None:
    with pytest.raises(secrets.SecretError):
        secrets.access_secret(NAME)
    secret_manager.secrets[NAME] = DB_URL
    assert secrets.access_secret(NAME) == DB_URL
    assert secret_manager.calls == 2


@pytest.mark.parametrize(
    "name",
    [
        "",
        "database-url",
        "projects/p/secrets/s",
        "projects/test-project/secrets/s/versions/",
        "projects//secrets/s/versions/latest",
        "projects/test-project/secrets/s/versions/latest/extra",
        "projects/test-project/secrets/s p/versions/latest",
        "projects/test-project/secrets/s/versions/latest\n",
    ],
)
def test_malformed_name_is_a_secret_error(secret_manager: LocalSecretManager, name: str) -> None:
    with pytest.raises(secrets.SecretError, match="not a secret version name"):
        secrets.access_secret(name)
    assert secret_manager.calls == 0


def test_unavailable_server_is_a_secret_error(
    secret_manager: LocalSecretManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets, "TOTAL_TIMEOUT_SECONDS", 2.0)
    secret_manager.stop()
    secrets.reset()
    with pytest.raises(secrets.SecretError) as caught:
        secrets.access_secret(NAME)
    assert NAME in str(caught.value)
    assert "\n" not in str(caught.value)


def test_set_client_replaces_the_client(
    secret_manager: LocalSecretManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.cloud.secretmanager_v1 import SecretManagerServiceClient
    from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
        SecretManagerServiceGrpcTransport,
    )

    other = LocalSecretManager()
    other.start()
    try:
        other.secrets[NAME] = "from the other server"
        secret_manager.secrets[NAME] = DB_URL
        assert secrets.access_secret(NAME) == DB_URL
        channel = grpc.insecure_channel(other.endpoint)
        secrets.set_client(
            SecretManagerServiceClient(transport=SecretManagerServiceGrpcTransport(channel=channel))
        )
        assert secrets.access_secret(NAME) == "from the other server"  # cache cleared too
        assert (secret_manager.calls, other.calls) == (1, 1)
        channel.close()
    finally:
        secrets.reset()
        other.stop()


# --- through worker.core.settings ----------------------------------------------------------------


def test_database_settings_reads_the_secret(secret_manager: LocalSecretManager) -> None:
    secret_manager.secrets[NAME] = DB_URL + "\n"
    settings = database_settings({"DATABASE_URL_SECRET": NAME})
    assert settings.url == DB_URL
    assert DB_URL not in repr(settings)
    assert "s3cr3t" not in repr(settings)


def test_database_url_and_secret_together_is_a_settings_error(
    secret_manager: LocalSecretManager,
) -> None:
    with pytest.raises(SettingsError, match="not both"):
        database_settings({"DATABASE_URL": "x", "DATABASE_URL_SECRET": "y"})
    assert secret_manager.calls == 0


def test_unknown_secret_is_a_one_line_settings_error(secret_manager: LocalSecretManager) -> None:
    with pytest.raises(SettingsError) as caught:
        database_settings({"DATABASE_URL_SECRET": NAME})
    text = str(caught.value)
    assert text.startswith("DATABASE_URL_SECRET: ")
    assert NAME in text
    assert "\n" not in text


def test_smtp_password_secret_is_not_in_repr(secret_manager: LocalSecretManager) -> None:
    name = "projects/test-project/secrets/smtp-password/versions/latest"
    secret_manager.secrets[name] = "hunter2-smtp"
    settings = smtp_settings(
        {
            "SMTP_HOST": "smtp.example.com",
            "SMTP_USERNAME": "mailer",
            "SMTP_PASSWORD_SECRET": name,
            "EMAIL_FROM": "noreply@example.com",
        }
    )
    assert settings.password == "hunter2-smtp"
    assert "hunter2" not in repr(settings)


def test_importing_worker_secrets_does_not_import_the_client_library() -> None:
    code = (
        "import sys\n"
        "import worker.core.secrets, worker.core.settings\n"
        "prefixes = ('google.cloud.secretmanager', 'google.api_core', 'grpc')\n"
        "loaded = [m for m in sys.modules if m.startswith(prefixes)]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
