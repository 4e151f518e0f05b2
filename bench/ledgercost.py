"""The ledger's cost per email against its floor, with fsync off and on (issue 9, item 4).

Floor: what any worker that records every email durably spends at the least: `sendmail` of
pre-built bytes over one kept SMTP connection, between two minimal durable autocommit
statements on the same server (a one-row INSERT before, a one-row UPDATE by primary key
after), on a connection configured as the worker's (autocommit, no prepared statements).
Worker: `pipeline.handle` of a fresh event (decode, claim, render, build, send, record, log).
The floor's bytes are the worker's own emails for the same kind of events, built beforehand.
Statements alone: the worker's own two ledger statements (`email.claim_delivery()`,
`email.set_sent_if_claimed()`, the same SQL and parameters) around the same `sendmail`, with
nothing else: what the worker would cost if its Python were free, so the part of the ratio
that the ledger's schema (its triggers, audit rows and indexes) sets on its own.

Two PostgreSQL servers: the test harness's (fsync off: it hides the commit's flush, which
makes everything else look like the whole bill) and one as production runs it (fsync,
full_page_writes and synchronous_commit on), each with a migrated database, a worker and a
floor. Rounds alternate worker and floor chunks on both servers, so load from other users
of the machine falls on all of them alike; the worker/floor ratio is taken per round and
the median reported. Server CPU per email is the backend's own run time
(/proc/PID/schedstat), which the machine's other load moves less than wall time.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.common import InProcess, captured_stdout, count_status, in_process_worker
from bench.report import Section, median
from bench.services import Stack
from bench.workload import bodies, cloud_event
from tests.harness.postgres import Databases, PostgresServer
from worker.delivery import events, pipeline, smtp
from worker.delivery.config import Settings
from worker.delivery.rendering import Renderer
from worker.store.db import connection_kwargs, query

TARGET = 1.25  # worker / floor, fsync on (issue 9)
FLOOR_TABLE = """
CREATE TABLE public.floor_emails (id text PRIMARY KEY, sent boolean NOT NULL DEFAULT false)
"""
FLOOR_BEFORE = "INSERT INTO public.floor_emails (id) VALUES (%(id)s)"
FLOOR_AFTER = "UPDATE public.floor_emails SET sent = true WHERE id = %(id)s"


class DurablePostgres(PostgresServer):
    """The harness's server with the durability production has (the harness turns it off)."""

    def init(self) -> None:
        super().init()
        with (self.data / "postgresql.conf").open("a") as conf:  # later lines win
            conf.write("fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n")


def backend_cpu_ns(pid: int) -> int:
    """Nanoseconds the backend `pid` has spent on a CPU (Linux schedstat, first field)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
        return int(stat.read().split()[0])


@dataclass
class Chunks:
    """Per round: seconds per email and backend CPU nanoseconds per email."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


@dataclass
class Side:
    """One server: its worker and its floor, with their measurements."""

    label: str
    url: str
    proc: InProcess
    worker_pid: int
    # What-if: the same worker with protocol-level prepared statements (psycopg's
    # prepare_threshold=0), which a transaction-mode PgBouncer 1.18 does not carry.
    prepared: InProcess
    prepared_pid: int
    floor: psycopg.Connection[Any]
    # The worker's two ledger statements, issued by a bare loop (no worker Python).
    statements: psycopg.Connection[Any]
    smtp: smtplib.SMTP
    worker_chunks: Chunks = field(default_factory=Chunks)
    prepared_chunks: Chunks = field(default_factory=Chunks)
    floor_chunks: Chunks = field(default_factory=Chunks)
    statements_chunks: Chunks = field(default_factory=Chunks)

    def close(self) -> None:
        self.proc.close()
        self.prepared.close()
        self.floor.close()
        self.statements.close()
        self.smtp.quit()


def prebuilt(settings: Settings, payloads: list[dict[str, Any]]) -> list[smtp.OutgoingEmail]:
    """The worker's own emails for these payloads, rendered and written to bytes now."""
    renderer = Renderer()
    built = []
    for index, body in enumerate(payloads):
        event = events.decode(cloud_event(body, f"floor-{index}"))
        rendered = renderer.render(event)
        built.append(
            smtp.build_message(
                settings.smtp,
                delivery_id=event.delivery_id,
                recipient=event.recipient,
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
            )
        )
    return built


