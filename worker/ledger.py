"""Guarded transitions on `email.deliveries`, the source of truth for every email.

Each method is one SQL statement from `sql/queries.sql`, named after its guard. A transition
that returns False lost a race or held a stale claim: callers treat that as an answer. The
audit rows in `email.delivery_events` are written by a trigger, never from here.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from worker.db import query


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
        values = {f.name: row[f.name] for f in fields(cls)}  # type: ignore[arg-type]
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
    # What the provider reported after the send (migration 002, contract section 6).
    provider_status: str | None
    delivered_at: datetime | None
    opened_at: datetime | None
    clicked_at: datetime | None
    bounced_at: datetime | None
    complained_at: datetime | None
    bounce_type: str | None
    relay_message_id: str | None


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


@dataclass(frozen=True)
class Claim(_Row):
    """A worker's right to send one delivery, until `lease_expires_at`."""

    delivery_id: str
    claim_token: uuid.UUID
    attempts: int
    lease_expires_at: datetime


@dataclass(frozen=True)
class Failure:
    """What went wrong, already sanitised: it is stored and shown to operators."""

    code: str
    message: str
    reason: str


class Ledger:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    # --- the worker's transitions -------------------------------------------------

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
        """Claim for sending, or None: already finished, or leased by a live worker."""
        row = self._fetch_one(
            "claim",
            delivery_id=delivery_id,
            workflow=workflow,
            recipient=recipient,
            locale=locale,
            metadata=None if metadata is None else Jsonb(dict(metadata)),
            source_message_id=source_message_id,
            lease_seconds=lease_seconds,
        )
        return None if row is None else Claim.from_row(row)

    def set_sent_if_claimed(self, claim: Claim, *, attempts: int, provider_message_id: str) -> bool:
        return self._changed(
            "set_sent_if_claimed",
            delivery_id=claim.delivery_id,
            claim_token=claim.claim_token,
            attempts=attempts,
            provider_message_id=provider_message_id,
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
        return self._changed(
            "set_failed_if_new_or_queued",
            delivery_id=delivery_id,
            workflow=workflow,
            recipient=recipient,
            source_message_id=source_message_id,
            reason=failure.reason,
            error_code=failure.code,
            error_message=failure.message,
        )

    # --- operators' transitions ------------------------------------------------------

    def set_queued_if_finished(self, delivery_id: str) -> bool:
        """Replay: `failed`/`dead_letter` back to `queued` with a fresh attempt budget."""
        return self._changed("set_queued_if_finished", delivery_id=delivery_id)

    def set_dead_letter_if_abandoned(self, delivery_id: str, *, reason: str) -> bool:
        return self._changed("set_dead_letter_if_abandoned", delivery_id=delivery_id, reason=reason)

    # --- reads -----------------------------------------------------------------------

    def get(self, delivery_id: str) -> Delivery | None:
        row = self._fetch_one("get_delivery", delivery_id=delivery_id)
        return None if row is None else Delivery.from_row(row)

    def events(self, delivery_id: str) -> list[StatusChange]:
        rows = self._fetch_all("list_events", delivery_id=delivery_id)
        return [StatusChange.from_row(row) for row in rows]

    def for_recipient(self, recipient: str, *, limit: int = 50) -> list[Delivery]:
        rows = self._fetch_all("deliveries_for_recipient", recipient=recipient, limit=limit)
        return [Delivery.from_row(row) for row in rows]

    def stuck(self, *, idle_seconds: int = 3600, limit: int = 100) -> list[Delivery]:
        rows = self._fetch_all("stuck_deliveries", idle_seconds=idle_seconds, limit=limit)
        return [Delivery.from_row(row) for row in rows]

    # --- plumbing --------------------------------------------------------------------

    def _set_unsent(self, status: Status, claim: Claim, attempts: int, failure: Failure) -> bool:
        return self._changed(
            "set_unsent_if_claimed",
            status=status.value,
            delivery_id=claim.delivery_id,
            claim_token=claim.claim_token,
            attempts=attempts,
            reason=failure.reason,
            error_code=failure.code,
            error_message=failure.message,
        )

    def _changed(self, name: str, **params: Any) -> bool:
        return self._fetch_one(name, **params) is not None

    def _fetch_one(self, name: str, **params: Any) -> dict[str, Any] | None:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query(name), params)
            return cur.fetchone()

    def _fetch_all(self, name: str, **params: Any) -> list[dict[str, Any]]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query(name), params)
            return cur.fetchall()

    # --- operators' reads (python -m worker replay) -------------------------------------

    def lease_expired(self, delivery_id: str) -> bool:
        """In progress under a lease that has run out, by the database's clock."""
        return self._fetch_one("lease_expired", delivery_id=delivery_id) is not None
