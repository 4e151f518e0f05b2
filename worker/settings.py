"""Settings from the environment (contract section 4).

Every value is parsed and checked once, at start; a missing or malformed one raises
`SettingsError` with a single line naming the variable, which `main.py` and the CLI print
instead of a traceback. `*_SECRET` variables name a Secret Manager version and are read
through `worker.secrets` (imported only when one is set, so local runs never load it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Literal, TypeVar

from worker.relay import SmtpProvider
from worker.workflows import WORKFLOWS

T = TypeVar("T")
SmtpSecurity = Literal["starttls", "ssl", "none"]
# Requests one instance serves at once when neither CONCURRENCY nor THREADS says otherwise:
# functions-framework's gunicorn default on one CPU (4 threads per CPU).
DEFAULT_CONCURRENCY = 4
# Slack between the last SMTP attempt's worst-case end and the lease's expiry.
LEASE_MARGIN_SECONDS = 1.0


class SettingsError(Exception):
    """A setting is missing or malformed. `str(error)` is one line for the operator."""


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int = 587
    security: SmtpSecurity = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = 10.0
    sender: str = ""
    reply_to: str | None = None
    # Right-hand side of every Message-ID; defaults to the sender's domain.
    message_id_domain: str = "localhost"
    # A private relay's CA bundle; the system store is used when unset.
    ca_file: str | None = None
    # Open connections kept between sends: one per request the instance serves at once, so
    # a busy instance never closes and re-handshakes a connection it needs again at once.
    max_idle_connections: int = DEFAULT_CONCURRENCY
    # The email service behind SMTP_HOST: which header carries the delivery id back in its
    # webhooks (worker/relay.py, contract section 6).
    provider: SmtpProvider = SmtpProvider.NONE


@dataclass(frozen=True)
class RetrySettings:
    """How one invocation retries a transient SMTP failure before handing back to Pub/Sub."""

    max_attempts: int = 5  # send attempts, across invocations, before dead-lettering
    tries_per_invocation: int = 3
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 8.0
    # A claim's lease must outlive one invocation (function timeout), or a slow but live
    # worker could be overtaken and the email sent twice.
    lease_seconds: int = 300


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


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings
    smtp: SmtpSettings
    pubsub: PubSubSettings
    retry: RetrySettings
    # RATE_LIMITS, by workflow (contract section 7); a workflow without an entry has none.
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)


# --- parsing helpers -----------------------------------------------------------------


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _required(env: Mapping[str, str], name: str) -> str:
    value = _raw(env, name)
    if value is None:
        raise SettingsError(f"{name} is required but not set")
    return value


def _parsed(
    env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T], rule: str
) -> T:
    value = _raw(env, name)
    if value is None:
        return default
    try:
        return parse(value)
    except ValueError:
        raise SettingsError(f"{name} must be {rule}, got {value!r}") from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = int(text)
        if not low <= number <= high:
            raise ValueError(text)
        return number

    return parse


def _positive_float(text: str) -> float:
    number = float(text)
    if not number > 0:
        raise ValueError(text)
    return number


def _secret_or_env(env: Mapping[str, str], name: str) -> str | None:
    """`NAME` itself, or the Secret Manager version named by `NAME_SECRET`."""
    direct = _raw(env, name)
    secret_name = _raw(env, f"{name}_SECRET")
    if direct is not None and secret_name is not None:
        raise SettingsError(f"set {name} or {name}_SECRET, not both")
    if secret_name is None:
        return direct
    from worker import secrets  # only deployments that use Secret Manager pay for it

    try:
        return secrets.access_secret(secret_name)
    except secrets.SecretError as error:
        raise SettingsError(f"{name}_SECRET: {error}") from None


# Public name for other settings readers (the provider webhooks, contract section 6).
secret_or_env = _secret_or_env


def _address(env: Mapping[str, str], name: str) -> str | None:
    value = _raw(env, name)
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
    threads = _parsed(env, "THREADS", DEFAULT_CONCURRENCY, _int_in(1, 1000), rule)
    return _parsed(env, "CONCURRENCY", threads, _int_in(1, 1000), rule)


def database_settings(env: Mapping[str, str] = os.environ) -> DatabaseSettings:
    url = _secret_or_env(env, "DATABASE_URL")
    if url is None:
        raise SettingsError("DATABASE_URL or DATABASE_URL_SECRET is required but not set")
    # Connections are opened on demand up to this size (the pool starts with one), so a
    # larger CONCURRENCY costs connections only when requests really overlap on the ledger.
    pool = _parsed(
        env, "DB_POOL_MAX_SIZE", concurrency(env), _int_in(1, 1000), "an integer 1..1000"
    )
    return DatabaseSettings(
        url=url,
        pool_max_size=pool,
        connect_timeout_seconds=_parsed(
            env, "DB_TIMEOUT_SECONDS", 10.0, _positive_float, "a positive number"
        ),
    )


def smtp_settings(env: Mapping[str, str] = os.environ) -> SmtpSettings:
    security = _raw(env, "SMTP_SECURITY") or "starttls"
    if security not in ("starttls", "ssl", "none"):
        raise SettingsError(f"SMTP_SECURITY must be starttls, ssl or none, got {security!r}")
    sender = _address(env, "EMAIL_FROM")
    if sender is None:
        raise SettingsError("EMAIL_FROM is required but not set")
    username = _raw(env, "SMTP_USERNAME")
    password = _secret_or_env(env, "SMTP_PASSWORD")
    if password is not None and username is None:
        raise SettingsError("SMTP_PASSWORD is set but SMTP_USERNAME is not")
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    return SmtpSettings(
        host=_required(env, "SMTP_HOST"),
        port=_parsed(env, "SMTP_PORT", 587, _int_in(1, 65535), "an integer 1..65535"),
        security=security,  # type: ignore[arg-type]  # checked just above
        username=username,
        password=password,
        timeout_seconds=_parsed(
            env, "SMTP_TIMEOUT_SECONDS", 10.0, _positive_float, "a positive number"
        ),
        sender=sender,
        reply_to=_address(env, "EMAIL_REPLY_TO"),
        message_id_domain=_raw(env, "MESSAGE_ID_DOMAIN") or domain,
        ca_file=_raw(env, "SMTP_CA_FILE"),
        max_idle_connections=concurrency(env),
        provider=_parsed(
            env,
            "SMTP_PROVIDER",
            SmtpProvider.NONE,
            SmtpProvider,
            f"one of {', '.join(p.value for p in SmtpProvider)}",
        ),
    )


def pubsub_settings(env: Mapping[str, str] = os.environ) -> PubSubSettings:
    return PubSubSettings(
        project=_required(env, "GOOGLE_CLOUD_PROJECT"),
        delivery_topic=_raw(env, "DELIVERY_TOPIC"),
        dead_letter_topic=_raw(env, "DEAD_LETTER_TOPIC"),
        publish_timeout_seconds=_parsed(
            env, "PUBLISH_TIMEOUT_SECONDS", 30.0, _positive_float, "a positive number"
        ),
    )


def retry_settings(env: Mapping[str, str] = os.environ) -> RetrySettings:
    return RetrySettings(
        max_attempts=_parsed(env, "MAX_ATTEMPTS", 5, _int_in(1, 100), "an integer 1..100"),
        tries_per_invocation=_parsed(
            env, "SEND_TRIES_PER_INVOCATION", 3, _int_in(1, 10), "an integer 1..10"
        ),
        initial_backoff_seconds=_parsed(
            env, "RETRY_BACKOFF_SECONDS", 1.0, _positive_float, "a positive number"
        ),
        max_backoff_seconds=_parsed(
            env, "RETRY_BACKOFF_MAX_SECONDS", 8.0, _positive_float, "a positive number"
        ),
        lease_seconds=_parsed(env, "LEASE_SECONDS", 300, _int_in(5, 86400), "seconds 5..86400"),
    )


_RATE_LIMIT = re.compile(r"([1-9][0-9]{0,5})/([1-9][0-9]{0,5})([smhd])", re.ASCII)
_WINDOW_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The count reads the ledger, and prune keeps 90 days by default: a longer window would count
# only what is left.
MAX_RATE_WINDOW_SECONDS = 90 * 86400


def parse_rate_limits(text: str | None) -> dict[str, RateLimit]:
    """`verification-code=5/1h,password-reset=3/1h,invite=20/1d`: at most N emails of the
    workflow to one recipient in any rolling window (`s`, `m`, `h`, `d`). Raises
    `SettingsError` naming the first malformed entry."""
    limits: dict[str, RateLimit] = {}
    if text is None:
        return limits
    for entry in text.split(","):
        entry = entry.strip()

        def bad(rule: str, entry: str = entry) -> SettingsError:
            return SettingsError(f"RATE_LIMITS entry {entry!r}: {rule}")

        if not entry:
            raise SettingsError(f"RATE_LIMITS has an empty entry in {text!r}")
        workflow, equals, limit = (part.strip() for part in entry.partition("="))
        if not equals or not workflow:
            raise bad("must be workflow=N/window, e.g. verification-code=5/1h")
        if workflow not in WORKFLOWS:
            raise bad(f"unknown workflow; the workflows are {', '.join(sorted(WORKFLOWS))}")
        if workflow in limits:
            raise bad(f"{workflow} has a limit already")
        match = _RATE_LIMIT.fullmatch(limit)
        if match is None:
            raise bad("the limit must be N/window: N from 1, a window like 30s, 10m, 1h or 1d")
        window = int(match[2]) * _WINDOW_SECONDS[match[3]]
        if window > MAX_RATE_WINDOW_SECONDS:
            raise bad("the window must be at most 90d (the ledger keeps 90 days by default)")
        limits[workflow] = RateLimit(int(match[1]), window, limit)
    return limits


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(env: Mapping[str, str] = os.environ) -> str:
    """`LOG_LEVEL`, upper-cased; `INFO` when unset."""
    value = (_raw(env, "LOG_LEVEL") or "INFO").upper()
    if value not in LOG_LEVELS:
        raise SettingsError(
            f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {env['LOG_LEVEL']!r}"
        )
    return value


def send_window(lease_seconds: float, smtp_timeout_seconds: float, elapsed: float = 0.0) -> float:
    """The lease rule: an SMTP attempt must be able to end inside the claim's lease.

    Seconds from now in which an attempt may still start, `elapsed` seconds into the lease.
    Once the lease expires a redelivered copy may claim the row and send, so a late attempt
    here would be a second email. One attempt takes at most about two command timeouts (a
    failure costs at most one timeout plus a reconnect). Settings refuse a lease with no
    window at all; the pipeline hands the window to `smtp.send_with_retry` as its deadline.
    """
    return lease_seconds - elapsed - 2 * smtp_timeout_seconds - LEASE_MARGIN_SECONDS


def load_settings(env: Mapping[str, str] = os.environ) -> Settings:
    """Everything the function needs; the dead-letter topic is required for it."""
    log_level(env)  # read by worker.logging; checked here so a typo stops the instance
    pubsub = pubsub_settings(env)
    if pubsub.dead_letter_topic is None:
        raise SettingsError("DEAD_LETTER_TOPIC is required but not set")
    smtp = smtp_settings(env)
    retry = retry_settings(env)
    if send_window(retry.lease_seconds, smtp.timeout_seconds) <= 0:
        raise SettingsError(
            f"LEASE_SECONDS ({retry.lease_seconds}) must be more than twice "
            f"SMTP_TIMEOUT_SECONDS ({smtp.timeout_seconds:g}) plus one"
        )
    return Settings(
        database=database_settings(env),
        smtp=smtp,
        pubsub=pubsub,
        retry=retry,
        rate_limits=parse_rate_limits(_raw(env, "RATE_LIMITS")),
    )


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
    key = _secret_or_env(env, "CONSOLE_CURSOR_KEY")
    if key is None:
        raise SettingsError(
            "CONSOLE_CURSOR_KEY or CONSOLE_CURSOR_KEY_SECRET is required but not set"
            f" (at least {MIN_CURSOR_KEY_BYTES} random bytes, e.g. `openssl rand -base64 48`)"
        )
    size = len(key.encode("utf-8"))
    if size < MIN_CURSOR_KEY_BYTES:
        # The length only: the value is a secret.
        source = "CONSOLE_CURSOR_KEY"
        if _raw(env, "CONSOLE_CURSOR_KEY_SECRET") is not None:
            source = "CONSOLE_CURSOR_KEY_SECRET's secret"
        raise SettingsError(
            f"{source} must be at least {MIN_CURSOR_KEY_BYTES} bytes, got {size}"
            " (e.g. `openssl rand -base64 48`)"
        )
    return ConsoleSettings(database=database, cursor_key=key.encode("utf-8"))


def console_database_settings(env: Mapping[str, str] = os.environ) -> DatabaseSettings:
    """The support console's own login (an `email_reader` one), never the worker's: its own
    variable, so a console cannot be pointed at the worker's credentials by accident."""
    url = _secret_or_env(env, "CONSOLE_DATABASE_URL")
    if url is None:
        raise SettingsError(
            "CONSOLE_DATABASE_URL or CONSOLE_DATABASE_URL_SECRET is required but not set"
        )
    return DatabaseSettings(
        url=url,
        pool_max_size=_parsed(env, "DB_POOL_MAX_SIZE", 4, _int_in(1, 100), "an integer 1..100"),
        connect_timeout_seconds=_parsed(
            env, "DB_TIMEOUT_SECONDS", 10.0, _positive_float, "a positive number"
        ),
    )
