"""Skipped on purpose (docs/reference.md and docs/operating.md), end to end with real workers:
a suppressed recipient and a per-recipient rate limit, against PostgreSQL, the Pub/Sub emulator
and an aiosmtpd server that records what it accepted."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tests import factories
from tests.harness.cluster import Deliverer, WorkerCluster, push_message, worker_env
from tests.harness.postgres import wait_until
from tests.harness.pubsub import PubSubNamespace
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import MakeWorker
from worker.core.settings import RateLimit
from worker.delivery.pipeline import Worker, handle
from worker.ops import cli
from worker.store.ledger import Ledger, Status
from worker.store.tracking import EventType, ProviderEvent, Tracking


def limited(make_worker: MakeWorker, **limits: RateLimit) -> Worker:
    worker = make_worker()
    return replace(worker, settings=replace(worker.settings, rate_limits=limits))


def emails_to(smtp_server: SmtpTestServer, address: str) -> int:
    return sum(
        1 for m in smtp_server.messages if [r.lower() for r in m.rcpt_tos] == [address.lower()]
    )


def statuses(database_url: str, recipient: str) -> Counter[tuple[str, str | None]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT status::text, last_error_code FROM email.deliveries"
            " WHERE lower(recipient) = lower(%s)",
            (recipient,),
        ).fetchall()
    return Counter((status, code) for status, code in rows)


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# --- suppression ------------------------------------------------------------------------------


def test_a_hard_bounce_suppresses_the_address_until_an_operator_lifts_it(
    make_worker: MakeWorker,
    ledger: Ledger,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    worker = make_worker()
    first = factories.payload("invite", recipient="Ada.Lovelace@example.com")
    handle(factories.cloud_event(first), worker)
    assert Tracking(ledger.pool).apply(
        ProviderEvent(
            provider="postmark",
            provider_event_id="bounce-1",
            event_type=EventType.BOUNCED,
            occurred_at=datetime(2026, 11, 23, 12, tzinfo=UTC),
            recipient="Ada.Lovelace@example.com",
            delivery_id=first["delivery_id"],
            message_id=None,
            relay_message_id=None,
            bounce_type="HardBounce",
        )
    )

    # The same address in other letter case: skipped, no email, no dead letter, acked.
    second = factories.payload("password-reset", recipient="ADA.LOVELACE@EXAMPLE.COM")
    capsys.readouterr()
    handle(factories.cloud_event(second), worker)
    assert len(smtp_server.messages) == 1
    row = ledger.get(second["delivery_id"])
    assert row is not None
    assert (row.status, row.last_error_code, row.status_reason, row.attempts) == (
        Status.SKIPPED,
        "SUPPRESSED",
        "hard_bounce",
        0,
    )
    [line] = [line for line in log_lines(capsys) if line["message"] == "delivery skipped"]
    assert (line["reason"], line["error_code"]) == ("hard_bounce", "SUPPRESSED")
    assert line["delivery_id"] == second["delivery_id"]
    assert "lovelace" not in json.dumps(line).lower()  # the address is masked

    # Pub/Sub redelivers it: still skipped, nothing sent, acked, no new audit row.
    handle(factories.cloud_event(second), worker)
    assert len(smtp_server.messages) == 1
    assert len(ledger.events(second["delivery_id"])) == 1
    assert pubsub.dead_letters(timeout=1) == []

    # The operator lifts it; the next delivery goes out.
    assert cli.main(["suppressions", "remove", "ada.lovelace@EXAMPLE.com"]) == 0
    third = factories.payload("verification-code", recipient="ada.lovelace@example.com")
    handle(factories.cloud_event(third), worker)
    assert emails_to(smtp_server, "ada.lovelace@example.com") == 2
    row = ledger.get(third["delivery_id"])
    assert row is not None and row.status is Status.SENT


def test_an_expired_manual_entry_does_not_suppress(
    make_worker: MakeWorker, database_url: str, ledger: Ledger, smtp_server: SmtpTestServer
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO email.suppressions (address, reason, expires_at) VALUES"
            " ('grace@example.com', 'manual', now() - interval '1 second'),"
            " ('alan@example.com', 'manual', now() + interval '1 hour')"
        )
    worker = make_worker()
    for recipient in ("Grace@example.com", "alan@example.com"):
        handle(factories.cloud_event(factories.payload(recipient=recipient)), worker)
    assert [m.rcpt_tos for m in smtp_server.messages] == [("Grace@example.com",)]


# --- rate limits ------------------------------------------------------------------------------


def test_eight_threads_deliver_exactly_n_codes_to_one_address(
    make_worker: MakeWorker,
    database_url: str,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
) -> None:
    n = 4
    workers = [
        limited(make_worker, **{"verification-code": RateLimit(n, 3600, f"{n}/1h")})
        for _ in range(8)
    ]
    spellings = ["eve@example.com", "Eve@Example.com", "EVE@EXAMPLE.COM"]
    burst = [factories.payload(recipient=spellings[i % 3]) for i in range(3 * n)]
    others = [
        factories.payload(recipient="mallory@example.com"),
        factories.payload("password-reset", recipient="eve@example.com"),
    ]
    bodies = burst + others
    start = threading.Barrier(8)

    def deliver(index: int) -> None:
        start.wait()
        for body in bodies[index::8]:
            handle(factories.cloud_event(body), workers[index])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(deliver, range(8)))
    # Every copy again, as Pub/Sub redelivers: nothing changes.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda body: handle(factories.cloud_event(body), workers[0]), bodies))

    assert emails_to(smtp_server, "eve@example.com") == n + 1  # n codes + the reset
    assert emails_to(smtp_server, "mallory@example.com") == 1
    assert len(smtp_server.messages) == n + 2
    assert statuses(database_url, "eve@example.com") == Counter(
        {("sent", None): n + 1, ("skipped", "RATE_LIMITED"): 2 * n}
    )
    assert pubsub.dead_letters(timeout=1) == []


def blocked_backends(conn: psycopg.Connection[Any]) -> int:
    """Backends of this test's database waiting for a lock another one holds."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND cardinality(pg_blocking_pids(pid)) > 0"
    ).fetchone()
    return int(row[0]) if row else 0