def one_connection_worker(
    url: str, smtp_port: int, overrides: dict[str, Any] | None = None
) -> tuple[InProcess, int]:
    """A worker whose pool holds one connection, and that connection's backend pid."""
    pids: list[int] = []
    proc = in_process_worker(
        url,
        smtp_port,
        pool_size=1,
        overrides=overrides,
        configure=lambda conn: pids.append(conn.info.backend_pid),
    )
    return proc, pids[-1]


def open_side(label: str, url: str, smtp_port: int) -> Side:
    proc, pid = one_connection_worker(url, smtp_port)
    prepared, prepared_pid = one_connection_worker(url, smtp_port, {"prepare_threshold": 0})
    settings = proc.worker.settings
    floor = psycopg.connect(url, **connection_kwargs(settings.database))
    floor.execute(FLOOR_TABLE)
    statements = psycopg.connect(url, **connection_kwargs(settings.database))
    relay = smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)
    relay.ehlo()
    return Side(label, url, proc, pid, prepared, prepared_pid, floor, statements, relay)


def timed(pid: int, chunk: Chunks, count: int, run: Callable[[], None]) -> None:
    cpu_before, started = backend_cpu_ns(pid), time.perf_counter()
    run()
    chunk.wall.append((time.perf_counter() - started) / count)
    chunk.cpu.append((backend_cpu_ns(pid) - cpu_before) / count)


def run_worker(
    side: Side, prefix: str, count: int, log_path: Path, *, prepared: bool = False
) -> None:
    event_objects = [cloud_event(b, f"{prefix}-{i}") for i, b in enumerate(bodies(count, prefix))]
    worker = (side.prepared if prepared else side.proc).worker

    def deliver() -> None:
        with captured_stdout(log_path):
            for event in event_objects:
                pipeline.handle(event, worker)

    pid, chunks = (
        (side.prepared_pid, side.prepared_chunks)
        if prepared
        else (side.worker_pid, side.worker_chunks)
    )
    timed(pid, chunks, count, deliver)


def run_floor(side: Side, prefix: str, count: int) -> None:
    emails = prebuilt(side.proc.worker.settings, bodies(count, prefix))

    def deliver() -> None:
        for email in emails:
            key = {"id": email.message_id}
            side.floor.execute(FLOOR_BEFORE, key)
            side.smtp.sendmail(email.sender, list(email.recipients), email.data)
            side.floor.execute(FLOOR_AFTER, key)

    timed(side.floor.info.backend_pid, side.floor_chunks, count, deliver)


def run_statements(side: Side, prefix: str, count: int) -> None:
    """The worker's claim and `sent` statements, parameters built beforehand, around the
    floor's `sendmail`: the ledger's share of the worker's cost, without the worker."""
    settings = side.proc.worker.settings
    payloads = bodies(count, prefix)
    emails = prebuilt(settings, payloads)
    claims = [
        {
            "delivery_id": body["delivery_id"],
            "workflow": body["workflow"],
            "recipient": body["recipient"],
            "locale": "en",
            "metadata": Jsonb(body["metadata"]),
            "source_message_id": f"{prefix}-m{index}",
            "lease_seconds": settings.retry.lease_seconds,
            "rate_limit": None,
            "rate_window_seconds": None,
            "takeover_reason": "lease_expired",
        }
        for index, body in enumerate(payloads)
    ]
    claim_sql, sent_sql = query("claim"), query("set_sent_if_claimed")
    conn = side.statements

    def deliver() -> None:
        for email, claim in zip(emails, claims, strict=True):
            row = conn.execute(claim_sql, claim).fetchone()
            assert row is not None and row[0] == "claimed", row
            side.smtp.sendmail(email.sender, list(email.recipients), email.data)
            sent = {
                "delivery_id": claim["delivery_id"],
                "claim_token": row[1],
                "attempts": 1,
                "provider_message_id": email.message_id,
                "relay_message_id": None,
            }
            conn.execute(sent_sql, sent)

    timed(conn.info.backend_pid, side.statements_chunks, count, deliver)


def steps(side: Side, tag: str, count: int, log_path: Path) -> list[Callable[[], None]]:
    return [
        lambda: run_worker(side, f"lc-{tag}", count, log_path),
        lambda: run_floor(side, f"lc-floor-{tag}", count),
        # Not "lc-": the rows counted as the worker's are those.
        lambda: run_statements(side, f"st-{tag}", count),
        lambda: run_worker(side, f"lc-prep-{tag}", count, log_path, prepared=True),
    ]


