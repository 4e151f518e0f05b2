"""The delivery function's settings: the relay, the retry budget, rate limits, and the lease
rule that ties them together. Parsed once at start (`load_settings`); a missing or malformed
value raises `SettingsError` with one line. The settings every target shares (the database,
Pub/Sub, the log level, the env readers) are in `worker.core.settings`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from email.utils import parseaddr
from typing import Literal

from worker.core import settings
from worker.core.settings import (
    DEFAULT_CONCURRENCY,
    DatabaseSettings,
    PubSubSettings,
    RateLimit,
    SettingsError,
    concurrency,
    database_settings,
    log_level,
    pubsub_settings,
)
from worker.delivery.relay import SmtpProvider
from worker.delivery.workflows import WORKFLOWS

SmtpSecurity = Literal["starttls", "ssl", "none"]
# Slack between the last SMTP attempt's worst-case end and the lease's expiry.
LEASE_MARGIN_SECONDS = 1.0


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
    # webhooks (worker/delivery/relay.py, docs/webhooks.md).
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
class BreakerSettings:
    """The relays' shared circuit breaker (worker/delivery/relays.py)."""

    trip_after: int = 5  # consecutive fail-over failures that open a relay's circuit
    cooldown_seconds: int = 30  # how long an open circuit sends deliveries elsewhere


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings
    smtp: SmtpSettings
    pubsub: PubSubSettings
    retry: RetrySettings
    # RATE_LIMITS, by workflow (docs/operating.md); a workflow without an entry has none.
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    # The fallback relay (FALLBACK_SMTP_HOST and its siblings); None: one relay.
    fallback: SmtpSettings | None = None
    breaker: BreakerSettings = field(default_factory=BreakerSettings)


def smtp_settings(env: Mapping[str, str] = os.environ) -> SmtpSettings:
    security = _security(env, "SMTP_SECURITY")
    sender = settings.address(env, "EMAIL_FROM")
    if sender is None:
        raise SettingsError("EMAIL_FROM is required but not set")
    username = settings.raw(env, "SMTP_USERNAME")
    password = settings.secret_or_env(env, "SMTP_PASSWORD")
    if password is not None and username is None:
        raise SettingsError("SMTP_PASSWORD is set but SMTP_USERNAME is not")
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    return SmtpSettings(
        host=settings.required(env, "SMTP_HOST"),
        port=settings.parsed(
            env, "SMTP_PORT", 587, settings.int_in(1, 65535), "an integer 1..65535"
        ),
        security=security,
        username=username,
        password=password,
        timeout_seconds=settings.parsed(
            env, "SMTP_TIMEOUT_SECONDS", 10.0, settings.positive_float, "a positive number"
        ),
        sender=sender,
        reply_to=settings.address(env, "EMAIL_REPLY_TO"),
        message_id_domain=settings.raw(env, "MESSAGE_ID_DOMAIN") or domain,
        ca_file=settings.raw(env, "SMTP_CA_FILE"),
        max_idle_connections=concurrency(env),
        provider=_provider(env, "SMTP_PROVIDER"),
    )


def _security(env: Mapping[str, str], name: str) -> SmtpSecurity:
    security = settings.raw(env, name) or "starttls"
    if security not in ("starttls", "ssl", "none"):
        raise SettingsError(f"{name} must be starttls, ssl or none, got {security!r}")
    return security  # type: ignore[return-value]  # checked just above


def _provider(env: Mapping[str, str], name: str) -> SmtpProvider:
    return settings.parsed(
        env,
        name,
        SmtpProvider.NONE,
        SmtpProvider,
        f"one of {', '.join(p.value for p in SmtpProvider)}",
    )


def fallback_settings(
    primary: SmtpSettings, env: Mapping[str, str] = os.environ
) -> SmtpSettings | None:
    """The fallback relay, when `FALLBACK_SMTP_HOST` is set: its own host, port, security,
    credentials, CA bundle and provider; the sender, Message-ID domain, timeout and pool size
    are the primary's (one email, whichever relay takes it)."""
    host = settings.raw(env, "FALLBACK_SMTP_HOST")
    if host is None:
        return None
    username = settings.raw(env, "FALLBACK_SMTP_USERNAME")
    password = settings.secret_or_env(env, "FALLBACK_SMTP_PASSWORD")
    if password is not None and username is None:
        raise SettingsError("FALLBACK_SMTP_PASSWORD is set but FALLBACK_SMTP_USERNAME is not")
    return replace(
        primary,
        host=host,
        port=settings.parsed(
            env, "FALLBACK_SMTP_PORT", 587, settings.int_in(1, 65535), "an integer 1..65535"
        ),
        security=_security(env, "FALLBACK_SMTP_SECURITY"),
        username=username,
        password=password,
        ca_file=settings.raw(env, "FALLBACK_SMTP_CA_FILE"),
        provider=_provider(env, "FALLBACK_SMTP_PROVIDER"),
    )


def breaker_settings(env: Mapping[str, str] = os.environ) -> BreakerSettings:
    return BreakerSettings(
        trip_after=settings.parsed(
            env, "RELAY_TRIP_AFTER", 5, settings.int_in(1, 1000), "an integer 1..1000"
        ),
        cooldown_seconds=settings.parsed(
            env, "RELAY_COOLDOWN_SECONDS", 30, settings.int_in(1, 86400), "seconds 1..86400"
        ),
    )


def retry_settings(env: Mapping[str, str] = os.environ) -> RetrySettings:
    return RetrySettings(
        max_attempts=settings.parsed(
            env, "MAX_ATTEMPTS", 5, settings.int_in(1, 100), "an integer 1..100"
        ),
        tries_per_invocation=settings.parsed(
            env, "SEND_TRIES_PER_INVOCATION", 3, settings.int_in(1, 10), "an integer 1..10"
        ),
        initial_backoff_seconds=settings.parsed(
            env, "RETRY_BACKOFF_SECONDS", 1.0, settings.positive_float, "a positive number"
        ),
        max_backoff_seconds=settings.parsed(
            env, "RETRY_BACKOFF_MAX_SECONDS", 8.0, settings.positive_float, "a positive number"
        ),
        lease_seconds=settings.parsed(
            env, "LEASE_SECONDS", 300, settings.int_in(5, 86400), "seconds 5..86400"
        ),
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
    log_level(env)  # read by worker.core.logging; checked here so a typo stops the instance
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
        rate_limits=parse_rate_limits(settings.raw(env, "RATE_LIMITS")),
        fallback=fallback_settings(smtp, env),
        breaker=breaker_settings(env),
    )
