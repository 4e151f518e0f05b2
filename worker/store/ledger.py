"""Guarded transitions on `email.deliveries`, the source of truth for every email.

Each method is one SQL statement from `sql/queries.sql`, named after its guard. A transition
that returns False lost a race or held a stale claim: callers treat that as an answer. Every
transition (`set_*`) is retried here through a dropped connection or a database restart, so
no caller can forget to; the claim is not (see `Ledger.claim`). The audit rows in
`email.delivery_events` are written by a trigger, never from here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

import tenacity
from psycopg.types.json import Jsonb

from worker.core.settings import RateLimit
from worker.store.db import UNREACHABLE, Store
from worker.store.relays import Circuit, Relay, circuits_from_claim


class Status(StrEnum):
    """Mirrors the SQL enum `email.delivery_status`."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    SENT = "sent"
    RETRYING = "retrying"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    # Deliberately not sent (suppressed, rate limited); the reason is in last_error_code.
    SKIPPED = "skipped"

    @property
    def finished(self) -> bool:
        return self in (Status.SENT, Status.FAILED, Status.DEAD_LETTER, Status.SKIPPED)


class _Row:
    """`from_row` for frozen dataclasses: takes the columns it knows, ignores new ones."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        # A column with a default may be missing: a database a migration behind this code.
        values = {
            f.name: row[f.name]
            for f in fields(cls)  # type: ignore[arg-type]
            if f.name in row or (f.default is MISSING and f.default_factory is MISSING)
        }
        if "status" in values:
            values["status"] = Status(values["status"])
        return cls(**values)


@dataclass(frozen=True)
class Delivery(_Row):
    delivery_id: str
    workflow: str | None
    recipient: str | None
    locale: str
    status: Status
    status_reason: str | None
    attempts: int
    last_error_code: str | None
    last_error_message: str | None
    last_attempted_at: datetime | None
    queued_at: datetime
    sent_at: datetime | None
    claim_token: uuid.UUID | None
    lease_expires_at: datetime | None
    provider_message_id: str | None
    source_message_id: str | None
    replays: int
    metadata: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    # What the provider reported after the send (migration 002, docs/webhooks.md).
    provider_status: str | None
    delivered_at: datetime | None
    opened_at: datetime | None
    clicked_at: datetime | None
    bounced_at: datetime | None
    complained_at: datetime | None
    bounce_type: str | None
    relay_message_id: str | None
    # Freshness (migration 010): the first copy's publish time, and the validity end.
    published_at: datetime | None
    not_after: datetime | None
    # The relay that accepted the email, and the SMTP time of that send (migration 012).
    relay: str | None = None
    smtp_ms: int | None = None


@dataclass(frozen=True)
class StatusChange(_Row):
    """One row of `email.delivery_events`."""

    id: int
    delivery_id: str
    status: Status
    attempt: int
    error_code: str | None
    error_message: str | None
    payload: dict[str, Any]
    created_at: datetime

    @property
    def attempt_failed(self) -> bool:
        """A failed send attempt's row (its relay and error, the status unchanged): the one
        kind of audit row that is not a status change."""
        return bool(self.payload.get("attempt_failed"))


@dataclass(frozen=True)
class Claim(_Row):
    """A worker's right to send one delivery, until `lease_expires_at`."""

    delivery_id: str
    claim_token: uuid.UUID
    attempts: int
    lease_expires_at: datetime
    # Every relay's circuit breaker, read by the claim's own statement (migration 012).
    circuits: Mapping[Relay, Circuit] = field(default_factory=dict)


