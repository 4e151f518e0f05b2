"""What operators read and clean up: `python -m worker status|history|stats|prune`.

Logic only: worker/ops/cli.py parses the arguments and formats what these return. Reads of
one row go through `Ledger`; the aggregate and the batched delete are named queries (section
"operators' commands" of `sql/queries.sql`, and `sql/tracking.sql`), each statement its own
short transaction (the pool is in autocommit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from worker.store.db import Store
from worker.store.ledger import Code, Delivery, Ledger, Status, StatusChange
from worker.store.tracking import StoredEvent, Tracking

__all__ = [
    "DeliveryReport",
    "PruneResult",
    "Reports",
    "WorkflowStats",
    "parse_duration",
]

# Six digits keep timedelta far from overflowing; MAX_DURATION keeps `now() - interval`
# inside PostgreSQL's timestamps (999999w is 19,000 years).
_DURATION = re.compile(r"([0-9]{1,6})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = timedelta(days=36500)
# Rows whose sending finished; `skipped` rows were never attempted, so the success rate
# leaves them out (they are counted on their own).
FINISHED = (Status.SENT, Status.FAILED, Status.DEAD_LETTER)


def parse_duration(text: str) -> timedelta:
    """`30m`, `24h`, `7d`, `90d` (also `s` and `w`), greater than zero and at most
    MAX_DURATION (36500d, about 100 years); else ValueError."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not a duration like 30m, 24h, 7d or 90d")
    duration = timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
    if duration > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than {MAX_DURATION.days}d (about 100 years)")
    return duration


# --- status and history ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryReport:
    delivery: Delivery
    events: list[StatusChange]  # status and provider-status changes, oldest first
    provider_events: list[StoredEvent]  # what providers reported, by occurred_at