def test_a_claim_counting_for_the_limit_waits_for_the_one_before_it(
    make_worker: MakeWorker, database_url: str, smtp_server: SmtpTestServer
) -> None:
    """The race the rate limit's lock closes, forced every time rather than hoped for: claim A
    has counted (nothing yet) and is held just before writing its row (the test's own
    transaction holds an uncommitted row with A's delivery id); claim B for the same
    recipient then runs. B must wait for A and count A's email; without the serialising lock
    it counts nothing too, both are sent, and the limit of 1 lets 2 through."""
    worker = limited(make_worker, **{"verification-code": RateLimit(1, 3600, "1/1h")})
    first = factories.payload(recipient="kim@example.com")
    second = factories.payload(recipient="Kim@Example.com")
    with psycopg.connect(database_url) as gate, psycopg.connect(database_url) as watch:
        watch.autocommit = True
        gate.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
            " VALUES (%s, 'verification-code', 'held@example.com', 'queued')",
            (first["delivery_id"],),
        )  # not committed: A's insert of this id waits for the gate's transaction
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(handle, factories.cloud_event(first), worker)
            wait_until(lambda: blocked_backends(watch) == 1)  # A counted, and waits
            b = pool.submit(handle, factories.cloud_event(second), worker)
            # B either finished (it did not wait for A) or waits too (behind A's lock).
            wait_until(lambda: b.done() or blocked_backends(watch) == 2)
            gate.rollback()  # A goes on: its row is new after all
            a.result(timeout=30)
            b.result(timeout=30)

    assert emails_to(smtp_server, "kim@example.com") == 1
    assert statuses(database_url, "kim@example.com") == Counter(
        {("sent", None): 1, ("skipped", "RATE_LIMITED"): 1}
    )
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status::text FROM email.deliveries WHERE delivery_id = %s",
            (first["delivery_id"],),
        ).fetchone()
    assert row == ("sent",)  # A, the one that counted first, is the one sent


def test_sending_resumes_once_the_window_has_passed(
    make_worker: MakeWorker, database_url: str, smtp_server: SmtpTestServer
) -> None:
    worker = limited(make_worker, **{"verification-code": RateLimit(2, 2, "2/2s")})
    for _ in range(3):
        handle(factories.cloud_event(factories.payload(recipient="bob@example.com")), worker)
    assert statuses(database_url, "bob@example.com") == Counter(
        {("sent", None): 2, ("skipped", "RATE_LIMITED"): 1}
    )

    def window_passed() -> bool:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT max(sent_at) < now() - interval '2 seconds' FROM email.deliveries"
                " WHERE status = 'sent'"
            ).fetchone()
        return bool(row and row[0])

    wait_until(window_passed, timeout=10)
    handle(factories.cloud_event(factories.payload(recipient="bob@example.com")), worker)
    assert emails_to(smtp_server, "bob@example.com") == 3


@contextlib.contextmanager
def cluster(env: dict[str, str], processes: int) -> Iterator[WorkerCluster]:
    workers = WorkerCluster(processes, env, threads=1)
    workers.start()
    try:
        yield workers
    except BaseException:
        print("---- worker logs (tail) ----\n" + workers.logs()[-6000:])
        raise
    finally:
        workers.stop()


def test_eight_worker_processes_deliver_exactly_n_codes_to_one_address(
    database_url: str, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> None:
    """Real functions-framework processes; every event pushed twice, to different ones."""
    n = 5
    env = worker_env(
        database_url=database_url,
        smtp_port=smtp_server.port,
        project=pubsub.project,
        delivery_topic=pubsub.delivery_topic,
        dead_letter_topic=pubsub.dead_letter_topic,
        emulator_host=pubsub.emulator.host,
        RATE_LIMITS=f"verification-code={n}/1h,password-reset=1/1d",
        LEASE_SECONDS="30",
    )
    spellings = ["zoe@example.com", "Zoe@example.com", "ZOE@example.com"]
    bodies = [factories.payload(recipient=spellings[i % 3]) for i in range(3 * n)]
    bodies.append(factories.payload(recipient="yan@example.com"))
    with cluster(env, processes=8) as workers:
        deliverer = Deliverer(
            workers.urls, project=pubsub.project, topic=pubsub.delivery_topic, max_backoff=0.5
        )
        report = deliverer.deliver_all(
            [push_message(body) for body in bodies], copies=2, concurrency=16
        )
    assert (report.acked, report.gave_up) == (2 * len(bodies), 0), report.summary()
    assert emails_to(smtp_server, "zoe@example.com") == n
    assert emails_to(smtp_server, "yan@example.com") == 1
    assert statuses(database_url, "zoe@example.com") == Counter(
        {("sent", None): n, ("skipped", "RATE_LIMITED"): 2 * n}
    )