class Reason(StrEnum):
    """Why a delivery is in its status: one vocabulary for `email.deliveries.status_reason`,
    the audit payload's `reason`, a dead letter's `reason` attribute and the logs.

    The worker's outcomes (worker/delivery/outcomes.py) set the first five; the SQL statements that
    set the others get them as parameters from here, so no reason is spelled twice, except the
    skipped ones, which email.claim_delivery() writes itself (tests/test_claim.py checks that
    SQL and this enum agree).
    """

    TRANSIENT_FAILURE = "transient_failure"  # retrying: Pub/Sub redelivers the event
    RETRIES_EXHAUSTED = "retries_exhausted"  # dead_letter: MAX_ATTEMPTS send attempts used
    PERMANENT_FAILURE = "permanent_failure"  # failed: the relay refused it (5xx), no template
    INVALID_EVENT = "invalid_event"  # failed: the event itself can never be sent
    # retrying: the dead letter was not confirmed, so the row waits for the redelivery
    DEAD_LETTER_PUBLISH_FAILED = "dead_letter_publish_failed"
    LEASE_EXPIRED = "lease_expired"  # in_progress: the claim took over an expired lease
    REPLAY = "replay"  # queued: an operator's replay gave it a fresh attempt budget
    # dead_letter: replay closed a row whose message Pub/Sub's dead-letter policy forwarded
    PUBSUB_DEAD_LETTER_POLICY = "pubsub_dead_letter_policy"
    # skipped (docs/operating.md), set by the claim (email.claim_delivery(), migration 005):
    # the suppression entry's reason (also the values of `email.suppressions.reason`)...
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"
    # ...or the recipient's rate limit for the workflow...
    RATE_LIMIT = "rate_limit"
    # ...or the delivery's validity end had passed (migration 010).
    EXPIRED = "expired"


# The reasons a dead-letter message may carry (docs/reference.md).
DEAD_LETTER_REASONS = frozenset(
    {Reason.RETRIES_EXHAUSTED, Reason.PERMANENT_FAILURE, Reason.INVALID_EVENT}
)


# What puts an address on the suppression list (email.suppressions.reason).
SUPPRESSION_REASONS = (Reason.HARD_BOUNCE, Reason.COMPLAINT, Reason.MANUAL)


class Code(StrEnum):
    """The `last_error_code`s the worker gives itself; SMTP failures bring their own
    (`SMTP_550`, `TIMEOUT`, ... from worker/delivery/smtp.py). Here beside `Reason` because the
    claim (SQL) writes the skipped ones; worker/delivery/outcomes.py re-exports it."""

    INVALID_EVENT = "INVALID_EVENT"
    TEMPLATE_ERROR = "TEMPLATE_ERROR"
    ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"
    # skipped (docs/reference.md), written by email.claim_delivery():
    SUPPRESSED = "SUPPRESSED"  # the recipient has a live suppression entry
    RATE_LIMITED = "RATE_LIMITED"  # the recipient's limit for the workflow is reached
    EXPIRED = "EXPIRED"  # claimed at or after the delivery's validity end (not_after)


# The codes of a `skipped` row.
SKIP_CODES = (Code.SUPPRESSED, Code.RATE_LIMITED, Code.EXPIRED)


class ClaimOutcome(StrEnum):
    """What `email.claim_delivery()` did (its `outcome` column)."""

    CLAIMED = "claimed"  # the row is in_progress under our claim token
    SKIPPED = "skipped"  # the row is now `skipped`: expired, suppressed or rate limited
    UNCLAIMED = "unclaimed"  # finished, or held by a live lease: nothing changed


@dataclass(frozen=True)
class Skipped:
    """The claim ended the delivery `skipped`: no email. `code` is its last_error_code
    (EXPIRED, SUPPRESSED, RATE_LIMITED), `reason` its status_reason, `message` its
    last_error_message."""

    delivery_id: str
    code: Code
    reason: Reason
    message: str


@dataclass(frozen=True)
class Unclaimed:
    """Nothing to do: `found` is the row's status (finished, or in_progress under a live
    lease; None if the row vanished, e.g. pruned)."""

    delivery_id: str
    found: Status | None


ClaimResult = Claim | Skipped | Unclaimed


@dataclass(frozen=True)
class Failure:
    """What went wrong, already sanitised: it is stored and shown to operators."""

    code: str
    message: str
    reason: Reason


