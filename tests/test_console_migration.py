"""Migration 009: suppressions get an id, and the support console pages them on
(created_at, id) through its unique index, so a page cursor names no address."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from tests.harness.console import seed
from tests.harness.postgres import Databases
from worker.store.db import query
from worker.store.migrations import discover, migrate_down, migrate_up

INDEX = "suppressions_created_at_id_idx"
ROWS = 50_000


def quiet(_line: str) -> None:
    pass


def shape(url: str) -> tuple[str | None, bool]:
    """(the id column's identity kind, whether the index exists)."""
    with psycopg.connect(url) as conn:
        column = conn.execute(
            "SELECT is_identity, identity_generation FROM information_schema.columns"
            " WHERE table_schema = 'email' AND table_name = 'suppressions'"
            " AND column_name = 'id'"
        ).fetchone()
        index = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'email' AND indexname = %s",
            (INDEX,),
        ).fetchone()
    assert index is not None
    kind = None if column is None else f"{column[0]}:{column[1]}"
    return kind, index[0] == 1


def test_migration_009_goes_up_down_and_up_again(empty_database_url: str) -> None:
    url = empty_database_url
    # Up to 009 only: the test is about this one, whatever later migrations add.
    through_009 = [m for m in discover() if m.version <= 9]
    migrate_up(url, [m for m in through_009 if m.version < 9], report=quiet)
    assert shape(url) == (None, False)
    with psycopg.connect(url, autocommit=True) as conn:
        # Entries from before the migration get an id too.
        conn.execute(
            "INSERT INTO email.suppressions (address, reason)"
            " VALUES ('before@example.com', 'manual')"
        )
    assert [m.version for m in migrate_up(url, through_009, report=quiet)] == [9]
    assert shape(url) == ("YES:ALWAYS", True)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT id FROM email.suppressions WHERE address = 'before@example.com'"
        ).fetchone()
        assert row is not None and row[0] >= 1
    assert [m.version for m in migrate_down(url, migrations=through_009, report=quiet)] == [9]
    assert shape(url) == (None, False)
    with psycopg.connect(url) as conn:
        # Additive: rolling back loses no entry.
        assert conn.execute("SELECT count(*) FROM email.suppressions").fetchone() == (1,)
    assert [m.version for m in migrate_up(url, through_009, report=quiet)] == [9]
    assert shape(url) == ("YES:ALWAYS", True)


@pytest.fixture
def urls(databases: Databases) -> Iterator[tuple[str, str]]:
    """A migrated database: its owner's URL, and a LOGIN role's granted email_worker only."""
    name = databases.create()
    admin_url = databases.url(name)
    role = f"worker_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE email_worker")
    try:
        yield admin_url, conninfo.make_conninfo(admin_url, user=role)
    finally:
        databases.drop(name)
        with psycopg.connect(databases.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_the_worker_still_suppresses_without_a_grant_on_the_ids(urls: tuple[str, str]) -> None:
    """The worker's grants are the table's: an identity column needs none of its own, both
    for a bounce's entry (the database's function) and an operator's `suppressions add`."""
    admin_url, worker_url = urls
    with psycopg.connect(admin_url, autocommit=True) as admin:
        seed(admin, delivery_id="d1", recipient="Bounced@Example.com")
    with psycopg.connect(worker_url, autocommit=True) as conn:
        applied = conn.execute(
            "SELECT email.apply_provider_event(provider => 'ses', provider_event_id => 'e1',"
            " event_type => 'bounced', occurred_at => now(), delivery_id => 'd1')"
        ).fetchone()
        assert applied == ("applied",)
        conn.execute(
            "INSERT INTO email.suppressions (address, reason)"
            " VALUES ('manual@example.com', 'manual')"
        )
        rows = conn.execute("SELECT address, id FROM email.suppressions ORDER BY id").fetchall()
    assert [address for address, _id in rows] == ["bounced@example.com", "manual@example.com"]
    assert rows[0][1] < rows[1][1]
    with psycopg.connect(worker_url) as conn, pytest.raises(psycopg.errors.GeneratedAlways):
        conn.execute(
            "INSERT INTO email.suppressions (id, address, reason) VALUES (1, 'x@example.com',"
            " 'manual')"
        )


# --- the plan -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def list_url(databases: Databases) -> Iterator[str]:
    """One migrated database holding a long suppression list, analyzed."""
    name = databases.create()
    url = databases.url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO email.suppressions (address, reason, created_at)"
            " SELECT 'user' || n || '@example.com', 'manual', now() - n * interval '1 minute'"
            " FROM generate_series(1, %s) AS n",
            (ROWS,),
        )
        conn.execute("ANALYZE email.suppressions")
    yield url
    databases.drop(name)


def plan(url: str, params: dict[str, Any]) -> str:
    """As the console runs it: parameters bound by the server, nothing prepared."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        rows = conn.execute(f"EXPLAIN {query('search_suppressions')}", params).fetchall()
    return "\n".join(line for (line,) in rows)


@pytest.mark.parametrize("paged", [False, True], ids=["first page", "later page"])
def test_the_suppression_list_reads_its_index(list_url: str, paged: bool) -> None:
    after_created_at, after_id = None, None
    if paged:
        with psycopg.connect(list_url) as conn:
            row = conn.execute(
                "SELECT created_at, id FROM email.suppressions WHERE address = %s",
                (f"user{ROWS // 2}@example.com",),
            ).fetchone()
        assert row is not None
        after_created_at, after_id = row
    explained = plan(
        list_url,
        {
            "address": None,
            "reason": None,
            "active": None,
            "after_created_at": after_created_at,
            "after_id": after_id,
            "limit": 51,
        },
    )
    assert f"Index Scan Backward using {INDEX}" in explained, explained
    assert "Sort" not in explained and "Seq Scan" not in explained, explained
    if paged:
        condition = "\n".join(line for line in explained.splitlines() if "Index Cond" in line)
        assert "ROW(created_at, id) <" in condition, explained
