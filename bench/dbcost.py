"""3. Database cost per delivery: statements (pg_stat_statements) and protocol round trips
(libpq's own trace of the wire protocol).

One pooled connection, traced with `PQtrace` after a warm-up: every `ReadyForQuery` the
server sends ends one client wait, so their count is the round trips. pg_stat_statements
(preloaded by tests/harness/postgres.py, `track = all`) is reset just before the run and
read after it: top-level statements are what the worker sent, nested ones ran inside the
ledger functions and triggers (the UPDATE of migration 006's set_sent_if_claimed, the audit
rows). A second pass redelivers already-sent events (at-least-once).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.common import captured_stdout, in_process_worker
from bench.inprocess import PhaseTimer
from bench.report import Section
from bench.services import Stack
from bench.workload import bodies, cloud_event
from worker.delivery import pipeline
from worker.store.ledger import Ledger

_MESSAGE = re.compile(r"^(F|B)\t(\d+)\t(\w+)")


class WireTrace:
    """libpq's trace of one connection, switched on and off around the measured run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection: psycopg.Connection[Any] | None = None
        self._fd: int | None = None

    def remember(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection

    def start(self) -> None:
        assert self.connection is not None, "the pool has not connected yet"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pgconn = self.connection.pgconn
        pgconn.trace(self._fd)
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)

    def stop(self) -> Counter[str]:
        assert self.connection is not None and self._fd is not None
        self.connection.pgconn.untrace()  # flushes libpq's FILE*
        os.close(self._fd)
        self._fd = None
        counts: Counter[str] = Counter()
        with self.path.open(encoding="utf-8", errors="replace") as trace:
            for line in trace:
                match = _MESSAGE.match(line)
                if match:
                    direction, size, kind = match.groups()
                    counts[f"{direction} {kind}"] += 1
                    counts[f"{direction} bytes"] += int(size) + 1  # + the type byte
        return counts


def _reset_statements(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def _statements(admin_url: str, database: str) -> list[dict[str, Any]]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT s.toplevel, s.calls, s.rows, s.mean_plan_time, s.mean_exec_time, s.query"
            " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = %s ORDER BY s.toplevel DESC, s.calls DESC",
            (database,),
        ).fetchall()
    return [
        {
            "toplevel": bool(top),
            "calls": int(calls),
            "rows": int(n),
            "mean_plan_us": float(plan) * 1000,
            "mean_exec_us": float(execute) * 1000,
            "query": str(query),
        }
        for top, calls, n, plan, execute, query in rows
    ]


def _short(query: str) -> str:
    text = " ".join(line for line in query.splitlines() if not line.strip().startswith("--"))
    return " ".join(text.split())[:70]


def _measure(
    stack: Stack,
    database: str,
    trace: WireTrace,
    count: int,
    deliver: Callable[[], None],
) -> tuple[Counter[str], list[dict[str, Any]]]:
    _reset_statements(stack.admin_url)
    trace.start()
    try:
        deliver()
    finally:
        wire = trace.stop()
    return wire, _statements(stack.admin_url, database)


def _client_timings(
    url: str, smtp_port: int, count: int, log_path: Path, prefix: str, prepared: bool
) -> dict[str, float]:
    """Client-observed microseconds per ledger call and per `SELECT 1`, no trace running."""
    overrides = {"prepare_threshold": 0} if prepared else None
    proc = in_process_worker(url, smtp_port, pool_size=1, overrides=overrides)
    try:
        with captured_stdout(log_path):
            for index, body in enumerate(bodies(20, f"{prefix}-warm")):
                pipeline.handle(cloud_event(body, f"w{index}"), proc.worker)
        probes = 300
        with proc.pool.connection() as conn:
            started = time.perf_counter()
            for _ in range(probes):
                conn.execute("SELECT 1").fetchone()
            select_one = (time.perf_counter() - started) / probes * 1e6
        started = time.perf_counter()
        for _ in range(probes):
            with proc.pool.connection() as conn:
                conn.execute("SELECT 1").fetchone()
        select_one_pool = (time.perf_counter() - started) / probes * 1e6
        event_objects = [cloud_event(b, f"t{i}") for i, b in enumerate(bodies(count, prefix))]
        timer = PhaseTimer()
        timer.wrap(Ledger, "claim_or_skip", "claim")
        timer.wrap(Ledger, "set_sent_if_claimed", "set_sent")
        try:
            with captured_stdout(log_path):
                started = time.perf_counter()
                for event in event_objects:
                    pipeline.handle(event, proc.worker)
                handle = (time.perf_counter() - started) / count * 1e6
        finally:
            timer.restore()
    finally:
        proc.close()
    return {
        "claim_us": timer.seconds["claim"] / count * 1e6,
        "set_sent_us": timer.seconds["set_sent"] / count * 1e6,
        "select_1_us": select_one,
        "select_1_with_pool_checkout_us": select_one_pool,
        "handle_us": handle,
    }


