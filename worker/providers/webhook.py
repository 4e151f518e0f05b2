"""The provider webhook: request -> adapter -> events -> ledger -> answer (docs/webhooks.md).

Decide-then-act: the adapter decides (authentic? which events?), `Tracking.apply` acts, one
transaction per event. Answers:
  404 no such provider here (its settings are absent), 405 not a POST, 413 body larger than
  the provider sends (the adapter's `max_body_bytes`, checked before anything is parsed),
  401/403 not authentic (nothing read, stored or logged from the request),
  400 authentic but malformed (nothing stored), 503 the database is unreachable, or SNS's
  SubscribeURL is (the provider retries; events already applied are duplicates then,
  stored once),
  200 otherwise, also for a repeat or an event that matches no delivery. An event of a
  batch that is malformed, or whose values the database refuses, is counted `rejected`
  and the others are applied.
Log lines name the provider, the answer, event ids and counts; never a body, a link, a
header value or a secret.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import psycopg_pool
from psycopg_pool import ConnectionPool

from worker.core.instance import Instance, Lazy
from worker.core.logging import get_logger
from worker.core.settings import database_settings
from worker.providers.model import MAX_BODY_BYTES, Adapter, Malformed, Refused, WebhookRequest
from worker.providers.registry import build_adapters, setting_reader
from worker.store.db import open_pool
from worker.store.tracking import Applied, ProviderEvent, Tracking, WebhookTokens

log = get_logger()
# The database refuses this event's values (a CHECK, a NUL, text that is not UTF-8): a retry
# would fail the same way, so the event is rejected on its own.
_UNSTORABLE = (
    psycopg.DataError,
    psycopg.errors.CheckViolation,
    psycopg.errors.NotNullViolation,
    UnicodeEncodeError,
)
REJECTED = "rejected"


class Tracker(Protocol):
    def apply(self, event: ProviderEvent) -> Applied: ...


@dataclass(frozen=True)
class Answer:
    status: int
    body: Mapping[str, Any]


@dataclass(frozen=True)
class Webhook:
    adapters: Mapping[str, Adapter]
    tracking: Tracker
    max_body_bytes: int = MAX_BODY_BYTES  # the instance's ceiling, above each adapter's own

    def handle(self, method: str, request: WebhookRequest) -> Answer:
        adapter = self.adapters.get(request.provider)
        if adapter is None:
            return _answer(404, "no such provider", request.provider)
        if method != "POST":
            return _answer(405, "POST only", request.provider)
        if len(request.body) > min(self.max_body_bytes, adapter.max_body_bytes):
            return _answer(413, "body too large", request.provider)
        try:
            adapter.authenticate(request)
            # `events` may refuse too: SNS's SubscribeURL unreachable now is 503.
            batch = adapter.events(request)
        except Refused as refused:
            return _answer(refused.status, refused.reason, request.provider)
        except Malformed as malformed:
            return _answer(400, f"malformed: {malformed}", request.provider)
        for rejected in batch.rejected:
            log.warning(
                "provider event rejected",
                provider=request.provider,
                field=rejected.field,
                rule=rejected.rule,
            )
        if batch.rejected and not batch.events:
            return _answer(400, f"malformed: {batch.rejected[0]}", request.provider)
        counts: Counter[str] = Counter()
        try:
            for event in batch.events:
                counts[self._apply(event)] += 1
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as error:
            # What was applied stays applied; the provider's retry repeats it as duplicates.
            log.error(
                "provider event not stored: database unavailable",
                provider=request.provider,
                error_type=type(error).__name__,
                applied_before=sum(counts.values()),
            )
            return Answer(503, {"error": "database unavailable, retry later"})
        body = {result.value: counts[result.value] for result in Applied}
        body[REJECTED] = len(batch.rejected) + counts[REJECTED]
        return Answer(200, body)

    def _apply(self, event: ProviderEvent) -> str:
        """The `Applied` value, or `REJECTED` when the database refuses the event's values."""
        try:
            result = self.tracking.apply(event)
        except _UNSTORABLE as error:
            # The error's text quotes the row (an address among it): its class only.
            log.warning(
                "provider event rejected by the database",
                provider=event.provider,
                provider_event_id=event.provider_event_id[:_LOGGED_ID],
                error_type=type(error).__name__,
            )
            return REJECTED
        log.info(
            "provider event",
            provider=event.provider,
            provider_event_id=event.provider_event_id,
            event_type=event.event_type.value,
            delivery_id=event.delivery_id,
            result=result.value,
        )
        return result.value


_LOGGED_ID = 100  # enough to find the event; its id may be what the database refused
_PROVIDER_NAME = re.compile(r"[a-z0-9-]{1,20}")


def _answer(status: int, reason: str, provider: str) -> Answer:
    # `reason` is our own wording (adapters never put request content into it); the path
    # segment is logged only when it looks like a provider name.
    named = provider if _PROVIDER_NAME.fullmatch(provider) else "?"
    log.warning("provider request refused", provider=named, status=status, reason=reason)
    return Answer(status, {"error": reason})


# --- the instance's webhook: settings parsed at start, the pool made on first use -------


@dataclass(frozen=True)
class Config:
    adapters: Mapping[str, Adapter]
    pool: Lazy[ConnectionPool]


def parse(env: Mapping[str, str]) -> Config:
    """The webhook's settings and adapters (raises `SettingsError`); opens no connection."""
    database = database_settings(env)
    pool = Lazy(lambda: open_pool(database, "email-webhook"))
    # Used signature tokens are remembered in the database, so every instance refuses a
    # replay; the pool is the instance's one, opened on first use.
    tokens = WebhookTokens(pool.get)
    return Config(adapters=build_adapters(setting_reader(env), tokens=tokens), pool=pool)


def build(config: Config) -> Webhook:
    return Webhook(config.adapters, Tracking(config.pool.get()))


# The webhook target's settings, parsed at import, and its webhook, made on first use.
INSTANCE: Instance[Config, Webhook] = Instance(parse, build)


def request_from(
    provider: str, url: str, headers: Mapping[str, str], body: bytes
) -> WebhookRequest:
    return WebhookRequest(
        provider=provider,
        url=url,
        headers={name.lower(): value for name, value in headers.items()},
        body=body,
    )
