"""claimcost: what the claim costs since it decides suppression and rate limits (004, 005).

The claim is `SELECT * FROM email.claim_delivery(...)`: one statement, one round trip, with or
without a limit. Measured on a ledger of `ledger_rows` sent rows over 5,000 recipients (so the
rate-limit count has history to look through), one pooled connection, production connection
settings, each claim followed by its `sent` write (so claimed rows count for the next ones):

- before: the previous claim, the plain `INSERT ... ON CONFLICT`, on a schema rolled back to
  003 (no rate-limit index, no function), as the baseline;
- limits off: the function, no suppression entry, no limit (what every delivery pays now);
- limits on: the same with a limit that is never reached (advisory lock + the count);
- skipped (rate limited), skipped (suppressed): the claim that ends a row `skipped`.

The modes take turns claim by claim (each sees the same load on the shared machine); the
figure is the median client-observed time of one claim, round trip included (the server's
mean per call, from pg_stat_statements, is in the JSON). A last pass runs `pipeline.handle`
with RATE_LIMITS on: statements per delivery (target 2), and a burst of codes to one recipient
(N sent, the rest skipped with one statement each).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from bench.common import captured_stdout, in_process_worker
from bench.report import Section
from bench.services import Stack
from bench.workload import cloud_event
from worker.core.settings import DatabaseSettings, RateLimit
from worker.delivery import pipeline
from worker.store.db import connection_kwargs
from worker.store.ledger import Claim, Ledger
from worker.store.migrations import discover, migrate_down

# The claim statement before migration 005 (sql/queries.sql), kept here as the baseline.
CLAIM_002 = """
INSERT INTO email.deliveries AS d (
    delivery_id, workflow, recipient, locale, metadata, source_message_id,
    status, attempts, claim_token, lease_expires_at, last_attempted_at
) VALUES (
    %(delivery_id)s, %(workflow)s, %(recipient)s, %(locale)s, %(metadata)s,
    %(source_message_id)s, 'in_progress', 1, gen_random_uuid(),
    now() + %(lease_seconds)s * interval '1 second', now()
)
ON CONFLICT (delivery_id) DO UPDATE SET
    workflow = excluded.workflow,
    recipient = excluded.recipient,
    locale = excluded.locale,
    metadata = excluded.metadata,
    source_message_id = excluded.source_message_id,
    status = 'in_progress',
    status_reason = CASE WHEN d.status = 'in_progress' THEN 'lease_expired' END,
    attempts = d.attempts + 1,
    claim_token = excluded.claim_token,
    lease_expires_at = excluded.lease_expires_at,
    last_attempted_at = now()
WHERE d.status IN ('queued', 'retrying')
   OR (d.status = 'in_progress' AND d.lease_expires_at < now())
RETURNING d.delivery_id, d.claim_token, d.attempts, d.lease_expires_at
"""
# The `sent` write of the same era (migration 006 made it a function), so the baseline's rows
# end `sent` as the others' do.
SENT_BEFORE_006 = """
UPDATE email.deliveries SET
    status = 'sent', status_reason = NULL, sent_at = now(),
    attempts = greatest(attempts, %(attempts)s), provider_message_id = %(provider_message_id)s,
    last_error_code = NULL, last_error_message = NULL, claim_token = NULL, lease_expires_at = NULL
WHERE delivery_id = %(delivery_id)s AND status = 'in_progress' AND claim_token = %(claim_token)s
RETURNING delivery_id
"""
BASELINE_VERSION = 3  # the schema the previous claim statement ran on: before 004 and 005
RECIPIENTS = 5000
NEVER_REACHED = RateLimit(1_000_000, 86400, "1000000/1d")
ONE_PER_DAY = RateLimit(1, 86400, "1/1d")


def _fill(url: str, rows: int) -> None:
    """`rows` sent rows over the last 20 hours, RECIPIENTS recipients, no triggers (bulk)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, attempts,"
            " sent_at, provider_message_id)"
            " SELECT 'bulk-' || n, 'verification-code', 'user' || (n %% %s) || '@example.com',"
            " 'sent', 1, now() - (n %% 72000) * interval '1 second', '<bulk-' || n || '@x>'"
            " FROM generate_series(1, %s) AS n",
            (RECIPIENTS, rows),
        )
        conn.execute("RESET session_replication_role")
        conn.execute("ANALYZE email.deliveries")


def _pool(url: str) -> ConnectionPool:
    settings = DatabaseSettings(url=url, pool_max_size=1)
    pool = ConnectionPool(url, min_size=1, max_size=1, kwargs=connection_kwargs(settings))
    pool.wait(timeout=10)
    return pool


