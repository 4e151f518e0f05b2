"""The connection pool and the named queries of `sql/queries.sql`.

The pool is opened on first use and kept for the life of the instance. Connections are in
autocommit, so every ledger statement is its own transaction and one round trip, and
`prepare_threshold=None` keeps psycopg from relying on server-side prepared statements, which
a transaction-mode pooler (PgBouncer, Supabase's Supavisor) does not carry between
transactions.
"""

from __future__ import annotations

import re
import threading
from functools import cache
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from worker.settings import DatabaseSettings

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@cache
def queries(path: Path = SQL_DIR / "queries.sql") -> dict[str, str]:
    """`-- name: X` blocks of a .sql file, by name (comments kept: they help pg_stat_statements
    readers)."""
    text = path.read_text()
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    named = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not named:
        raise ValueError(f"{path}: no `-- name:` blocks")
    return named


def query(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries.sql") from None


def connection_kwargs(settings: DatabaseSettings) -> dict[str, Any]:
    return {
        "autocommit": True,
        "prepare_threshold": None,
        "connect_timeout": max(1, round(settings.connect_timeout_seconds)),
        "application_name": "email-worker",
    }


def open_pool(settings: DatabaseSettings) -> ConnectionPool:
    pool = ConnectionPool(
        settings.url,
        min_size=1,
        max_size=settings.pool_max_size,
        kwargs=connection_kwargs(settings),
        timeout=settings.connect_timeout_seconds,
        # Idle connections outlive a Cloud SQL / pooler idle timeout badly; recycle them.
        max_idle=300,
        open=False,
        name="email-ledger",
    )
    # Don't wait for min_size here: an unreachable database must surface as a failed
    # statement (the handler raises, Pub/Sub redelivers), not a hang at first use.
    pool.open(wait=False)
    return pool


_pool: ConnectionPool | None = None
_pool_lock = threading.Lock()


def shared_pool(settings: DatabaseSettings) -> ConnectionPool:
    """The instance's one pool, made on first use."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = open_pool(settings)
    return _pool


def close_shared_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None
