"""What a provider adapter is, and what it answers: the request it reads, the batch of
normalised events it produces (`ProviderEvent`, the store's vocabulary: worker/store/tracking.py),
and the two ways it refuses (`Refused`: not authentic; `Malformed`: authentic but not what the
provider documents).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from worker.store.tracking import ProviderEvent

# The largest body an adapter takes unless it says otherwise: SendGrid posts batches of up
# to a few hundred events; far below Cloud Functions' 32 MB.
MAX_BODY_BYTES = 4 * 1024 * 1024


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