class Ledger(Store):
    """The deliveries and their audit trail: the worker's and the operators' transitions."""

    # --- the worker's transitions -------------------------------------------------

    def claim_or_skip(
        self,
        *,
        delivery_id: str,
        workflow: str,
        recipient: str,
        locale: str,
        metadata: Mapping[str, Any] | None,
        source_message_id: str | None,
        lease_seconds: int,
        rate_limit: RateLimit | None = None,
        published_at: datetime | None = None,
        not_after: datetime | None = None,
    ) -> ClaimResult:
        """Claim for sending, end the row `skipped` (its validity end has passed, the
        recipient is suppressed, or over `rate_limit` for this workflow), or nothing: one
        statement, one round trip (`email.claim_delivery()`, migrations 005 and 010).

        `published_at` is this copy's publish time and `not_after` the validity end derived
        from it (or given by the event); the row keeps the earliest of each it has seen, and
        the database's clock decides whether the end has passed.

        Not retried: nothing has been sent yet, so a failure raises and Pub/Sub redelivers
        (a claim committed just before its connection dropped is taken over after its lease).
        """
        row = self._one(
            "claim",
            delivery_id=delivery_id,
            workflow=workflow,
            recipient=recipient,
            locale=locale,
            metadata=None if metadata is None else Jsonb(dict(metadata)),
            source_message_id=source_message_id,
            lease_seconds=lease_seconds,
            rate_limit=None if rate_limit is None else rate_limit.count,
            rate_window_seconds=None if rate_limit is None else rate_limit.window_seconds,
            takeover_reason=Reason.LEASE_EXPIRED.value,
            published_at=published_at,
            not_after=not_after,
        )
        assert row is not None, "email.claim_delivery() returns one row"
        match ClaimOutcome(row["outcome"]):
            case ClaimOutcome.CLAIMED:
                return Claim(
                    delivery_id,
                    row["token"],
                    row["attempt"],
                    row["lease_until"],
                    circuits_from_claim(row["relays"]),
                )
            case ClaimOutcome.SKIPPED:
                return Skipped(
                    delivery_id, Code(row["code"]), Reason(row["reason"]), row["message"]
                )
            case ClaimOutcome.UNCLAIMED:
                found = row["current_status"]
                return Unclaimed(delivery_id, None if found is None else Status(found))

    def claim(
        self,
        *,
        delivery_id: str,
        workflow: str,
        recipient: str,
        locale: str,
        metadata: Mapping[str, Any] | None,
        source_message_id: str | None,
        lease_seconds: int,
    ) -> Claim | None:
        """`claim_or_skip` without a rate limit, for callers that only want a claim (tests,
        tools): None when it was skipped, already finished, or leased by a live worker."""
        result = self.claim_or_skip(
            delivery_id=delivery_id,
            workflow=workflow,
            recipient=recipient,
            locale=locale,
            metadata=metadata,
            source_message_id=source_message_id,
            lease_seconds=lease_seconds,
        )
        return result if isinstance(result, Claim) else None

    def set_sent_if_claimed(
        self,
        claim: Claim,
        *,
        attempts: int,
        provider_message_id: str,
        relay_message_id: str | None = None,
        relay: Relay | None = None,
        smtp_ms: int | None = None,
    ) -> bool:
        """`relay`: the relay that accepted the email; `smtp_ms`: how long that took."""
        return self._transition(
            "set_sent_if_claimed",
            delivery_id=claim.delivery_id,
            claim_token=claim.claim_token,
            attempts=attempts,
            provider_message_id=provider_message_id,
            relay_message_id=relay_message_id,
            relay=None if relay is None else relay.value,
            smtp_ms=smtp_ms,
        )

    def set_retrying_if_claimed(self, claim: Claim, *, attempts: int, failure: Failure) -> bool:
        return self._set_unsent(Status.RETRYING, claim, attempts, failure)

    def set_failed_if_claimed(self, claim: Claim, *, attempts: int, failure: Failure) -> bool:
        return self._set_unsent(Status.FAILED, claim, attempts, failure)

    def set_dead_letter_if_claimed(self, claim: Claim, *, attempts: int, failure: Failure) -> bool:
        return self._set_unsent(Status.DEAD_LETTER, claim, attempts, failure)

    def set_failed_if_new_or_queued(
        self,
        *,
        delivery_id: str,
        workflow: str | None,
        recipient: str | None,
        source_message_id: str | None,
        failure: Failure,
    ) -> bool:
        """Record an event that can never be sent. False: the row exists and was left alone."""
        return self._transition(
            "set_failed_if_new_or_queued",
            delivery_id=delivery_id,
            workflow=workflow,
            recipient=recipient,
            source_message_id=source_message_id,
            reason=failure.reason.value,
            error_code=failure.code,
            error_message=failure.message,
        )

    # --- operators' transitions ------------------------------------------------------

    def set_queued_if_finished(self, delivery_id: str) -> bool:
        """Replay: `failed`/`dead_letter` back to `queued` with a fresh attempt budget."""
        return self._transition(
            "set_queued_if_finished", delivery_id=delivery_id, reason=Reason.REPLAY.value
        )

    def set_dead_letter_if_abandoned(
        self, delivery_id: str, *, reason: Reason = Reason.PUBSUB_DEAD_LETTER_POLICY
    ) -> bool:
        return self._transition(
            "set_dead_letter_if_abandoned", delivery_id=delivery_id, reason=Reason(reason).value
        )

    # --- reads -----------------------------------------------------------------------

    def get(self, delivery_id: str) -> Delivery | None:
        row = self._one("get_delivery", delivery_id=delivery_id)
        return None if row is None else Delivery.from_row(row)

    def events(self, delivery_id: str) -> list[StatusChange]:
        rows = self._all("list_events", delivery_id=delivery_id)
        return [StatusChange.from_row(row) for row in rows]

    def for_recipient(self, recipient: str, *, limit: int = 50) -> list[Delivery]:
        rows = self._all("deliveries_for_recipient", recipient=recipient, limit=limit)
        return [Delivery.from_row(row) for row in rows]

    def stuck(self, *, idle_seconds: int = 3600, limit: int = 100) -> list[Delivery]:
        rows = self._all("stuck_deliveries", idle_seconds=idle_seconds, limit=limit)
        return [Delivery.from_row(row) for row in rows]

    # --- plumbing --------------------------------------------------------------------

    def _set_unsent(self, status: Status, claim: Claim, attempts: int, failure: Failure) -> bool:
        return self._transition(
            "set_unsent_if_claimed",
            status=status.value,
            delivery_id=claim.delivery_id,
            claim_token=claim.claim_token,
            attempts=attempts,
            reason=failure.reason.value,
            error_code=failure.code,
            error_message=failure.message,
        )

    def _transition(self, name: str, **params: Any) -> bool:
        """One guarded statement, retried through a dropped connection or a restart.

        Repeating a guarded transition is harmless (its guard no longer holds once it has
        committed), and it narrows the window in which an email has gone out but the ledger
        cannot say so.
        """
        return _durably(lambda: self._one(name, **params) is not None)

    # --- operators' reads (python -m worker replay) -------------------------------------

    def lease_expired(self, delivery_id: str) -> bool:
        """In progress under a lease that has run out, by the database's clock."""
        return self._one("lease_expired", delivery_id=delivery_id) is not None

    def validity_ended(self, delivery_id: str | None, not_after: datetime | None) -> bool:
        """Whether the delivery's validity end has passed, by the database's clock: the
        earlier of its row's `not_after` and the given one (a message's own); False when
        neither is known."""
        row = self._row("validity_ended", delivery_id=delivery_id, not_after=not_after)
        return bool(row["ended"])


# After a first failure: three more tries, 0.25 s, then 0.5 s and 1 s apart (the first wait
# is `_durably`'s own).
_FIRST_WAIT_SECONDS = 0.25
_RETRIES = tenacity.Retrying(
    stop=tenacity.stop_after_attempt(3),
    wait=tenacity.wait_exponential(multiplier=2 * _FIRST_WAIT_SECONDS, max=2),
    retry=tenacity.retry_if_exception_type(UNREACHABLE),
    reraise=True,
)


def _durably(statement: Callable[[], bool]) -> bool:
    """The statement, and through a dropped connection or a restart, up to three retries.

    The first try runs bare: building and entering a tenacity `Retrying` costs ~70 us, a
    tenth of the ledger's own write, on every email for a failure that is rare. (`_RETRIES`
    is shared: tenacity keeps each call's state thread-local.)
    """
    try:
        return statement()
    except UNREACHABLE:
        time.sleep(_FIRST_WAIT_SECONDS)
    return _RETRIES(statement)
