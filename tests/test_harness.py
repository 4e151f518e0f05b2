"""The harness cleans up after itself: a test run leaves nothing behind in /tmp."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.function import FunctionServer

# Enough for main.py to import; nothing is connected to until an event arrives.
SETTINGS = {
    "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    "SMTP_HOST": "127.0.0.1",
    "EMAIL_FROM": "noreply@example.com",
    "GOOGLE_CLOUD_PROJECT": "test-project",
    "DEAD_LETTER_TOPIC": "email-deliveries-dead-letter",
}


def test_a_function_server_deletes_its_own_log_directory() -> None:
    server = FunctionServer(SETTINGS)
    directory = server.log_path.parent
    assert directory.name.startswith("email-function-")
    server.start(timeout=60)
    try:
        assert directory.is_dir() and server.process is not None
    finally:
        server.stop()
    assert not directory.exists()


def test_a_server_that_failed_to_start_is_cleaned_up_and_its_log_kept() -> None:
    server = FunctionServer({**SETTINGS, "SMTP_PORT": "abc"})
    with pytest.raises(RuntimeError, match="functions-framework exited"):
        server.start(timeout=60)
    assert not server.log_path.parent.exists()  # no stop() needed: the caller never got one
    assert "configuration error: SMTP_PORT must be an integer" in server.logs()


def test_a_log_path_given_by_the_caller_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "function.log"
    server = FunctionServer({**SETTINGS, "SMTP_PORT": "abc"}, log_path=log)
    with pytest.raises(RuntimeError):
        server.start(timeout=60)
    server.stop()
    assert log.exists() and "SMTP_PORT" in log.read_text()
