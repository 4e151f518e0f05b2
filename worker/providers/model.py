"""What every provider adapter produces and the ledger applies (contract section 6).

An adapter turns one authentic webhook request into normalised `ProviderEvent`s; the
tracking ledger (`worker/tracking.py`) applies each one in its own transaction. The names
here are the vocabulary shared with SQL: `EventType` values are `email.provider_events.
event_type`, and all but `deferred` are also `email.provider_status` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

# The largest body an adapter takes unless it says otherwise: SendGrid posts batches of up
# to a few hundred events; far below Cloud Functions' 32 MB.
MAX_BODY_BYTES = 4 * 1024 * 1024


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
    # Matching keys, tried in this order (contract section 6).
    delivery_id: str | None  # what the worker attached for this provider (SMTP_PROVIDER)
    message_id: str | None  # the email's Message-ID as the worker wrote it: "<local@domain>"
    relay_message_id: str | None  # the provider's own id for the message
    bounce_type: str | None = None  # "hard"/"soft" plus the provider's own words in detail
    # Only what support needs: bounce type/sub-type, diagnostic code, the provider's
    # message id, user-agent class. Stored as email.provider_events.detail.
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WebhookRequest:
    """The parts of an HTTP request an adapter may look at."""

    provider: str  # the last path segment
    url: str  # as the provider called it (scheme, host, path, query)
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


class Refused(Exception):
    """Authenticity failed: 401 (no or bad credentials) or 403 (a signature that does not
    hold, a foreign certificate host or topic). Nothing from the request is kept or logged."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Malformed(Exception):
    """An authentic request whose body is not what the provider documents: 400.
    `field` and `rule` name what is wrong, never the value."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True)
class Batch:
    """The events of one authentic request. A batch (SendGrid) keeps its good events when
    one of them is malformed: those go to `rejected`, the rest are applied."""

    events: tuple[ProviderEvent, ...]
    rejected: tuple[Malformed, ...] = ()


class Adapter(Protocol):
    """One per provider, built from settings once per instance."""

    # Read-only, so that frozen dataclasses and plain class attributes both qualify.
    @property
    def provider(self) -> str: ...

    @property
    def max_body_bytes(self) -> int:
        """Larger bodies are answered 413 before anything is read: no more than the provider
        sends, which matters most where the body is parsed before it is authenticated."""
        ...

    def authenticate(self, request: WebhookRequest) -> None:
        """Raise `Refused` unless the request is proven to come from the provider."""

    def events(self, request: WebhookRequest) -> Batch:
        """Parse an authenticated request (raise `Malformed` if the whole body is bad).
        SNS's SubscriptionConfirmation is confirmed here and yields no events."""
