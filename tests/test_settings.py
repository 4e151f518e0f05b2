"""Settings: every variable parsed once, every problem one clear line naming the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.secretmanager import LocalSecretManager
from worker.console.config import console_settings
from worker.core import secrets
from worker.core.settings import SettingsError, log_level
from worker.delivery.config import load_settings, parse_rate_limits

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "DATABASE_URL": "postgresql://worker@127.0.0.1/email",
    "SMTP_HOST": "smtp.example.com",
    "EMAIL_FROM": "Acme <no-reply@acme.example>",
    "GOOGLE_CLOUD_PROJECT": "acme-mail",
    "DEAD_LETTER_TOPIC": "email-deliveries-dead-letter",
}


def test_defaults_follow_the_contract() -> None:
    settings = load_settings(BASE)
    assert (settings.smtp.port, settings.smtp.security, settings.smtp.timeout_seconds) == (
        587,
        "starttls",
        10.0,
    )
    assert settings.retry.max_attempts == 5
    assert settings.smtp.message_id_domain == "acme.example"
    assert settings.pubsub.topic_path("email-deliveries-dead-letter") == (
        "projects/acme-mail/topics/email-deliveries-dead-letter"
    )
    assert settings.pubsub.topic_path("projects/other/topics/t") == "projects/other/topics/t"
    assert "worker@" not in repr(settings)  # the URL may hold a password


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SMTP_HOST": ""}, "SMTP_HOST is required but not set"),
        ({"SMTP_PORT": "abc"}, "SMTP_PORT must be an integer 1..65535, got 'abc'"),
        ({"SMTP_PORT": "70000"}, "SMTP_PORT must be an integer 1..65535, got '70000'"),
        ({"SMTP_SECURITY": "tls"}, "SMTP_SECURITY must be starttls, ssl or none, got 'tls'"),
        (
            {"SMTP_TIMEOUT_SECONDS": "-1"},
            "SMTP_TIMEOUT_SECONDS must be a positive number, got '-1'",
        ),
        ({"EMAIL_FROM": "nobody"}, "EMAIL_FROM must be an email address, got 'nobody'"),
        ({"SMTP_PASSWORD": "pw"}, "SMTP_PASSWORD is set but SMTP_USERNAME is not"),
        ({"MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS must be an integer 1..100, got '0'"),
        ({"CONCURRENCY": "0"}, "CONCURRENCY must be an integer 1..1000, got '0'"),
        ({"THREADS": "many"}, "THREADS must be an integer 1..1000, got 'many'"),
        ({"DEAD_LETTER_TOPIC": ""}, "DEAD_LETTER_TOPIC is required but not set"),
        (
            {"LOG_LEVEL": "verbose"},
            "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'verbose'",
        ),
        ({"DATABASE_URL": ""}, "DATABASE_URL or DATABASE_URL_SECRET is required but not set"),
        (
            {"LEASE_SECONDS": "20", "SMTP_TIMEOUT_SECONDS": "10"},
            "LEASE_SECONDS (20) must be more than twice SMTP_TIMEOUT_SECONDS (10) plus one",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(change: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({**BASE, **change})
    assert str(error.value) == message
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("change", "size"),
    [
        ({}, 4),  # functions-framework's default: 4 threads on one CPU
        ({"THREADS": "12"}, 12),  # what gunicorn really runs
        ({"THREADS": "12", "CONCURRENCY": "16"}, 16),  # the deploy's --concurrency wins
        ({"CONCURRENCY": "16", "DB_POOL_MAX_SIZE": "3"}, 16),  # the database pool alone
    ],
)
def test_pools_are_sized_from_the_concurrency(change: dict[str, str], size: int) -> None:
    """Every request in flight gets its own database and SMTP connection, never waits."""
    settings = load_settings({**BASE, **change})
    assert settings.smtp.max_idle_connections == size
    assert settings.database.pool_max_size == int(change.get("DB_POOL_MAX_SIZE", size))


@pytest.mark.parametrize(
    ("value", "level"), [(None, "INFO"), ("", "INFO"), ("debug", "DEBUG"), (" Warning ", "WARNING")]
)
def test_log_level(value: str | None, level: str) -> None:
    env = {} if value is None else {"LOG_LEVEL": value}
    assert log_level(env) == level


# The worker's logger, as the function gets it: configured when the pipeline is imported.
_LOG_EVERY_LEVEL = """
from worker.delivery import pipeline
pipeline.log.debug("at debug")
pipeline.log.info("at info")
pipeline.log.warning("at warning")
pipeline.log.error("at error")
"""


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, ["INFO", "WARNING", "ERROR"]),
        ("DEBUG", ["DEBUG", "INFO", "WARNING", "ERROR"]),
        ("warning", ["WARNING", "ERROR"]),
        ("ERROR", ["ERROR"]),
    ],
)
def test_log_level_is_honoured(value: str | None, shown: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    if value is not None:
        env["LOG_LEVEL"] = value
    result = subprocess.run(
        [sys.executable, "-c", _LOG_EVERY_LEVEL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["severity"] for line in lines] == shown
    assert [line["message"] for line in lines] == [f"at {level.lower()}" for level in shown]


# --- RATE_LIMITS (docs/operating.md) ---------------------------------------------------------


def test_rate_limits_by_workflow_default_none() -> None:
    assert load_settings(BASE).rate_limits == {}
    limits = load_settings(
        {**BASE, "RATE_LIMITS": "verification-code=5/1h, password-reset=3/90m,invite=20/1d"}
    ).rate_limits
    assert {name: (r.count, r.window_seconds) for name, r in limits.items()} == {
        "verification-code": (5, 3600),
        "password-reset": (3, 5400),
        "invite": (20, 86400),
    }
    assert limits["invite"].text == "20/1d"
    assert parse_rate_limits("verification-code=1/30s")["verification-code"].window_seconds == 30


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "invite",
            "RATE_LIMITS entry 'invite': must be workflow=N/window, e.g. verification-code=5/1h",
        ),
        (
            "invite=5/1h,verfication-code=5/1h",
            "RATE_LIMITS entry 'verfication-code=5/1h': unknown workflow; the workflows are "
            "invite, password-reset, verification-code",
        ),
        (
            "invite=5/1w",
            "RATE_LIMITS entry 'invite=5/1w': the limit must be N/window: N from 1, a window "
            "like 30s, 10m, 1h or 1d",
        ),
        (
            "invite=0/1h",
            "RATE_LIMITS entry 'invite=0/1h': the limit must be N/window: N from 1, a window "
            "like 30s, 10m, 1h or 1d",
        ),
        (
            "invite=five/1h",
            "RATE_LIMITS entry 'invite=five/1h': the limit must be N/window: N from 1, a window "
            "like 30s, 10m, 1h or 1d",
        ),
        ("invite=5/1h,invite=9/1d", "RATE_LIMITS entry 'invite=9/1d': invite has a limit already"),
        (
            "invite=5/91d",
            "RATE_LIMITS entry 'invite=5/91d': the window must be at most 90d (the ledger keeps "
            "90 days by default)",
        ),
        ("invite=5/1h,", "RATE_LIMITS has an empty entry in 'invite=5/1h,'"),
    ],
)
def test_a_malformed_rate_limit_names_the_entry(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({**BASE, "RATE_LIMITS": value})
    assert str(error.value) == message


def test_a_malformed_rate_limit_stops_the_function_with_one_line() -> None:
    env = {
        **os.environ,
        **BASE,
        "SMTP_SECURITY": "none",
        "RATE_LIMITS": "verification-code=5/1h,invite=20 per day",
    }
    proc = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "email-worker: configuration error: RATE_LIMITS entry 'invite=20 per day': the limit "
        "must be N/window: N from 1, a window like 30s, 10m, 1h or 1d\n"
    )


# --- the support console ----------------------------------------------------------------------

CONSOLE = {
    "CONSOLE_DATABASE_URL": "postgresql://reader@127.0.0.1/email",
    "CONSOLE_CURSOR_KEY": "k" * 32,
}
CURSOR_KEY_VERSION = "projects/acme-mail/secrets/email-console-cursor-key/versions/latest"


def test_the_console_signs_its_cursors_with_its_own_key() -> None:
    settings = console_settings(CONSOLE)
    assert settings.cursor_key == b"k" * 32
    assert settings.database.url == CONSOLE["CONSOLE_DATABASE_URL"]
    assert "kkkk" not in repr(settings) and "reader@" not in repr(settings)
    # Counted in bytes, as the MAC uses it: 16 two-byte characters are enough.
    assert (
        console_settings({**CONSOLE, "CONSOLE_CURSOR_KEY": "é" * 16}).cursor_key
        == ("é" * 16).encode()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"CONSOLE_CURSOR_KEY": None},
            "CONSOLE_CURSOR_KEY or CONSOLE_CURSOR_KEY_SECRET is required but not set (at least 32"
            " random bytes, e.g. `openssl rand -base64 48`)",
        ),
        (
            {"CONSOLE_CURSOR_KEY": "  "},
            "CONSOLE_CURSOR_KEY or CONSOLE_CURSOR_KEY_SECRET is required but not set (at least 32"
            " random bytes, e.g. `openssl rand -base64 48`)",
        ),
        (
            {"CONSOLE_CURSOR_KEY": "k" * 31},
            "CONSOLE_CURSOR_KEY must be at least 32 bytes, got 31 (e.g. `openssl rand -base64 48`)",
        ),
        (
            {"CONSOLE_CURSOR_KEY_SECRET": CURSOR_KEY_VERSION},
            "set CONSOLE_CURSOR_KEY or CONSOLE_CURSOR_KEY_SECRET, not both",
        ),
    ],
)
def test_a_missing_or_short_cursor_key_is_one_line(
    change: dict[str, str | None], message: str
) -> None:
    env = {**CONSOLE, **change}
    with pytest.raises(SettingsError) as error:
        console_settings({key: value for key, value in env.items() if value is not None})
    assert str(error.value) == message
    assert "kkkk" not in str(error.value)


def test_the_cursor_key_from_secret_manager(secret_manager: LocalSecretManager) -> None:
    env = {"CONSOLE_DATABASE_URL": CONSOLE["CONSOLE_DATABASE_URL"]}
    # Written with `openssl rand -base64 48 | deploy/set-secret.sh ...`: the newline is dropped.
    secret_manager.secrets[CURSOR_KEY_VERSION] = "x" * 64 + "\n"
    settings = console_settings({**env, "CONSOLE_CURSOR_KEY_SECRET": CURSOR_KEY_VERSION})
    assert settings.cursor_key == b"x" * 64
    secret_manager.secrets[CURSOR_KEY_VERSION] = "x" * 20
    secrets.reset()
    with pytest.raises(SettingsError) as error:
        console_settings({**env, "CONSOLE_CURSOR_KEY_SECRET": CURSOR_KEY_VERSION})
    assert str(error.value) == (
        "CONSOLE_CURSOR_KEY_SECRET's secret must be at least 32 bytes, got 20"
        " (e.g. `openssl rand -base64 48`)"
    )


# --- the fallback relay and its breaker ---------------------------------------------------------


def test_no_fallback_unless_its_host_is_set() -> None:
    settings = load_settings(BASE)
    assert settings.fallback is None
    assert (settings.breaker.trip_after, settings.breaker.cooldown_seconds) == (5, 30)


def test_the_fallback_relay_has_its_own_connection_and_the_primarys_sender() -> None:
    settings = load_settings(
        {
            **BASE,
            "SMTP_PROVIDER": "ses",
            "FALLBACK_SMTP_HOST": "smtp.backup.example",
            "FALLBACK_SMTP_SECURITY": "ssl",
            "FALLBACK_SMTP_USERNAME": "backup",
            "FALLBACK_SMTP_PASSWORD": "backup-password",
            "FALLBACK_SMTP_PROVIDER": "mailgun",
            "RELAY_TRIP_AFTER": "3",
            "RELAY_COOLDOWN_SECONDS": "60",
        }
    )
    fallback = settings.fallback
    assert fallback is not None
    assert (fallback.host, fallback.port, fallback.security) == ("smtp.backup.example", 587, "ssl")
    assert (fallback.username, fallback.password) == ("backup", "backup-password")
    assert (settings.smtp.provider, fallback.provider) == ("ses", "mailgun")
    assert (fallback.sender, fallback.message_id_domain) == (
        settings.smtp.sender,
        settings.smtp.message_id_domain,
    )
    assert fallback.timeout_seconds == settings.smtp.timeout_seconds  # one lease rule
    assert (settings.breaker.trip_after, settings.breaker.cooldown_seconds) == (3, 60)
    assert "backup-password" not in repr(settings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"FALLBACK_SMTP_PORT": "0"},
            "FALLBACK_SMTP_PORT must be an integer 1..65535, got '0'",
        ),
        (
            {"FALLBACK_SMTP_SECURITY": "tls"},
            "FALLBACK_SMTP_SECURITY must be starttls, ssl or none, got 'tls'",
        ),
        (
            {"FALLBACK_SMTP_PASSWORD": "pw"},
            "FALLBACK_SMTP_PASSWORD is set but FALLBACK_SMTP_USERNAME is not",
        ),
        (
            {
                "FALLBACK_SMTP_USERNAME": "u",
                "FALLBACK_SMTP_PASSWORD": "pw",
                "FALLBACK_SMTP_PASSWORD_SECRET": "projects/p/secrets/s/versions/1",
            },
            "set FALLBACK_SMTP_PASSWORD or FALLBACK_SMTP_PASSWORD_SECRET, not both",
        ),
        (
            {"FALLBACK_SMTP_PROVIDER": "postfix"},
            "FALLBACK_SMTP_PROVIDER must be one of none, ses, sendgrid, mailgun, postmark,"
            " resend, got 'postfix'",
        ),
        ({"RELAY_TRIP_AFTER": "0"}, "RELAY_TRIP_AFTER must be an integer 1..1000, got '0'"),
        (
            {"RELAY_COOLDOWN_SECONDS": "soon"},
            "RELAY_COOLDOWN_SECONDS must be seconds 1..86400, got 'soon'",
        ),
    ],
)
def test_a_bad_fallback_setting_is_one_line_naming_it(change: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({**BASE, "FALLBACK_SMTP_HOST": "smtp.backup.example", **change})
    assert str(error.value) == message


def test_the_fallback_password_from_secret_manager(secret_manager: LocalSecretManager) -> None:
    version = "projects/acme-mail/secrets/fallback-smtp-password/versions/1"
    secret_manager.secrets[version] = "from-secret-manager"
    settings = load_settings(
        {
            **BASE,
            "FALLBACK_SMTP_HOST": "smtp.backup.example",
            "FALLBACK_SMTP_USERNAME": "backup",
            "FALLBACK_SMTP_PASSWORD_SECRET": version,
        }
    )
    assert settings.fallback is not None
    assert settings.fallback.password == "from-secret-manager"