def run(stack: Stack, *, chunk: int, rounds: int, log_dir: Path) -> Section:
    section = Section("ledgercost", "The ledger's cost per email against its floor")
    durable = DurablePostgres()
    durable.init()
    durable.start()
    sides: list[Side] = []
    log_path = log_dir / "ledgercost-worker.log"
    off_name, off_url = stack.database()
    try:
        on_databases = Databases(durable.admin_url)
        on_databases.prepare_template()
        on_url = on_databases.url(on_databases.create())
        sink = stack.sink
        sides = [
            open_side("fsync off", off_url, sink.port),
            open_side("fsync on", on_url, sink.port),
        ]
        for side in sides:  # connections, plan caches, the SMTP session: warm
            for step in steps(side, "warm", 20, log_path):
                step()
            side.worker_chunks, side.prepared_chunks = Chunks(), Chunks()
            side.floor_chunks, side.statements_chunks = Chunks(), Chunks()
        for number in range(rounds):
            # Each round turns the order around: of the servers, and of what runs on each.
            for side in sides if number % 2 == 0 else sides[::-1]:
                order = steps(side, str(number), chunk, log_path)
                for step in order if number % 2 == 0 else order[::-1]:
                    step()
        for side in sides:
            report(section, side, count=2 * (chunk * rounds + 20))
        section.data.update(chunk=chunk, rounds=rounds, smtp_sink_messages=sink.messages())
    finally:
        for side in sides:
            side.close()
        stack.drop(off_name)
        durable.destroy()
    return section


def report(section: Section, side: Side, *, count: int) -> None:
    worker, prepared, floor = side.worker_chunks, side.prepared_chunks, side.floor_chunks
    statements = side.statements_chunks
    ratios = [w / f for w, f in zip(worker.wall, floor.wall, strict=True)]
    statement_ratios = [s / f for s, f in zip(statements.wall, floor.wall, strict=True)]
    prepared_ratios = [p / f for p, f in zip(prepared.wall, floor.wall, strict=True)]
    ratio = median(ratios)
    worker_ms, floor_ms = median(worker.wall) * 1e3, median(floor.wall) * 1e3
    sent = count_status(side.url, "lc-").get("sent", 0)
    note = f"median of {len(ratios)} rounds' ratios; rounds {min(ratios):.2f}-{max(ratios):.2f}x"
    if side.label == "fsync on":
        note += f"; target <= {TARGET}x: {'met' if ratio <= TARGET else 'not met'}"
    section.add(
        f"{side.label}: worker / floor per email", f"{worker_ms:.2f} / {floor_ms:.2f}", "ms"
    )
    section.add(f"{side.label}: worker / floor", ratio, "x", note)
    section.add(
        f"{side.label}: server CPU per email, worker / floor",
        f"{median(worker.cpu) / 1e3:.0f} / {median(floor.cpu) / 1e3:.0f}",
        "us",
        "the backend's own run time (schedstat)",
    )
    section.add(
        f"{side.label}: the worker's statements alone / floor",
        median(statement_ratios),
        "x",
        f"{median(statements.wall) * 1e3:.2f} ms, server CPU {median(statements.cpu) / 1e3:.0f} us:"
        " claim + sendmail + sent with no worker Python, the schema's own share",
    )
    section.add(
        f"{side.label}: what-if prepared statements / floor",
        median(prepared_ratios),
        "x",
        f"{median(prepared.wall) * 1e3:.2f} ms, server CPU {median(prepared.cpu) / 1e3:.0f} us"
        " (not through a transaction-mode PgBouncer 1.18)",
    )
    section.add(f"{side.label}: worker rows sent", f"{sent} / {count}", "", "email.deliveries")
    section.data[side.label.replace(" ", "_")] = {
        "worker_ms": [round(w * 1e3, 3) for w in worker.wall],
        "prepared_ms": [round(p * 1e3, 3) for p in prepared.wall],
        "floor_ms": [round(f * 1e3, 3) for f in floor.wall],
        "worker_cpu_us": [round(c / 1e3, 1) for c in worker.cpu],
        "prepared_cpu_us": [round(c / 1e3, 1) for c in prepared.cpu],
        "floor_cpu_us": [round(c / 1e3, 1) for c in floor.cpu],
        "statements_ms": [round(s * 1e3, 3) for s in statements.wall],
        "statements_cpu_us": [round(c / 1e3, 1) for c in statements.cpu],
        "statement_ratios": [round(r, 3) for r in statement_ratios],
        "statements_ratio": round(median(statement_ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "prepared_ratios": [round(r, 3) for r in prepared_ratios],
        "ratio": round(ratio, 3),
        "worker_rows_sent": sent,
        "expected_sent": count,
    }
