"""Schema migrations: `sql/migrations/NNN_name.up.sql` with a `.down.sql` beside each.

Each migration runs in its own transaction that first takes a transaction-level advisory
lock and re-reads what is applied, so two migrators started together apply each migration
once, and the lock is released with the transaction (which also works through a
transaction-mode pooler, where a session lock would leak to another client).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from worker.db import SQL_DIR

MIGRATIONS_DIR = SQL_DIR / "migrations"
# Any constant will do; this one spells "emailmig" and stays clear of other apps' locks.
LOCK_KEY = 0x656D61696C6D6967
_FILE = re.compile(r"^(\d{3})_(\w+)\.up\.sql$")

BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS email;
CREATE TABLE IF NOT EXISTS email.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON email.schema_migrations FROM PUBLIC;
"""


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


def _locked_applied(conn: psycopg.Connection) -> set[int]:
    """Inside a transaction: take the migration lock, then read what is applied."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
    conn.execute(BOOTSTRAP)
    rows = conn.execute("SELECT version FROM email.schema_migrations").fetchall()
    return {version for (version,) in rows}


def _sql(path: Path) -> str:
    return path.read_text()


def applied_versions(url: str) -> set[int]:
    with psycopg.connect(url) as conn, conn.transaction():
        return _locked_applied(conn)


def migrate_up(
    url: str,
    migrations: list[Migration] | None = None,
    report: Callable[[str], None] = print,
) -> list[Migration]:
    """Apply every pending migration in order; returns what this call applied."""
    migrations = discover() if migrations is None else migrations
    done: list[Migration] = []
    with psycopg.connect(url, autocommit=True) as conn:
        for migration in migrations:
            with conn.transaction():
                if migration.version in _locked_applied(conn):
                    continue
                conn.execute(_sql(migration.up))
                conn.execute(
                    "INSERT INTO email.schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
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
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(steps):
            with conn.transaction():
                applied = _locked_applied(conn)
                if not applied:
                    break
                migration = by_version[max(applied)]
                conn.execute(_sql(migration.down))
                conn.execute(
                    "DELETE FROM email.schema_migrations WHERE version = %s", (migration.version,)
                )
            report(f"rolled back {migration.label}")
            undone.append(migration)
    if not undone:
        report("nothing to roll back")
    return undone