# --- stats ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowStats:
    """One workflow's deliveries queued in the window (or all of them: `is_total`)."""

    workflow: str
    is_total: bool
    counts: dict[Status, int]
    mean_attempts: float | None  # over finished rows
    p50_seconds: float | None  # queued_at -> sent_at, over sent rows
    p95_seconds: float | None
    # Time to send: the first copy's publish time -> the relay's acceptance (published_at ->
    # sent_at, migration 010), over sent rows that have a publish time.
    send_p50_seconds: float | None = None
    send_p95_seconds: float | None = None
    send_p99_seconds: float | None = None
    # Sent rows by what the provider reported (docs/webhooks.md).
    delivered: int = 0  # delivered, opened, clicked or complained about
    bounced: int = 0
    complained: int = 0
    # Skipped rows by their code (docs/operating.md).
    skipped_by_code: dict[Code, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts[status] for status in FINISHED)

    @property
    def success_rate(self) -> float | None:
        """sent / finished; None while nothing has finished."""
        return self.counts[Status.SENT] / self.finished if self.finished else None

    def _of_sent(self, count: int) -> float | None:
        sent = self.counts[Status.SENT]
        return count / sent if sent else None

    @property
    def delivered_rate(self) -> float | None:
        """delivered / sent (no report yet counts as not delivered)."""
        return self._of_sent(self.delivered)

    @property
    def bounce_rate(self) -> float | None:
        return self._of_sent(self.bounced)

    @property
    def complaint_rate(self) -> float | None:
        return self._of_sent(self.complained)

    def as_json(self) -> dict[str, Any]:
        """The stable JSON shape of one row: `stats --json` and the console's `/api/stats`."""
        return {
            "workflow": self.workflow,
            "is_total": self.is_total,
            "total": self.total,
            "counts": {status.value: count for status, count in self.counts.items()},
            "skipped_by_code": {code.value: n for code, n in self.skipped_by_code.items()},
            "finished": self.finished,
            "success_rate": self.success_rate,
            "provider": {
                "delivered": self.delivered,
                "bounced": self.bounced,
                "complained": self.complained,
            },
            "delivered_rate": self.delivered_rate,
            "bounce_rate": self.bounce_rate,
            "complaint_rate": self.complaint_rate,
            "mean_attempts": self.mean_attempts,
            "p50_seconds": self.p50_seconds,
            "p95_seconds": self.p95_seconds,
            "time_to_send": {
                "p50_seconds": self.send_p50_seconds,
                "p95_seconds": self.send_p95_seconds,
                "p99_seconds": self.send_p99_seconds,
            },
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkflowStats:
        return cls(
            workflow="all" if row["is_total"] else row["workflow"],
            is_total=row["is_total"],
            counts={status: int(row[status.value]) for status in Status},
            mean_attempts=row["mean_attempts"],
            p50_seconds=row["p50_seconds"],
            p95_seconds=row["p95_seconds"],
            send_p50_seconds=row["send_p50_seconds"],
            send_p95_seconds=row["send_p95_seconds"],
            send_p99_seconds=row["send_p99_seconds"],
            delivered=int(row["provider_delivered"]),
            bounced=int(row["provider_bounced"]),
            complained=int(row["provider_complained"]),
            skipped_by_code={
                Code.SUPPRESSED: int(row["skipped_suppressed"]),
                Code.RATE_LIMITED: int(row["skipped_rate_limited"]),
                Code.EXPIRED: int(row["skipped_expired"]),
            },
        )


@dataclass(frozen=True)
class RelayStats:
    """One relay over the deliveries queued in the window: what it accepted, how long that
    SMTP exchange took, and its failed send attempts."""

    relay: str
    sent: int
    transient_failures: int
    permanent_failures: int
    smtp_p50_ms: float | None
    smtp_p95_ms: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "relay": self.relay,
            "sent": self.sent,
            "transient_failures": self.transient_failures,
            "permanent_failures": self.permanent_failures,
            "smtp_p50_ms": self.smtp_p50_ms,
            "smtp_p95_ms": self.smtp_p95_ms,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RelayStats:
        return cls(
            relay=row["relay"],
            sent=int(row["sent"]),
            transient_failures=int(row["transient_failures"]),
            permanent_failures=int(row["permanent_failures"]),
            smtp_p50_ms=row["smtp_p50_ms"],
            smtp_p95_ms=row["smtp_p95_ms"],
        )


# --- prune ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneResult:
    deliveries: int
    events: int
    batches: int
    dry_run: bool
    unmatched_events: int = 0  # provider events no delivery claimed (by received_at)


class Reports(Store):
    """The operators' reads and clean-up, over the ledger's pool."""

    def delivery_report(self, delivery_id: str) -> DeliveryReport | None:
        ledger = Ledger(self.pool)
        delivery = ledger.get(delivery_id)
        if delivery is None:
            return None
        tracked = Tracking(self.pool).events(delivery_id)
        return DeliveryReport(delivery, ledger.events(delivery_id), tracked)

    def history(self, recipient: str, *, limit: int) -> list[Delivery]:
        """The recipient's deliveries (any letter case), most recently changed first."""
        return Ledger(self.pool).for_recipient(recipient, limit=limit)

    def stats(self, *, since: timedelta) -> list[WorkflowStats]:
        """Per workflow, then the total; empty when nothing was queued in the window."""
        rows = self._all(
            "stats_by_workflow",
            since_seconds=since.total_seconds(),
            suppressed=Code.SUPPRESSED.value,
            rate_limited=Code.RATE_LIMITED.value,
            expired=Code.EXPIRED.value,
        )
        return [WorkflowStats.from_row(row) for row in rows]

    def relay_stats(self, *, since: timedelta) -> list[RelayStats]:
        """Per relay (primary first), over deliveries queued in the window."""
        rows = self._all("stats_by_relay", since_seconds=since.total_seconds())
        return [RelayStats.from_row(row) for row in rows]

    def prune(
        self,
        *,
        older_than: timedelta,
        batch_size: int,
        dry_run: bool,
    ) -> PruneResult:
        """Delete finished deliveries (and, by cascade, their events and provider events) not
        updated for `older_than`, then unmatched provider events received before it, `batch_size`
        rows per transaction; with `dry_run`, only count them."""
        seconds = older_than.total_seconds()
        if dry_run:
            row = self._row("count_prunable", older_than_seconds=seconds)
            old = self._row("count_prunable_unmatched", older_than_seconds=seconds)
            return PruneResult(int(row["deliveries"]), int(row["events"]), 0, True, int(old["n"]))
        total = PruneResult(0, 0, 0, dry_run=False)
        while True:
            # Short transactions keep locks brief and let the worker run alongside a big prune.
            row = self._row("prune_batch", older_than_seconds=seconds, batch_size=batch_size)
            if row["deliveries"] == 0:
                break
            total = PruneResult(
                total.deliveries + int(row["deliveries"]),
                total.events + int(row["events"]),
                total.batches + 1,
                dry_run=False,
            )
        unmatched = 0
        while True:
            batch = self._row(
                "prune_unmatched_batch", older_than_seconds=seconds, batch_size=batch_size
            )
            if batch["n"] == 0:
                return PruneResult(
                    total.deliveries, total.events, total.batches, False, unmatched_events=unmatched
                )
            unmatched += int(batch["n"])