class Mode:
    """One way of claiming: `claim(ledger, delivery_id, recipient)`."""

    def __init__(
        self,
        name: str,
        url: str,
        claim: Callable[[Ledger, str, str], Any],
        sent: Callable[[Ledger, Claim], Any] | None = None,
    ) -> None:
        self.name = name
        self.pool = _pool(url)
        self.ledger = Ledger(self.pool)
        self._claim = claim
        self._sent = sent or _sent
        self.samples_us: list[float] = []
        self.sent_us: list[float] = []
        self.outcomes: dict[str, int] = {}

    def once(self, delivery_id: str, recipient: str) -> None:
        started = time.perf_counter_ns()
        result = self._claim(self.ledger, delivery_id, recipient)
        self.samples_us.append((time.perf_counter_ns() - started) / 1000)
        kind = type(result).__name__ if result is not None else "None"
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
        if isinstance(result, Claim):
            started = time.perf_counter_ns()
            self._sent(self.ledger, result)
            self.sent_us.append((time.perf_counter_ns() - started) / 1000)

    def reset(self) -> None:
        self.samples_us.clear()
        self.sent_us.clear()
        self.outcomes.clear()

    def percentile(self, fraction: float, samples: list[float] | None = None) -> float:
        ordered = sorted(self.samples_us if samples is None else samples)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _sent(ledger: Ledger, claim: Claim) -> Any:
    return ledger.set_sent_if_claimed(
        claim, attempts=1, provider_message_id=f"<{claim.delivery_id}@x>"
    )


def _sent_before_006(ledger: Ledger, claim: Claim) -> Any:
    with ledger.pool.connection() as conn:
        params = {
            "delivery_id": claim.delivery_id,
            "claim_token": claim.claim_token,
            "attempts": 1,
            "provider_message_id": f"<{claim.delivery_id}@x>",
        }
        return conn.execute(SENT_BEFORE_006, params).fetchone()


def _claim_002(ledger: Ledger, delivery_id: str, recipient: str) -> Claim | None:
    with ledger.pool.connection() as conn:
        row = conn.execute(
            CLAIM_002,
            {
                "delivery_id": delivery_id,
                "workflow": "verification-code",
                "recipient": recipient,
                "locale": "en",
                "metadata": Jsonb({"tenant": "acme"}),
                "source_message_id": "m",
                "lease_seconds": 300,
            },
        ).fetchone()
    return None if row is None else Claim(row[0], row[1], row[2], row[3])


def _claim_005(limit: RateLimit | None) -> Callable[[Ledger, str, str], Any]:
    def claim(ledger: Ledger, delivery_id: str, recipient: str) -> Any:
        return ledger.claim_or_skip(
            delivery_id=delivery_id,
            workflow="verification-code",
            recipient=recipient,
            locale="en",
            metadata={"tenant": "acme"},
            source_message_id="m",
            lease_seconds=300,
            rate_limit=limit,
        )

    return claim


