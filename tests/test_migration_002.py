"""Migrations 002 and 003 (provider events, suppressions, `skipped`; the matching indexes,
built concurrently): their way back, the previous release's worker running against the
schema while it is migrated and after, and the runner's no-transaction mode."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests.harness.smtp import SmtpTestServer
from worker.store.migrations import (
    MigrationError,
    _statements,
    discover,
    migrate_down,
    migrate_up,
)
from worker.store.tracking import Applied, EventType, ProviderEvent, Tracking

ROOT = Path(__file__).resolve().parent.parent
NEW_COLUMNS = {
    "provider_status",
    "delivered_at",
    "opened_at",
    "clicked_at",
    "bounced_at",
    "complained_at",
    "bounce_type",
    "relay_message_id",
}


def quiet(_line: str) -> None:
    pass


def up_to(url: str, version: int) -> None:
    migrate_up(url, [m for m in discover() if m.version <= version], report=quiet)


def columns(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'email' AND table_name = 'deliveries'"
        ).fetchall()
    return {name for (name,) in rows}


def bounce(delivery_id: str, event_id: str = "e1") -> ProviderEvent:
    return ProviderEvent(
        provider="postmark",
        provider_event_id=event_id,
        event_type=EventType.BOUNCED,
        occurred_at=datetime(2026, 11, 23, tzinfo=UTC),
        recipient=None,
        delivery_id=None,
        message_id=f"<{delivery_id}@example.com>",
        relay_message_id=None,
        bounce_type="hard",
    )


def test_down_and_up_again_keep_the_ledger(empty_database_url: str) -> None:
    url = empty_database_url
    up_to(url, 1)
    before = columns(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
            " provider_message_id) VALUES ('kept', 'invite', 'a@example.com',"
            " 'failed', '<kept@example.com>')"
        )
    up_to(url, 3)
    assert columns(url) == before | NEW_COLUMNS
    with (
        psycopg.connect(url, autocommit=True) as conn,
        ConnectionPool(url, kwargs={"autocommit": True}) as pool,
    ):
        assert Tracking(pool).apply(bounce("kept")) is Applied.APPLIED
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
            " VALUES ('skip', 'invite', 'b@example.com', 'queued')"
        )
        conn.execute("UPDATE email.deliveries SET status = 'skipped' WHERE delivery_id = 'skip'")

    assert [m.label for m in migrate_down(url, steps=2, report=quiet)] == [
        "003_provider_indexes",
        "002_provider_events",
    ]
    assert columns(url) == before
    with psycopg.connect(url, autocommit=True) as conn:
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'email'"
            )
        }
        assert tables == {"deliveries", "delivery_events", "schema_migrations"}
        assert conn.execute("SELECT count(*) FROM email.deliveries").fetchone() == (2,)
        # 001's state machine is back: nothing moves into `skipped`, a skipped row is final.
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
            " VALUES ('q', 'invite', 'c@example.com', 'queued')"
        )
        for delivery_id, target in (("q", "skipped"), ("skip", "queued")):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(
                    "UPDATE email.deliveries SET status = %s WHERE delivery_id = %s",
                    (target, delivery_id),
                )

    up_to(url, 3)
    assert columns(url) == before | NEW_COLUMNS
    with ConnectionPool(url, kwargs={"autocommit": True}) as pool:
        assert Tracking(pool).apply(bounce("kept")) is Applied.APPLIED


# --- the previous release against the migrated schema -------------------------------------

# Runs inside the previous release's tree: one command per stdin line, one answer line each
# (marked `@@`: the worker logs to stdout too).
OLD_WORKER = r"""
import sys
import worker
from tests import factories
from worker import pipeline
from worker.ledger import Failure

