"""The worker behind PgBouncer in transaction mode (Supabase's pooler, most managed PgBouncers).

Every statement the worker makes must be correct when consecutive transactions of one client
run on different server connections: no server-side prepared statements, no session advisory
locks, no session settings. Two server connections serve every client here.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests import factories
from tests.harness.pgbouncer import SERVER_CONNECTIONS, PgBouncer
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import MakeWorker
from worker.core.settings import DatabaseSettings
from worker.delivery.pipeline import handle
from worker.store.db import connection_kwargs
from worker.store.ledger import Ledger, Status
from worker.store.migrations import Migration, discover, migrate_up


@pytest.fixture
def pooled_ledger(pooled_database_url: str) -> Iterator[Ledger]:
    settings = DatabaseSettings(url=pooled_database_url, pool_max_size=8)
    with ConnectionPool(
        pooled_database_url,
        min_size=1,
        max_size=8,
        kwargs=connection_kwargs(settings),
        timeout=10,
    ) as pool:
        yield Ledger(pool)


def test_the_pooler_really_is_in_transaction_mode(pgbouncer: PgBouncer) -> None:
    with psycopg.connect(pgbouncer.url("pgbouncer"), autocommit=True) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
    assert config["pool_mode"] == "transaction"
    assert int(config["default_pool_size"]) == SERVER_CONNECTIONS


def test_two_migrators_through_the_pooler_apply_each_migration_once(
    pooled_empty_database_url: str,
) -> None:
    def migrate(_: int) -> list[Migration]:
        return migrate_up(pooled_empty_database_url, report=lambda _line: None)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(migrate, [1, 2]))
    applied = sorted(m.version for run in runs for m in run)
    assert applied == sorted(m.version for m in discover())
    assert migrate(3) == []


def test_deliveries_through_the_pooler_send_one_email_each(
    make_worker: MakeWorker, pooled_ledger: Ledger, smtp_server: SmtpTestServer
) -> None:
    """8 threads share 2 server connections; every event is pushed twice."""
    bodies = [factories.payload(delivery_id=f"pooled-{n}") for n in range(40)]
    workers = [make_worker(ledger=pooled_ledger) for _ in range(8)]

    def deliver(index: int) -> None:
        body = bodies[index % len(bodies)]
        handle(factories.cloud_event(body), workers[index % len(workers)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(deliver, range(len(bodies))))
        list(pool.map(deliver, range(len(bodies))))  # Pub/Sub's redelivery: acked, unsent

    assert len(smtp_server.messages) == len(bodies)
    for body in bodies:
        row = pooled_ledger.get(body["delivery_id"])
        assert row is not None and row.status is Status.SENT
        assert [e.status for e in pooled_ledger.events(body["delivery_id"])] == [
            Status.IN_PROGRESS,
            Status.SENT,
        ]
