"""8. Provider events: the cost of applying one (`Tracking.apply`, one statement), and what
migration 002 costs a running ledger (how long it runs, how long a worker's statement waits
behind it).

Apply: `count` sent deliveries, then per delivery a `delivered`, an `opened`, a `clicked` and
a repeat of the `opened` (the duplicate path), one pooled connection, in a shuffled order.
Migration: a database at version 001 with `ledger_rows` rows, 002 then 003 (the concurrent
index builds) applied while a thread
keeps updating one row in a loop the way a worker's transition does; the longest of those
updates is the stall a running worker sees.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from bench.report import Section, median
from bench.services import Stack
from worker.core.settings import DatabaseSettings
from worker.store.db import connection_kwargs
from worker.store.migrations import discover, migrate_up
from worker.store.tracking import EventType, ProviderEvent, Tracking

T0 = datetime(2026, 11, 23, tzinfo=UTC)
SENT_ROWS = """
INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, provider_message_id)
SELECT 'b-' || n, 'invite', 'user' || n || '@example.com', 'failed', '<b-' || n || '@example.com>'
FROM generate_series(1, %(n)s) AS n
"""


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def _events(count: int) -> list[ProviderEvent]:
    events = []
    for n in range(1, count + 1):
        for minute, kind, event_id in (
            (1, EventType.DELIVERED, "d"),
            (2, EventType.OPENED, "o"),
            (3, EventType.CLICKED, "c"),
            (2, EventType.OPENED, "o"),  # the provider's retry: a duplicate
        ):
            events.append(
                ProviderEvent(
                    provider="sendgrid",
                    provider_event_id=f"{n}-{event_id}",
                    event_type=kind,
                    occurred_at=T0 + timedelta(minutes=minute),
                    recipient=f"user{n}@example.com",
                    delivery_id=None,
                    message_id=f"<b-{n}@example.com>",  # matched by Message-ID, the 2nd key
                    relay_message_id=None,
                )
            )
    random.Random(7).shuffle(events)
    return events


def apply_cost(stack: Stack, count: int, section: Section) -> None:
    name, url = stack.database()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SENT_ROWS, {"n": count})
            conn.execute("ANALYZE email.deliveries")
        kwargs = connection_kwargs(DatabaseSettings(url=url))
        with ConnectionPool(url, min_size=1, max_size=1, kwargs=kwargs) as pool:
            tracking = Tracking(pool)
            events = _events(count)
            latencies: list[float] = []
            started = time.perf_counter()
            for event in events:
                began = time.perf_counter()
                tracking.apply(event)
                latencies.append((time.perf_counter() - began) * 1000)
            elapsed = time.perf_counter() - started
        section.add("events applied", len(events), note="25% duplicates, matched by Message-ID")
        section.add("apply throughput", len(events) / elapsed, "events/s", "one connection")
        section.add("apply latency p50", median(latencies), "ms")
        section.add("apply latency p95", _percentile(latencies, 0.95), "ms")
        section.data["apply"] = {
            "events": len(events),
            "seconds": elapsed,
            "p50_ms": median(latencies),
            "p95_ms": _percentile(latencies, 0.95),
        }
    finally:
        stack.drop(name)


def migration_cost(stack: Stack, ledger_rows: int, section: Section) -> None:
    assert stack.databases is not None
    name = stack.databases.create(template="template0")
    url = stack.databases.url(name)
    try:
        first, later = discover()[0], [m for m in discover() if m.version in (2, 3)]
        migrate_up(url, [first], report=lambda _: None)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SENT_ROWS, {"n": ledger_rows})
            conn.execute(
                "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
                " VALUES ('hot', 'invite', 'a@example.com', 'queued')"
            )
            conn.execute("ANALYZE email.deliveries")
        stop = threading.Event()
        waits: list[tuple[float, float]] = []  # (start, milliseconds)

        def worker_statements() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                while not stop.is_set():
                    began = time.perf_counter()
                    conn.execute(
                        "UPDATE email.deliveries SET last_attempted_at = now()"
                        " WHERE delivery_id = 'hot' AND status = 'queued'"
                    )
                    waits.append((began, (time.perf_counter() - began) * 1000))

        loop = threading.Thread(target=worker_statements)
        loop.start()
        time.sleep(0.2)  # a baseline of unblocked statements first
        spans = []
        for migration in later:
            began = time.perf_counter()
            migrate_up(url, [migration], report=lambda _: None)
            spans.append((migration.label, began, time.perf_counter()))
        time.sleep(0.2)
        stop.set()
        loop.join()
        section.data["migration"] = {"ledger_rows": ledger_rows}
        for label, began, ended in spans:
            # Statements that started while the migration ran.
            during = [ms for start, ms in waits if began <= start <= ended]
            longest = max(during, default=0.0)
            section.add(f"{label}", (ended - began) * 1000, "ms", f"ledger of {ledger_rows:,} rows")
            section.add(
                f"  worker statement max during {label[:3]}", longest, "ms", "a 1-row UPDATE"
            )
            section.data["migration"][label] = {
                "seconds": ended - began,
                "worker_statement_max_ms": longest,
                "worker_statements": len(during),
            }
        section.add("worker statement p50", median([ms for _, ms in waits]), "ms", "whole run")
    finally:
        stack.databases.drop(name)


def run(stack: Stack, *, count: int, ledger_rows: int, log_dir: Path) -> Section:
    section = Section(
        "tracking", "provider events: apply cost; migrations 002+003 on a live ledger"
    )
    apply_cost(stack, count, section)
    migration_cost(stack, ledger_rows, section)
    return section