def run(stack: Stack, *, count: int, log_dir: Path) -> Section:
    section = Section("dbcost", "Database cost per delivery (pg_stat_statements + libpq trace)")
    sink = stack.sink
    name, url = stack.database()
    trace = WireTrace(log_dir / "dbcost-wire.trace")
    proc = in_process_worker(url, sink.port, configure=trace.remember, pool_size=1)
    log_path = log_dir / "dbcost-worker.log"
    try:
        with captured_stdout(log_path):
            for index, body in enumerate(bodies(20, "db-warm")):
                pipeline.handle(cloud_event(body, f"w{index}"), proc.worker)
        payloads = bodies(count, "db-run")
        event_objects = [cloud_event(b, f"m{i}") for i, b in enumerate(payloads)]

        def deliver_all() -> None:
            with captured_stdout(log_path):
                for event in event_objects:
                    pipeline.handle(event, proc.worker)

        wire, statements = _measure(stack, name, trace, count, deliver_all)
        with psycopg.connect(url) as conn:
            sent, audit = conn.execute(
                "SELECT (SELECT count(*) FROM email.deliveries"
                "        WHERE delivery_id LIKE 'db-run-%' AND status = 'sent'),"
                "       (SELECT count(*) FROM email.delivery_events"
                "        WHERE delivery_id LIKE 'db-run-%')"
            ).fetchone() or (0, 0)

        top = [s for s in statements if s["toplevel"]]
        nested = [s for s in statements if not s["toplevel"]]
        round_trips = wire["B ReadyForQuery"]
        section.add("round trips / delivery", round_trips / count, "", "target 2 (libpq trace)")
        section.add(
            "statements sent / delivery",
            (wire["F Parse"] + wire["F Query"]) / count,
            "",
            "Parse+Query messages on the wire",
        )
        section.add(
            "top-level statements / delivery",
            sum(s["calls"] for s in top) / count,
            "",
            "pg_stat_statements, toplevel",
        )
        section.add(
            "nested statements / delivery",
            sum(s["calls"] for s in nested) / count,
            "",
            "run inside the ledger functions and triggers",
        )
        section.add("audit rows / delivery", int(audit) / count, "", "email.delivery_events")
        section.add(
            "bytes sent / received per delivery",
            f"{wire['F bytes'] / count:.0f} / {wire['B bytes'] / count:.0f}",
            "B",
        )
        for statement in statements:
            section.add(
                f"  {'top' if statement['toplevel'] else 'nested'}: "
                + _short(statement["query"])[:48],
                statement["calls"] / count,
                "calls/delivery",
                f"server plan {statement['mean_plan_us']:.0f} us"
                f" + exec {statement['mean_exec_us']:.0f} us",
            )

        plain = _client_timings(url, sink.port, count, log_path, "db-plain", prepared=False)
        prepared = _client_timings(url, sink.port, count, log_path, "db-prep", prepared=True)
        section.add(
            "client: claim / set_sent",
            f"{plain['claim_us']:.0f} / {plain['set_sent_us']:.0f}",
            "us",
            "as configured (prepare_threshold=None)",
        )
        section.add(
            "client: SELECT 1 round trip",
            plain["select_1_us"],
            "us",
            f"{plain['select_1_with_pool_checkout_us']:.0f} us with a pool checkout each",
        )
        section.add(
            "what-if prepared: claim / set_sent",
            f"{prepared['claim_us']:.0f} / {prepared['set_sent_us']:.0f}",
            "us",
            f"prepare_threshold=0; handle {prepared['handle_us'] / plain['handle_us']:.2f}x"
            " the time",
        )

        # At-least-once: the same events again, all already `sent`.
        def redeliver_all() -> None:
            with captured_stdout(log_path):
                for event in event_objects:
                    pipeline.handle(event, proc.worker)

        dup_wire, dup_statements = _measure(stack, name, trace, count, redeliver_all)
        section.add(
            "duplicate event: round trips",
            dup_wire["B ReadyForQuery"] / count,
            "",
            "the claim says what stopped it (email.claim_delivery)",
        )
        section.data.update(
            count=count,
            ledger_sent=int(sent),
            wire_messages=dict(wire),
            statements=statements,
            duplicate_wire_messages=dict(dup_wire),
            duplicate_statements=dup_statements,
            round_trips_per_delivery=round_trips / count,
            client_timings=plain,
            client_timings_prepared=prepared,
        )
    finally:
        proc.close()
        stack.drop(name)
    return section
