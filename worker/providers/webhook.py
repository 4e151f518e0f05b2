"""The provider webhook: request -> adapter -> events -> ledger -> answer (contract section 6).

Decide-then-act: the adapter decides (authentic? which events?), `Tracking.apply` acts, one
transaction per event. Answers:
  404 no such provider here (its settings are absent), 405 not a POST, 413 body too large,
  401/403 not authentic (nothing read, stored or logged from the request),
  400 authentic but malformed (nothing stored), 503 the database is unreachable (the
  provider retries; events already applied are duplicates then, stored once),
  200 otherwise, also for a repeat or an event that matches no delivery.
Log lines name the provider, the answer, event ids and counts; never a body, a link, a
header value or a secret.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import psycopg_pool

from worker.logging import get_logger
from worker.providers.model import (
    Adapter,
    Applied,
    Malformed,
    ProviderEvent,
    Refused,
    WebhookRequest,
)
from worker.providers.registry import build_adapters, setting_reader
from worker.settings import DatabaseSettings, database_settings

# SendGrid posts batches of up to a few hundred events; far below Cloud Functions' 32 MB.
MAX_BODY_BYTES = 4 * 1024 * 1024
log = get_logger()


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
    max_body_bytes: int = MAX_BODY_BYTES

    def handle(self, method: str, request: WebhookRequest) -> Answer:
        adapter = self.adapters.get(request.provider)
        if adapter is None:
            return _answer(404, "no such provider", request.provider)
        if method != "POST":
            return _answer(405, "POST only", request.provider)
        if len(request.body) > self.max_body_bytes:
            return _answer(413, "body too large", request.provider)
        try:
            adapter.authenticate(request)
        except Refused as refused:
            return _answer(refused.status, refused.reason, request.provider)
        try:
            batch = adapter.events(request)
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
        body["rejected"] = len(batch.rejected)
        return Answer(200, body)

    def _apply(self, event: ProviderEvent) -> Applied:
        result = self.tracking.apply(event)
        log.info(
            "provider event",
            provider=event.provider,
            provider_event_id=event.provider_event_id,
            event_type=event.event_type.value,
            delivery_id=event.delivery_id,
            result=result.value,
        )
        return result


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
    database: DatabaseSettings


_config: Config | None = None
_webhook: Webhook | None = None
_lock = threading.Lock()


def configure(env: Mapping[str, str] = os.environ) -> Config:
    """Parse the webhook's settings (raises `SettingsError`); opens no connection."""
    global _config
    if _config is None:
        _config = Config(
            adapters=build_adapters(setting_reader(env)), database=database_settings(env)
        )
    return _config


def instance() -> Webhook:
    global _webhook
    if _webhook is None:
        with _lock:
            if _webhook is None:
                import importlib

                from worker.db import shared_pool

                # worker/tracking.py lands from the schema branch (h3); plain import after merge.
                tracking: Any = importlib.import_module("worker.tracking")
                config = configure()
                _webhook = Webhook(config.adapters, tracking.Tracking(shared_pool(config.database)))
    return _webhook


def request_from(
    provider: str, url: str, headers: Mapping[str, str], body: bytes
) -> WebhookRequest:
    return WebhookRequest(
        provider=provider,
        url=url,
        headers={name.lower(): value for name, value in headers.items()},
        body=body,
    )