print("@@", "from", worker.__file__, flush=True)
w = pipeline.instance()
claims = {}
for line in sys.stdin:
    command, delivery_id = line.split()
    if command == "deliver":
        body = factories.payload("invite", delivery_id=delivery_id)
        pipeline.handle(factories.cloud_event(body), w)
    elif command == "claim":
        claims[delivery_id] = w.ledger.claim(
            delivery_id=delivery_id, workflow="invite", recipient="ada@example.com",
            locale="en", metadata=None, source_message_id=None, lease_seconds=60)
    elif command == "sent":
        w.ledger.set_sent_if_claimed(
            claims.pop(delivery_id), attempts=1, provider_message_id=f"<{delivery_id}@x>")
    elif command == "reject":
        w.ledger.set_failed_if_new_or_queued(
            delivery_id=delivery_id, workflow="invite", recipient="ada@example.com",
            source_message_id=None, failure=Failure("SMTP_550", "no", "permanent_failure"))
    elif command == "replay":
        w.ledger.set_queued_if_finished(delivery_id)
    row = w.ledger.get(delivery_id)
    print("@@", delivery_id, row.status if row else None, flush=True)
"""


def previous_release_commit(migration: str = "002") -> str:
    """The commit before `migration` was added (HEAD while it is not committed yet)."""
    added = subprocess.run(
        [
            "git",
            "log",
            "--diff-filter=A",
            "--format=%H",
            "--",
            f"sql/migrations/{migration}_*.up.sql",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = release_tree(tmp_path_factory.mktemp("previous-release"), previous_release_commit())
    assert not list((tree / "sql" / "migrations").glob("002_*"))
    return tree


def release_tree(tree: Path, commit: str) -> Path:
    """The release's worker, tests and sql, as of `commit`, unpacked in `tree`."""
    archive = subprocess.run(
        ["git", "archive", commit, "worker", "tests", "sql"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


class OldWorker:
    """A previous release's worker in its own process, driven one command per line by
    `script` (OLD_WORKER for the release before migration 002)."""

    def __init__(
        self, tree: Path, url: str, smtp: SmtpTestServer, script: str = OLD_WORKER
    ) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(
            DATABASE_URL=url,
            SMTP_HOST=smtp.host,
            SMTP_PORT=str(smtp.port),
            SMTP_SECURITY="none",
            EMAIL_FROM="noreply@example.com",
            GOOGLE_CLOUD_PROJECT="test-project",
            DEAD_LETTER_TOPIC="dead-letters",
            PUBSUB_EMULATOR_HOST="127.0.0.1:9",  # never used: nothing is dead-lettered
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.origin = self._answer()

    def _answer(self) -> list[str]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return line.split()[1:]
        return []

    def __call__(self, command: str, delivery_id: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command} {delivery_id}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        assert answer and answer[0] == delivery_id, f"old worker died: {answer}"
        return answer[1]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture
def old_worker(
    previous_release: Path, empty_database_url: str, smtp_server: SmtpTestServer
) -> Iterator[OldWorker]:
    up_to(empty_database_url, 1)
    old = OldWorker(previous_release, empty_database_url, smtp_server)
    assert old.origin[1].startswith(str(previous_release)), old.origin
    yield old
    old.close()


def test_the_previous_release_works_during_and_after_the_migration(
    old_worker: OldWorker, empty_database_url: str, smtp_server: SmtpTestServer
) -> None:
    url = empty_database_url
    assert old_worker("deliver", "before") == "sent"
    assert old_worker("claim", "across") == "in_progress"  # held across the migration

    # Deliveries keep flowing while the migration runs.
    during: list[str] = []
    flowing, stop = threading.Event(), threading.Event()

    def deliver_until_stopped() -> None:
        while not stop.is_set() or len(during) < 3:
            during.append(old_worker("deliver", f"during-{len(during)}"))
            flowing.set()

    loop = threading.Thread(target=deliver_until_stopped)
    loop.start()
    assert flowing.wait(30)
    migrate_up(url, report=quiet)
    stop.set()
    loop.join(60)
    assert during and set(during) == {"sent"}, during
    assert columns(url) >= NEW_COLUMNS

    # After: the held claim is recorded, new deliveries go out, a replay works.
    assert old_worker("sent", "across") == "sent"
    assert old_worker("deliver", "after") == "sent"
    assert old_worker("reject", "replayed") == "failed"
    assert old_worker("replay", "replayed") == "queued"
    assert old_worker("deliver", "replayed") == "sent"
    assert len(smtp_server.messages) == len(during) + 3
    # And what the old worker sent is tracked by the new code.
    with ConnectionPool(url, kwargs={"autocommit": True}) as pool:
        with pool.connection() as conn:
            (message_id,) = conn.execute(
                "SELECT provider_message_id FROM email.deliveries WHERE delivery_id = 'after'"
            ).fetchone() or ("",)
        event = ProviderEvent(
            provider="ses",
            provider_event_id="after-1",
            event_type=EventType.DELIVERED,
            occurred_at=datetime.now(UTC),
            recipient="ada@example.com",
            delivery_id=None,
            message_id=message_id,
            relay_message_id=None,
        )
        assert Tracking(pool).apply(event) is Applied.APPLIED


# --- no-transaction migrations (003) ------------------------------------------------------------


def test_a_no_transaction_file_splits_into_its_statements() -> None:
    [indexes] = [m for m in discover() if m.version == 3]
    statements = _statements(indexes.up.read_text())
    # Comments stay with the statement they precede; each part is one statement.
    firsts = [
        next(line for line in s.splitlines() if not line.startswith("--")) for s in statements
    ]
    assert firsts == [
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_provider_message_id_idx",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_relay_message_id_idx",
        "ALTER TABLE email.deliveries VALIDATE CONSTRAINT deliveries_bounce_type_check",
        "ALTER TABLE email.deliveries VALIDATE CONSTRAINT deliveries_relay_message_id_check",
    ]
    assert _statements("-- only a comment\n") == []
    assert _statements("SELECT 1;\n-- trailing\n") == ["SELECT 1"]


def test_the_matching_indexes_are_built_concurrently_and_valid(empty_database_url: str) -> None:
    up_to(empty_database_url, 2)
    # Inside a transaction PostgreSQL refuses CONCURRENTLY: applying 003 proves it ran outside.
    applied = migrate_up(empty_database_url, report=quiet)
    assert applied[0].label == "003_provider_indexes"
    with psycopg.connect(empty_database_url) as conn:
        rows = conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c"
            " ON c.oid = i.indexrelid WHERE c.relname LIKE 'deliveries_%%message_id_idx'"
            " ORDER BY 1"
        ).fetchall()
    assert rows == [
        ("deliveries_provider_message_id_idx", True),
        ("deliveries_relay_message_id_idx", True),
    ]
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        checks = conn.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE conname IN"
            " ('deliveries_bounce_type_check', 'deliveries_relay_message_id_check') ORDER BY 1"
        ).fetchall()
        assert checks == [
            ("deliveries_bounce_type_check", True),
            ("deliveries_relay_message_id_check", True),
        ]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
                " relay_message_id) VALUES ('long', 'invite', 'a@x', 'failed', repeat('x', 501))"
            )


def test_an_interrupted_concurrent_build_stops_the_migration_with_what_to_do(
    empty_database_url: str,
) -> None:
    up_to(empty_database_url, 2)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        # A concurrent build that fails (duplicates under a unique index) leaves an invalid
        # index behind, as an interrupted one does; IF NOT EXISTS would keep it.
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
            " provider_message_id) VALUES ('a', 'invite', 'a@x', 'failed', '<same@x>'),"
            " ('b', 'invite', 'b@x', 'failed', '<same@x>')"
        )
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY deliveries_provider_message_id_idx"
                " ON email.deliveries (provider_message_id)"
            )
    with pytest.raises(MigrationError) as stopped:
        migrate_up(empty_database_url, report=quiet)
    assert str(stopped.value) == (
        "index email.deliveries_provider_message_id_idx is invalid (an interrupted CREATE INDEX"
        " CONCURRENTLY): run DROP INDEX CONCURRENTLY email.deliveries_provider_message_id_idx;"
        " then migrate again"
    )
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("DROP INDEX CONCURRENTLY email.deliveries_provider_message_id_idx")
    assert migrate_up(empty_database_url, report=quiet)[0].version == 3
