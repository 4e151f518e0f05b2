"""The support console's settings: its own reader login and the key that signs its page
cursors. Parsed once at start; a missing or malformed value raises `SettingsError`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from worker.core import settings
from worker.core.settings import DatabaseSettings, SettingsError

# The console's cursor key, at least SHA-256's output size: a shorter key would be the weak
# link of the MAC that keeps page cursors from being forged.
MIN_CURSOR_KEY_BYTES = 32


@dataclass(frozen=True)
class ConsoleSettings:
    database: DatabaseSettings
    # Signs the console's page cursors (worker/console/cursors.py); one per deployment.
    cursor_key: bytes = field(repr=False)


def console_settings(env: Mapping[str, str] = os.environ) -> ConsoleSettings:
    """Everything the support console needs: its reader login and its cursor key."""
    database = console_database_settings(env)
    key = settings.secret_or_env(env, "CONSOLE_CURSOR_KEY")
    if key is None:
        raise SettingsError(
            "CONSOLE_CURSOR_KEY or CONSOLE_CURSOR_KEY_SECRET is required but not set"
            f" (at least {MIN_CURSOR_KEY_BYTES} random bytes, e.g. `openssl rand -base64 48`)"
        )
    size = len(key.encode("utf-8"))
    if size < MIN_CURSOR_KEY_BYTES:
        # The length only: the value is a secret.
        source = "CONSOLE_CURSOR_KEY"
        if settings.raw(env, "CONSOLE_CURSOR_KEY_SECRET") is not None:
            source = "CONSOLE_CURSOR_KEY_SECRET's secret"
        raise SettingsError(
            f"{source} must be at least {MIN_CURSOR_KEY_BYTES} bytes, got {size}"
            " (e.g. `openssl rand -base64 48`)"
        )
    return ConsoleSettings(database=database, cursor_key=key.encode("utf-8"))


def console_database_settings(env: Mapping[str, str] = os.environ) -> DatabaseSettings:
    """The support console's own login (an `email_reader` one), never the worker's: its own
    variable, so a console cannot be pointed at the worker's credentials by accident."""
    url = settings.secret_or_env(env, "CONSOLE_DATABASE_URL")
    if url is None:
        raise SettingsError(
            "CONSOLE_DATABASE_URL or CONSOLE_DATABASE_URL_SECRET is required but not set"
        )
    return DatabaseSettings(
        url=url,
        pool_max_size=settings.parsed(
            env, "DB_POOL_MAX_SIZE", 4, settings.int_in(1, 100), "an integer 1..100"
        ),
        connect_timeout_seconds=settings.parsed(
            env, "DB_TIMEOUT_SECONDS", 10.0, settings.positive_float, "a positive number"
        ),
    )
