"""Schema migrations: `sql/migrations/NNN_name.up.sql` with a `.down.sql` beside each.

Each migration runs in its own transaction that first takes a transaction-level advisory
lock and re-reads what is applied, so two migrators started together apply each migration
once, and the lock is released with the transaction (which also works through a
transaction-mode pooler, where a session lock would leak to another client).

A file whose first line is `-- migrate: no-transaction` runs statement by statement outside
a transaction, for what PostgreSQL refuses inside one: `CREATE INDEX CONCURRENTLY`, which
builds an index on a live ledger without blocking the workers' writes. The migration lock
is held meanwhile by the runner's own transaction, and the statements run on a second
connection. Statements end with `;` at the end of a line and hold no `;` inside; an index
left invalid by an interrupted build stops the migration with a line saying how to drop it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from worker.store.db import SQL_DIR, query

MIGRATIONS_DIR = SQL_DIR / "migrations"
# Any constant will do; this one spells "emailmig" and stays clear of other apps' locks.
LOCK_KEY = 0x656D61696C6D6967
_FILE = re.compile(r"^(\d{3})_(\w+)\.up\.sql$")
NO_TRANSACTION = "-- migrate: no-transaction"
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)


class MigrationError(Exception):
    """A migration cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path

    @property
    def label(self) -> str:
        return f"{self.version:03d}_{self.name}"


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.up.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise ValueError(f"{path.name}: migration files are named NNN_name.up.sql")
        down = path.with_name(path.name.replace(".up.sql", ".down.sql"))
        if not down.exists():
            raise ValueError(f"{path.name} has no {down.name}: every migration needs a way back")
        found.append(Migration(int(match[1]), match[2], path, down))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migrations share a version number")
    return found


@contextmanager
def _locked(conn: psycopg.Connection) -> Iterator[set[int]]:
    """A transaction holding the migration lock; yields the applied versions.

    The lock is tried, not waited for: a transaction waiting on a lock holds a snapshot, and
    a concurrent index build of the lock holder waits for every such snapshot to end, which
    would be a deadlock. A failed try ends its transaction, so through a transaction-mode
    pooler the waiting migrator holds no server connection between tries either.
    """
    delay = 0.02
    while True:
        with conn.transaction():
            row = conn.execute(query("try_migration_lock"), {"key": LOCK_KEY}).fetchone()
            if row is not None and row[0]:
                conn.execute(query("create_migrations_table"))
                rows = conn.execute(query("applied_migrations")).fetchall()
                yield {version for (version,) in rows}
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _connect(url: str) -> psycopg.Connection:
    """Autocommit, and no server-side prepared statements: psycopg prepares a query it has
    run 5 times (the lock try above, once per migration and per wait), and a
    transaction-mode pooler hands the next transaction another server connection, where
    the name is unknown or already taken by another client's."""
    return psycopg.connect(url, autocommit=True, prepare_threshold=None)


def _sql(path: Path) -> str:
    return path.read_text()


def _outside_transaction(path: Path) -> bool:
    return _sql(path).startswith(NO_TRANSACTION)


def _statements(sql: str) -> list[str]:
    """Split a no-transaction migration into its statements (comment-only parts dropped)."""
    parts = (part.strip() for part in _STATEMENT_END.split(sql))
    meaningful = (
        part
        for part in parts
        if any(line.strip() and not line.strip().startswith("--") for line in part.splitlines())
    )
    return list(meaningful)


def _check_indexes(conn: psycopg.Connection) -> None:
    """Refuse an index an interrupted concurrent build left invalid (IF NOT EXISTS keeps it)."""
    invalid = [name for (name,) in conn.execute(query("invalid_indexes")).fetchall()]
    if invalid:
        raise MigrationError(
            f"index {invalid[0]} is invalid (an interrupted CREATE INDEX CONCURRENTLY): "
            f"run DROP INDEX CONCURRENTLY {invalid[0]}; then migrate again"
        )


def _run(url: str, conn: psycopg.Connection, migration: Migration, path: Path, up: bool) -> bool:
    """Run one direction of a migration and record it; False if it was done already."""
    with _locked(conn) as applied:
        if (migration.version in applied) is up:
            return False
        if _outside_transaction(path):
            # The lock stays held by this transaction while another connection runs the
            # statements, each in its own transaction, as CONCURRENTLY requires.
            with _connect(url) as worker:
                for statement in _statements(_sql(path)):
                    worker.execute(statement)
                _check_indexes(worker)
        else:
            conn.execute(_sql(path))
        record = {"version": migration.version, "name": migration.name}
        conn.execute(query("record_migration" if up else "forget_migration"), record)
    return True


def applied_versions(url: str) -> set[int]:
    with _connect(url) as conn, _locked(conn) as applied:
        return applied


def migrate_up(
    url: str,
    migrations: list[Migration] | None = None,
    report: Callable[[str], None] = print,
) -> list[Migration]:
    """Apply every pending migration in order; returns what this call applied."""
    migrations = discover() if migrations is None else migrations
    done: list[Migration] = []
    with _connect(url) as conn:
        for migration in migrations:
            if not _run(url, conn, migration, migration.up, up=True):
                continue
            report(f"applied {migration.label}")
            done.append(migration)
    if not done:
        latest = max((m.version for m in migrations), default=0)
        report(f"nothing to apply: the database is at version {latest:03d}")
    return done


def migrate_down(
    url: str,
    steps: int = 1,
    migrations: list[Migration] | None = None,
    report: Callable[[str], None] = print,
) -> list[Migration]:
    """Roll back the newest `steps` applied migrations, newest first."""
    by_version = {m.version: m for m in (discover() if migrations is None else migrations)}
    undone: list[Migration] = []
    with _connect(url) as conn:
        for _ in range(steps):
            with _locked(conn) as applied:
                pass
            if not applied:
                break
            migration = by_version[max(applied)]
            if not _run(url, conn, migration, migration.down, up=False):
                continue  # another migrator rolled it back meanwhile
            report(f"rolled back {migration.label}")
            undone.append(migration)
    if not undone:
        report("nothing to roll back")
    return undone
