"""The one way to the database: the pool, and every named query of `sql/*.sql`.

Every statement the worker runs is a `-- name: X` block of a file in `sql/` (one file per
concept: `queries.sql` the ledger and the operators' reports, `tracking.sql` provider events,
`suppressions.sql`, `console.sql`, `schema_migrations.sql`), loaded once into one mapping in
which a name means one statement. `Store` is what every module that reads or writes the
database is built on (the ledger, tracking, suppressions, reports, the console's reads): named
queries in, dict rows out, over the pool it is handed.

The pool is opened on first use and kept for the life of the instance. Connections are in
autocommit, so every ledger statement is its own transaction and one round trip, and
`prepare_threshold=None` keeps psycopg from relying on server-side prepared statements, which
a transaction-mode pooler (PgBouncer, Supabase's Supavisor) does not carry between
transactions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from worker.core.settings import DatabaseSettings

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
# sql/schema.sql is the schema to read, not statements to run.
_NOT_QUERIES = frozenset({"schema.sql"})
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
# The errors that mean "the database cannot be reached now", not "the statement is wrong".
UNREACHABLE = (psycopg.OperationalError, PoolTimeout)


def named_blocks(path: Path) -> dict[str, str]:
    """The `-- name: X` blocks of one .sql file, by name (comments kept: they help
    pg_stat_statements readers)."""
    parts = _NAME.split(path.read_text())
    # parts = [preamble, name1, body1, name2, body2, ...]
    named = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not named:
        raise ValueError(f"{path}: no `-- name:` blocks")
    return named


@cache
def queries(sql_dir: Path = SQL_DIR) -> Mapping[str, str]:
    """Every named query of `sql_dir/*.sql`, by name; a name used twice is an error."""
    found: dict[str, str] = {}
    where: dict[str, str] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        if path.name in _NOT_QUERIES:
            continue
        for name, body in named_blocks(path).items():
            if name in found:
                raise ValueError(f"query {name!r} is named in both {where[name]} and {path.name}")
            found[name] = body
            where[name] = path.name
    return MappingProxyType(found)


def query(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/*.sql") from None


class Store:
    """Named queries over one pool: what every store of the worker is built on."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def _one(self, name: str, **params: Any) -> dict[str, Any] | None:
        """The first row of query `name`, or None."""
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query(name), params)
            return cur.fetchone()

    def _all(self, name: str, **params: Any) -> list[dict[str, Any]]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query(name), params)
            return cur.fetchall()

    def _row(self, name: str, **params: Any) -> dict[str, Any]:
        """The one row an aggregate query or a function call always returns."""
        [row] = self._all(name, **params)
        return row


def connection_kwargs(settings: DatabaseSettings, name: str = "email-worker") -> dict[str, Any]:
    """psycopg connection arguments; `name` is the `application_name` pg_stat_activity shows."""
    return {
        "autocommit": True,
        "prepare_threshold": None,
        "connect_timeout": max(1, round(settings.connect_timeout_seconds)),
        "application_name": name,
    }


def open_pool(settings: DatabaseSettings, name: str = "email-worker") -> ConnectionPool:
    """The instance's pool (its owner keeps it for the instance's life), opening in the
    background: an unreachable database surfaces as a failed statement (the handler raises,
    Pub/Sub or the provider retries), not as a hang at start."""
    pool = ConnectionPool(
        settings.url,
        min_size=1,
        max_size=settings.pool_max_size,
        kwargs=connection_kwargs(settings, name),
        timeout=settings.connect_timeout_seconds,
        # Idle connections outlive a Cloud SQL / pooler idle timeout badly; recycle them.
        max_idle=300,
        open=False,
        name=name,
    )
    pool.open(wait=False)
    return pool