def _server_times(admin_url: str, database: str) -> dict[str, float]:
    """Mean server execution time (us) of the top-level claim statements in `database`."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT s.query, s.calls, s.mean_exec_time FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s AND s.toplevel",
            (database,),
        ).fetchall()
    times: dict[str, float] = {}
    for query, calls, mean_ms in rows:
        if "claim_delivery" in query or "INSERT INTO email.deliveries" in query:
            times[f"{calls} calls"] = float(mean_ms) * 1000
    return times


def _count_plan(url: str) -> str:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON)"
            " SELECT count(*) FROM email.deliveries d"
            " WHERE lower(d.recipient) = 'user7@example.com'"
            " AND d.workflow = 'verification-code' AND d.status IN ('sent', 'in_progress')"
            " AND coalesce(d.sent_at, d.lease_expires_at) > now() - interval '1 day'"
            " AND d.delivery_id <> 'x'"
        ).fetchall()
    return "; ".join(str(row[0]).strip() for row in rows)


def _pipeline_pass(
    stack: Stack, url: str, database: str, count: int, log_dir: Path
) -> dict[str, Any]:
    """pipeline.handle with RATE_LIMITS on: statements per delivery, and a burst."""
    proc = in_process_worker(url, stack.sink.port, pool_size=1)
    limits = {"verification-code": RateLimit(5, 3600, "5/1h")}
    proc.worker.settings = replace(proc.worker.settings, rate_limits=limits)
    try:
        events = [
            cloud_event(_body(f"pl-{n}", f"pl{n}@example.com"), f"p{n}") for n in range(count)
        ]
        burst = [cloud_event(_body(f"burst-{n}", "victim@example.com"), f"b{n}") for n in range(30)]
        with captured_stdout(log_dir / "claimcost-worker.log"):
            for event in events[:20]:
                pipeline.handle(event, proc.worker)  # warm-up
            _reset(stack.admin_url)
            for event in events[20:]:
                pipeline.handle(event, proc.worker)
            normal = _top_level_calls(stack.admin_url, database) / (count - 20)
            _reset(stack.admin_url)
            for event in burst:
                pipeline.handle(event, proc.worker)
            burst_calls = _top_level_calls(stack.admin_url, database)
        with psycopg.connect(url) as conn:
            statuses: dict[str, int] = dict(
                conn.execute(
                    "SELECT status::text, count(*) FROM email.deliveries"
                    " WHERE delivery_id LIKE 'burst-%%' GROUP BY 1"
                ).fetchall()
            )
    finally:
        proc.close()
    return {
        "statements_per_delivery_limits_on": normal,
        "burst_events": len(burst),
        "burst_statuses": {k: int(v) for k, v in statuses.items()},
        "burst_statements": burst_calls,
    }


def _body(delivery_id: str, recipient: str) -> dict[str, Any]:
    return {
        "delivery_id": delivery_id,
        "workflow": "verification-code",
        "recipient": recipient,
        "data": {"code": "739154", "expires_in_minutes": 10},
        "metadata": {"tenant": "acme"},
        "locale": "en",
    }


def _reset(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def _top_level_calls(admin_url: str, database: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s AND s.toplevel"
            " AND s.query NOT LIKE '%%pg_stat_statements%%'",
            (database,),
        ).fetchone()
    return int(row[0]) if row else 0


def run(stack: Stack, *, count: int, ledger_rows: int, log_dir: Path) -> Section:
    section = Section("claimcost", "The claim with suppression and rate limits (004, 005)")
    before_name, before_url = stack.database()
    after_name, after_url = stack.database()
    modes: list[Mode] = []
    try:
        newer = [m for m in discover() if m.version > BASELINE_VERSION]
        migrate_down(before_url, steps=len(newer), report=lambda _line: None)
        for url in (before_url, after_url):
            _fill(url, ledger_rows)
        with psycopg.connect(after_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO email.suppressions (address, reason)"
                " SELECT 'blocked' || n || '@example.com', 'hard_bounce'"
                " FROM generate_series(0, %s) AS n",
                (RECIPIENTS,),
            )
        modes = [
            Mode("before: previous claim statement", before_url, _claim_002, _sent_before_006),
            Mode("limits off", after_url, _claim_005(None)),
            Mode("limits on (not reached)", after_url, _claim_005(NEVER_REACHED)),
            Mode("skipped: rate limited", after_url, _claim_005(ONE_PER_DAY)),
            Mode("skipped: suppressed", after_url, _claim_005(None)),
        ]
        # Claim by claim, the modes take turns, so each sees the same machine load.
        users = itertools.cycle(range(RECIPIENTS))
        warm = 50
        for n in range(warm + count):
            if n == warm:
                for mode in modes:
                    mode.reset()
                _reset(stack.admin_url)
            user = next(users)
            for index, mode in enumerate(modes):
                recipient = (
                    f"Blocked{user}@example.com"
                    if "suppressed" in mode.name
                    else f"user{user}@example.com"
                )
                mode.once(f"m{index}-{n}", recipient)
        baseline = modes[0].percentile(0.5)
        for mode in modes:
            p50 = mode.percentile(0.5)
            section.add(
                f"claim: {mode.name}",
                p50,
                "us",
                f"p50, {p50 / baseline:.2f}x before; p90 {mode.percentile(0.9):.0f} us;"
                + (
                    f" its sent write p50 {mode.percentile(0.5, mode.sent_us):.0f} us;"
                    if mode.sent_us
                    else ""
                )
                + f" {mode.outcomes}",
            )
        section.data["server_exec_us"] = {
            "before": _server_times(stack.admin_url, before_name),
            "after": _server_times(stack.admin_url, after_name),
        }
        plan = _count_plan(after_url)
        section.add(
            "rate-limit count (EXPLAIN ANALYZE)",
            "index" if "deliveries_rate_limit_idx" in plan else "NO INDEX",
            "",
            plan.rsplit(";", 1)[-1].strip() + f" (ledger of {ledger_rows:,} rows)",
        )
        section.data["claim_us"] = {
            m.name: {
                "p50": m.percentile(0.5),
                "p90": m.percentile(0.9),
                "sent_p50": m.percentile(0.5, m.sent_us) if m.sent_us else None,
            }
            for m in modes
        }
        section.data["outcomes"] = {m.name: m.outcomes for m in modes}
        for mode in modes:
            mode.pool.close()
        modes = []
        figures = _pipeline_pass(stack, after_url, after_name, count=200, log_dir=log_dir)
        section.add(
            "statements / delivery, limits on",
            figures["statements_per_delivery_limits_on"],
            "",
            "pipeline.handle, pg_stat_statements top level (target 2)",
        )
        section.add(
            "burst: 30 codes to one address, limit 5/1h",
            str(figures["burst_statuses"]),
            "",
            f"{figures['burst_statements']} statements in all",
        )
        section.data.update(
            count=count,
            ledger_rows=ledger_rows,
            recipients=RECIPIENTS,
            count_plan=plan,
            **figures,
        )
    finally:
        for mode in modes:
            mode.pool.close()
        stack.drop(before_name)
        stack.drop(after_name)
    return section
