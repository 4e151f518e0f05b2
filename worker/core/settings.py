"""Settings from the environment (docs/reference.md).

Every value is parsed and checked once, at start; a missing or malformed one raises
`SettingsError` with a single line naming the variable, which `main.py` and the CLI print
instead of a traceback. `*_SECRET` variables name a Secret Manager version and are read
through `worker.core.secrets` (imported only when one is set, so local runs never load it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import TypeVar

T = TypeVar("T")
# Requests one instance serves at once when neither CONCURRENCY nor THREADS says otherwise:
# functions-framework's gunicorn default on one CPU (4 threads per CPU).
DEFAULT_CONCURRENCY = 4


class SettingsError(Exception):
    """A setting is missing or malformed. `str(error)` is one line for the operator."""


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = field(repr=False)
    pool_max_size: int = DEFAULT_CONCURRENCY
    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class PubSubSettings:
    project: str
    delivery_topic: str | None
    dead_letter_topic: str | None
    publish_timeout_seconds: float = 30.0

    def topic_path(self, topic: str) -> str:
        """A topic id becomes `projects/P/topics/T`; a full name is kept as given."""
        if topic.startswith("projects/"):
            return topic
        return f"projects/{self.project}/topics/{topic}"


@dataclass(frozen=True)
class RateLimit:
    """At most `count` emails of one workflow to one recipient in any `window_seconds`."""

    count: int
    window_seconds: int
    text: str  # as configured, e.g. "5/1h"


# --- parsing helpers -----------------------------------------------------------------


def raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def required(env: Mapping[str, str], name: str) -> str:
    value = raw(env, name)
    if value is None:
        raise SettingsError(f"{name} is required but not set")
    return value


def parsed(
    env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T], rule: str
) -> T:
    value = raw(env, name)
    if value is None:
        return default
    try:
        return parse(value)
    except ValueError:
        raise SettingsError(f"{name} must be {rule}, got {value!r}") from None


def int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = int(text)
        if not low <= number <= high:
            raise ValueError(text)
        return number

    return parse


def positive_float(text: str) -> float:
    number = float(text)
    if not number > 0:
        raise ValueError(text)
    return number


def secret_or_env(env: Mapping[str, str], name: str) -> str | None:
    """`NAME` itself, or the Secret Manager version named by `NAME_SECRET`."""
    direct = raw(env, name)
    secret_name = raw(env, f"{name}_SECRET")
    if direct is not None and secret_name is not None:
        raise SettingsError(f"set {name} or {name}_SECRET, not both")
    if secret_name is None:
        return direct
    from worker.core import secrets  # only deployments that use Secret Manager pay for it

    try:
        return secrets.access_secret(secret_name)
    except secrets.SecretError as error:
        raise SettingsError(f"{name}_SECRET: {error}") from None


def address(env: Mapping[str, str], name: str) -> str | None:
    value = raw(env, name)
    if value is None:
        return None
    _display, address = parseaddr(value)
    if "@" not in address or "\r" in value or "\n" in value:
        raise SettingsError(f"{name} must be an email address, got {value!r}")
    return value


# --- sections --------------------------------------------------------------------------


def concurrency(env: Mapping[str, str] = os.environ) -> int:
    """How many requests one instance serves at once: `CONCURRENCY` (the deploy sets it to
    Cloud Run's `--concurrency`), else functions-framework's `THREADS`, else 4.

    The instance's pools are sized from it: every request in flight can hold a database
    connection and an SMTP connection without waiting for another request's.
    """
    rule = "an integer 1..1000"
    threads = parsed(env, "THREADS", DEFAULT_CONCURRENCY, int_in(1, 1000), rule)
    return parsed(env, "CONCURRENCY", threads, int_in(1, 1000), rule)


def database_settings(env: Mapping[str, str] = os.environ) -> DatabaseSettings:
    url = secret_or_env(env, "DATABASE_URL")
    if url is None:
        raise SettingsError("DATABASE_URL or DATABASE_URL_SECRET is required but not set")
    # Connections are opened on demand up to this size (the pool starts with one), so a
    # larger CONCURRENCY costs connections only when requests really overlap on the ledger.
    pool = parsed(env, "DB_POOL_MAX_SIZE", concurrency(env), int_in(1, 1000), "an integer 1..1000")
    return DatabaseSettings(
        url=url,
        pool_max_size=pool,
        connect_timeout_seconds=parsed(
            env, "DB_TIMEOUT_SECONDS", 10.0, positive_float, "a positive number"
        ),
    )


def pubsub_settings(env: Mapping[str, str] = os.environ) -> PubSubSettings:
    return PubSubSettings(
        project=required(env, "GOOGLE_CLOUD_PROJECT"),
        delivery_topic=raw(env, "DELIVERY_TOPIC"),
        dead_letter_topic=raw(env, "DEAD_LETTER_TOPIC"),
        publish_timeout_seconds=parsed(
            env, "PUBLISH_TIMEOUT_SECONDS", 30.0, positive_float, "a positive number"
        ),
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(env: Mapping[str, str] = os.environ) -> str:
    """`LOG_LEVEL`, upper-cased; `INFO` when unset."""
    value = (raw(env, "LOG_LEVEL") or "INFO").upper()
    if value not in LOG_LEVELS:
        raise SettingsError(
            f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {env['LOG_LEVEL']!r}"
        )
    return value
