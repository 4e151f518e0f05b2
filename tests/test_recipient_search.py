"""Migration 007: the support console's searches and `history` read the ledger through an
index, by recipient (compared case-insensitively, docs/operating.md) and newest first."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.harness.postgres import Databases
from worker.store.db import queries, query
from worker.store.migrations import discover, migrate_down, migrate_up

BY_RECIPIENT = "deliveries_lower_recipient_created_at_idx"
NEWEST = "deliveries_created_at_idx"
ROWS = 100_000


def indexes(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'email' AND indexname = ANY(%s)",
            ([BY_RECIPIENT, NEWEST],),
        ).fetchall()
    return {name for (name,) in rows}


def quiet(_line: str) -> None:
    pass


def test_migration_007_goes_up_down_and_up_again(empty_database_url: str) -> None:
    url = empty_database_url
    # Up to 007 only: the test is about this one, whatever later migrations add.
    through_007 = [m for m in discover() if m.version <= 7]
    migrate_up(url, [m for m in through_007 if m.version <= 6], report=quiet)
    assert indexes(url) == set()
    assert [m.version for m in migrate_up(url, through_007, report=quiet)] == [7]
    assert indexes(url) == {BY_RECIPIENT, NEWEST}
    assert [m.version for m in migrate_down(url, migrations=through_007, report=quiet)] == [7]
    assert indexes(url) == set()
    assert [m.version for m in migrate_up(url, through_007, report=quiet)] == [7]
    assert indexes(url) == {BY_RECIPIENT, NEWEST}


# --- the plans ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger_url(databases: Databases) -> Iterator[str]:
    """One migrated database holding a large ledger, analyzed, shared by the plan tests."""
    name = databases.create()
    url = databases.url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # bulk rows: no guard, no audit
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, created_at)"
            " SELECT 'bulk-' || n, 'invite',"
            " (CASE WHEN n %% 2 = 0 THEN 'user' ELSE 'User' END) || (n %% 5000) || '@example.com',"
            " 'queued', now() - n * interval '1 minute' FROM generate_series(1, %s) AS n",
            (ROWS,),
        )
        conn.execute("RESET session_replication_role")
        conn.execute("ANALYZE email.deliveries")
    yield url
    databases.drop(name)


def plan(url: str, sql: str, params: dict[str, Any]) -> str:
    """The plan of a query run as the console and the CLI run it: parameters bound by the
    server, nothing prepared (worker/store/db.py), so planned with its values."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        rows = conn.execute(f"EXPLAIN {sql}", params).fetchall()
    return "\n".join(line for (line,) in rows)


def search(recipient: str | None, after: tuple[datetime, str] | None = None) -> dict[str, Any]:
    after_created_at, after_id = after or (None, None)
    return {
        "recipient": recipient,
        "workflow": None,
        "status": None,
        "since": None,
        "after_created_at": after_created_at,
        "after_id": after_id,
        "limit": 51,
    }


def a_cursor(url: str) -> tuple[datetime, str]:
    """A cursor halfway down the ledger, where a page would start after many others."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT created_at, delivery_id FROM email.deliveries WHERE delivery_id = %s",
            (f"bulk-{ROWS // 2}",),
        ).fetchone()
    assert row is not None
    return row["created_at"], row["delivery_id"]


@pytest.mark.parametrize("paged", [False, True], ids=["first page", "later page"])
def test_a_recipient_search_reads_its_index(ledger_url: str, paged: bool) -> None:
    """A recipient's few rows come from the index (then sorted, or read in order), and a
    later page's cursor bounds the index scan instead of filtering what it read."""
    after = a_cursor(ledger_url) if paged else None
    explained = plan(ledger_url, query("search_deliveries"), search("USER7@example.com", after))
    assert BY_RECIPIENT in explained and "Seq Scan" not in explained, explained
    condition = "\n".join(line for line in explained.splitlines() if "Index Cond" in line)
    assert "lower(recipient) = 'user7@example.com'" in condition, explained
    if paged:
        assert "ROW(created_at, delivery_id) <" in condition, explained


@pytest.mark.parametrize("paged", [False, True], ids=["first page", "later page"])
def test_the_newest_deliveries_are_read_in_index_order(ledger_url: str, paged: bool) -> None:
    """With no filter, the index gives the page's order: no scan of the ledger, no sort,
    and a later page starts where its cursor points."""
    after = a_cursor(ledger_url) if paged else None
    explained = plan(ledger_url, query("search_deliveries"), search(None, after))
    assert f"Index Scan Backward using {NEWEST}" in explained, explained
    assert "Seq Scan" not in explained and "Sort" not in explained, explained
    if paged:
        assert "Index Cond: (ROW(created_at, delivery_id) <" in explained, explained
        assert "Filter" not in explained, explained


def test_history_reads_the_recipient_index(ledger_url: str) -> None:
    explained = plan(
        ledger_url,
        queries()["deliveries_for_recipient"],
        {"recipient": "USER7@example.com", "limit": 50},
    )
    assert BY_RECIPIENT in explained and "Seq Scan" not in explained, explained
