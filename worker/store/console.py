"""The console's reads: the named queries of `sql/console.sql` (and the operators' `stats`,
so the page shows exactly what `python -m worker stats` prints).

Rows come back as plain dicts with the columns each query names; shaping them for JSON or
HTML (masking, rates) is `worker.console.views`' job. Every method is one short read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from worker.store.db import Store
from worker.store.reports import RelayStats, Reports, WorkflowStats

# The chart's outcomes, the columns of stats_timeline.
OUTCOMES = ("sent", "failed", "skipped", "in_flight")


@dataclass(frozen=True)
class Page:
    """One page of a keyset-paginated search; `more` when an older page exists."""

    rows: list[dict[str, Any]]
    more: bool


@dataclass(frozen=True)
class DeliverySearch:
    recipient: str | None = None  # compared case-insensitively
    workflow: str | None = None
    status: str | None = None
    since: datetime | None = None
    after: tuple[datetime, str] | None = None  # the cursor: (created_at, delivery_id)
    limit: int = 50


@dataclass(frozen=True)
class SuppressionSearch:
    address: str | None = None
    reason: str | None = None
    active: bool | None = None
    after: tuple[datetime, int] | None = None  # the cursor: (created_at, id)
    limit: int = 50


@dataclass(frozen=True)
class StatsResult:
    workflows: list[WorkflowStats]
    timeline: list[dict[str, int]]  # `buckets` slices of the window, oldest first
    relays: list[RelayStats] = field(default_factory=list)  # primary first


class ConsoleStore(Store):
    """The console's reads, each one short SELECT (run as an `email_reader` login)."""

    # --- one delivery ---------------------------------------------------------------------

    def delivery(self, delivery_id: str) -> dict[str, Any] | None:
        return self._one("delivery", delivery_id=delivery_id)

    def events(self, delivery_id: str) -> list[dict[str, Any]]:
        return self._all("delivery_events", delivery_id=delivery_id)

    def provider_events(self, delivery_id: str) -> list[dict[str, Any]]:
        return self._all("delivery_provider_events", delivery_id=delivery_id)

    def suppression(self, address: str) -> dict[str, Any] | None:
        """The address's entry on the suppression list (live or expired), if any."""
        return self._one("suppression_for_address", address=address)

    # --- searches ---------------------------------------------------------------------------

    def deliveries(self, search: DeliverySearch) -> Page:
        after_created_at, after_id = search.after or (None, None)
        rows = self._all(
            "search_deliveries",
            recipient=search.recipient,
            workflow=search.workflow,
            status=search.status,
            since=search.since,
            after_created_at=after_created_at,
            after_id=after_id,
            limit=search.limit + 1,  # one more tells whether an older page exists
        )
        return Page(rows[: search.limit], more=len(rows) > search.limit)

    def suppressions(self, search: SuppressionSearch) -> Page:
        after_created_at, after_id = search.after or (None, None)
        rows = self._all(
            "search_suppressions",
            address=search.address,
            reason=search.reason,
            active=search.active,
            after_created_at=after_created_at,
            after_id=after_id,
            limit=search.limit + 1,
        )
        return Page(rows[: search.limit], more=len(rows) > search.limit)

    # --- stats ------------------------------------------------------------------------------

    def stats(self, since: timedelta, *, buckets: int) -> StatsResult:
        seconds = since.total_seconds()
        workflows = Reports(self.pool).stats(since=since)
        slices = self._all(
            "stats_timeline",
            since_seconds=seconds,
            bucket_seconds=seconds / buckets,
            buckets=buckets,
        )
        timeline = [dict.fromkeys(OUTCOMES, 0) for _ in range(buckets)]
        for row in slices:
            timeline[row["bucket"]] = {key: int(row[key]) for key in OUTCOMES}
        return StatsResult(workflows, timeline, Reports(self.pool).relay_stats(since=since))
