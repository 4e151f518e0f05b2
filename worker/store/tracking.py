"""What became of each email after the relay accepted it: provider events, stored and applied.

`Tracking.apply` stores one normalised provider event and applies it in one transaction:
`email.apply_provider_event()` (migration 002, revised in 008) matches the delivery (its
recipient too, where the event names one), moves `provider_status` forward only and only for
an email that was sent, keeps the earliest time of each kind (a time the email cannot have
had is stored as the receipt time and flagged in `detail`) and suppresses the recipient on a
bounce or complaint. The order itself is enforced by a trigger, for every writer; `allowed`
below mirrors it for Python readers and is checked against the database by the tests.

`EventType`, `Applied` and `ProviderEvent` are the vocabulary shared with SQL: `EventType`
values are `email.provider_events.event_type`, and all but `deferred` are also
`email.provider_status` values. The provider adapters (worker/providers/) produce them.

`WebhookTokens` remembers the signature tokens of providers whose signature does not cover
the event (Mailgun), so that a captured signature cannot carry a second event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from worker.core.rules import normalise_address
from worker.store.db import UNREACHABLE, Store, query


class Unreachable(Exception):
    """The database could not be asked; the caller answers "retry later"."""


class EventType(StrEnum):
    DELIVERED = "delivered"
    OPENED = "opened"
    CLICKED = "clicked"
    # Hard/permanent bounce, or the provider dropped/rejected the email.
    BOUNCED = "bounced"
    # Soft/transient bounce or delay: recorded, no status change.
    DEFERRED = "deferred"
    COMPLAINED = "complained"


class Applied(StrEnum):
    """What applying one event did (the webhook answers 200 for each)."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # (provider, provider_event_id) was stored before: a no-op
    UNMATCHED = "unmatched"  # stored with delivery_id NULL


@dataclass(frozen=True)
class ProviderEvent:
    """One normalised provider event. Never holds a clicked link, a body or an envelope."""

    provider: str
    # Unique per provider; where the provider gives none, a stable digest of the event.
    provider_event_id: str
    event_type: EventType
    occurred_at: datetime  # timezone-aware
    recipient: str | None
    # Matching keys, tried in this order (docs/webhooks.md).
    delivery_id: str | None  # what the worker attached for this provider (SMTP_PROVIDER)
    message_id: str | None  # the email's Message-ID as the worker wrote it: "<local@domain>"
    relay_message_id: str | None  # the provider's own id for the message
    bounce_type: str | None = None  # "hard"/"soft" plus the provider's own words in detail
    # Only what support needs: bounce type/sub-type, diagnostic code, the provider's
    # message id, user-agent class. Stored as email.provider_events.detail.
    detail: Mapping[str, Any] = field(default_factory=dict)


class ProviderStatus(StrEnum):
    """Mirrors the SQL enum `email.provider_status`."""

    DELIVERED = "delivered"
    OPENED = "opened"
    CLICKED = "clicked"
    BOUNCED = "bounced"
    COMPLAINED = "complained"

    @property
    def final(self) -> bool:
        return self in (ProviderStatus.BOUNCED, ProviderStatus.COMPLAINED)


_FORWARD = (ProviderStatus.DELIVERED, ProviderStatus.OPENED, ProviderStatus.CLICKED)


def allowed(current: ProviderStatus | None, target: ProviderStatus) -> bool:
    """May provider_status move from `current` to `target`? (email.provider_status_allowed)"""
    if current is None:
        return True
    if current.final:
        return False
    if target is ProviderStatus.COMPLAINED:
        return True
    if target is ProviderStatus.BOUNCED:
        return current is ProviderStatus.DELIVERED
    return _FORWARD.index(target) > _FORWARD.index(current)


@dataclass(frozen=True)
class StoredEvent:
    """One row of `email.provider_events`, as operators see it (no matching keys)."""

    id: int
    provider: str
    provider_event_id: str
    event_type: str
    occurred_at: datetime
    received_at: datetime
    bounce_type: str | None
    detail: dict[str, Any]


def _in_stored_form(named: str | None) -> str | None:
    """The recipient an event names, with an IDN domain in the form the ledger stores it
    (`rules.normalise_address`): providers report the A-label the envelope carried, and the
    match and the suppression compare with the ledger's U-label. Anything else is passed
    as the provider wrote it."""
    if named is None or (named.isascii() and "xn--" not in named.lower()):
        return named
    address = named.strip()
    if address.endswith(">") and "<" in address:  # a display name: the SQL ignores it too
        address = address[address.rindex("<") + 1 : -1]
    stored = normalise_address(address)
    return named if stored is None or stored == address else stored


class Tracking(Store):
    """Provider events: applied one per transaction, and read back for `status`."""

    def apply(self, event: ProviderEvent) -> Applied:
        """Store and apply one event. Raises psycopg.OperationalError or PoolTimeout when the
        database is unreachable (the webhook answers 503 and the provider retries)."""
        params = {
            "provider": event.provider,
            "provider_event_id": event.provider_event_id,
            "event_type": event.event_type.value,
            "occurred_at": event.occurred_at,
            "recipient": _in_stored_form(event.recipient),
            "delivery_id": event.delivery_id,
            "message_id": event.message_id,
            "relay_message_id": event.relay_message_id,
            "bounce_type": event.bounce_type,
            "detail": Jsonb(dict(event.detail)),
        }
        return Applied(self._row("apply_provider_event", **params)["applied"])

    def events(self, delivery_id: str) -> list[StoredEvent]:
        rows = self._all("provider_events_for_delivery", delivery_id=delivery_id)
        return [StoredEvent(**row) for row in rows]


class WebhookTokens:
    """Used signature tokens, shared by every instance (`email.webhook_tokens`, migration 008):
    a token is claimed once, in one statement that also forgets a few expired ones. Only the
    token's SHA-256 reaches the database.

    `pool` is called on first use: the webhook builds its adapters, and this with them, when
    it starts, before any connection is opened."""

    def __init__(self, pool: Callable[[], ConnectionPool]) -> None:
        self._pool = pool

    def first_use(self, provider: str, token: str, remember_seconds: int) -> bool:
        params = {
            "provider": provider,
            "token_sha256": hashlib.sha256(token.encode()).digest(),
            "remember_seconds": remember_seconds,
        }
        try:
            with self._pool().connection() as conn:
                row = conn.execute(query("claim_webhook_token"), params).fetchone()
        except UNREACHABLE:
            # Unknown is not "first use": the caller answers so that the provider retries.
            raise Unreachable("database unavailable, retry later") from None
        return row is not None
