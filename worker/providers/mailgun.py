"""Mailgun webhooks (docs/webhooks.md).

Signature: https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks
  The body's `signature` object holds `timestamp`, `token` and `signature`, the hex
  HMAC-SHA256 of `timestamp + token` keyed with the webhook signing key.
Events: https://documentation.mailgun.com/docs/mailgun/user-manual/events/webhooks
  `event-data` has `event` (delivered, opened, clicked, failed with `severity` permanent or
  temporary, complained...), `id`, `timestamp`, `recipient`, `user-variables` (from the
  `X-Mailgun-Variables` header the worker sets,
  https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/send-attachments
  "Attaching Metadata to Messages"), `message.headers.message-id` and `delivery-status`.
Replays: the HMAC covers `timestamp + token` only, not `event-data`, so a captured signature
  object would verify with any event while its timestamp is fresh. The page above advises
  caching tokens and refusing one seen before: each token is used once (`TokenLedger`; the
  webhook hands the adapter the database's, `worker.store.tracking.WebhookTokens`, which every
  instance shares).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.providers import common
from worker.providers.model import Batch, Malformed, Refused, WebhookRequest
from worker.store.tracking import EventType, ProviderEvent, Unreachable

PROVIDER = "mailgun"
KEY_SETTING = "MAILGUN_WEBHOOK_SIGNING_KEY"
_DEVICE_TYPES = frozenset({"desktop", "mobile", "tablet", "unknown"})
# How long a used token is remembered: a token is accepted while its timestamp is within the
# freshness window of now, either way, so for at most twice the window after it is first
# seen; a minute more for the clocks of instances and database to differ.
REMEMBER_SECONDS = 2 * common.TOLERANCE_SECONDS + 60


class TokenLedger(Protocol):
    def first_use(self, provider: str, token: str, remember_seconds: int) -> bool:
        """True the first time `token` is presented for `provider`, False ever after (for
        `remember_seconds` at least). Raises `Unreachable` when it cannot tell."""
        ...


class ProcessTokens:
    """The tokens one process has seen: enough for a lone adapter (tests, a script). The
    webhook's adapter gets the database's instead, so that every instance agrees."""

    def __init__(self, clock: common.Clock = time.monotonic) -> None:
        self._clock = clock
        self._expiry: dict[tuple[str, bytes], float] = {}
        self._lock = threading.Lock()

    def first_use(self, provider: str, token: str, remember_seconds: int) -> bool:
        key = (provider, hashlib.sha256(token.encode()).digest())
        now = self._clock()
        with self._lock:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            if key in self._expiry:
                return False
            self._expiry[key] = now + remember_seconds
            return True


@dataclass(frozen=True)
class MailgunAdapter:
    signing_key: bytes = field(repr=False)
    clock: common.Clock = time.time
    provider: str = PROVIDER
    max_body_bytes: int = 256 * 1024  # one event per request, parsed before it is verified
    tokens: TokenLedger = field(default_factory=ProcessTokens, repr=False, compare=False)

    def authenticate(self, request: WebhookRequest) -> None:
        # The signature travels inside the body, so the body is parsed first; nothing of it
        # is kept or logged unless the signature holds.
        try:
            payload = common.json_body(request.body)
        except Malformed:
            raise Refused(401, "no signature object") from None
        signature = payload.get("signature") if isinstance(payload, Mapping) else None
        if not isinstance(signature, Mapping):
            raise Refused(401, "no signature object")
        timestamp, token, given = (signature.get(k) for k in ("timestamp", "token", "signature"))
        if isinstance(timestamp, int) and not isinstance(timestamp, bool):
            timestamp = str(timestamp)
        if not all(isinstance(value, str) and value for value in (timestamp, token, given)):
            raise Refused(401, "signature object incomplete")
        assert isinstance(timestamp, str) and isinstance(token, str) and isinstance(given, str)
        common.check_fresh(timestamp, self.clock)
        expected = hmac.new(
            self.signing_key, (timestamp + token).encode(), hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.strip().lower().encode()):
            raise Refused(403, "signature does not verify")
        # Last, so that only a signature that holds can use up its token.
        try:
            first = self.tokens.first_use(self.provider, token, REMEMBER_SECONDS)
        except Unreachable:
            # Unknown is not "first use": Mailgun retries a 503.
            raise Refused(503, "database unavailable, retry later") from None
        if not first:
            raise Refused(403, "signature token already used")

    def events(self, request: WebhookRequest) -> Batch:
        payload = common.require_mapping(common.json_body(request.body), "body")
        data = common.require_mapping(payload.get("event-data"), "event-data")
        event = normalise(data)
        return Batch(events=(event,) if event is not None else ())


def normalise(data: Mapping[str, Any]) -> ProviderEvent | None:
    name = common.require_str(data, "event", "event-data.event")
    severity = common.optional_str(data, "severity")
    event_type = _event_type(name, severity)
    if event_type is None:
        return None  # accepted, unsubscribed, stored...: not a delivery outcome
    event_id = common.require_str(data, "id", "event-data.id")
    occurred_at = common.unix_time(data.get("timestamp"), "event-data.timestamp")
    variables = data.get("user-variables")
    variables = variables if isinstance(variables, Mapping) else {}
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, Mapping) else None
    mailgun_id = (
        common.optional_str(headers, "message-id") if isinstance(headers, Mapping) else None
    )
    bounce_type, detail = _outcome(event_type, severity, data)
    return ProviderEvent(
        provider=PROVIDER,
        provider_event_id=event_id,
        event_type=event_type,
        occurred_at=occurred_at,
        recipient=common.optional_str(data, "recipient"),
        delivery_id=common.delivery_id(variables.get("delivery_id")),
        # Mailgun keeps the Message-ID it was given over SMTP and reports it bare.
        message_id=common.message_id(mailgun_id),
        relay_message_id=mailgun_id,
        bounce_type=bounce_type,
        detail=common.compact({"provider_message_id": mailgun_id, "event": name, **detail}),
    )


def _event_type(name: str, severity: str | None) -> EventType | None:
    if name == "failed":
        return EventType.DEFERRED if severity == "temporary" else EventType.BOUNCED
    return {
        "delivered": EventType.DELIVERED,
        "opened": EventType.OPENED,
        "clicked": EventType.CLICKED,
        "complained": EventType.COMPLAINED,
        "rejected": EventType.BOUNCED,  # Mailgun refused to send it
    }.get(name)


def _outcome(
    event_type: EventType, severity: str | None, data: Mapping[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    if event_type in (EventType.BOUNCED, EventType.DEFERRED):
        status = data.get("delivery-status")
        status = status if isinstance(status, Mapping) else {}
        code = status.get("code")
        return ("soft" if event_type is EventType.DEFERRED else "hard"), {
            "severity": severity,
            "reason": common.optional_str(data, "reason"),
            "code": code if isinstance(code, int) and not isinstance(code, bool) else None,
            "diagnostic": common.diagnostic(status.get("description") or status.get("message")),
        }
    if event_type in (EventType.OPENED, EventType.CLICKED):
        client = data.get("client-info")
        client = client if isinstance(client, Mapping) else {}
        # `url` of a click is never read: a class of client at most.
        device = common.optional_str(client, "device-type")
        return None, {"user_agent_class": device if device in _DEVICE_TYPES else None}
    return None, {}


def from_env(setting: common.Setting, tokens: TokenLedger | None = None) -> MailgunAdapter | None:
    """`tokens`: where used tokens are remembered (this process's memory if not given)."""
    key = setting(KEY_SETTING)
    if key is None:
        return None
    if tokens is None:
        return MailgunAdapter(signing_key=key.encode())
    return MailgunAdapter(signing_key=key.encode(), tokens=tokens)
