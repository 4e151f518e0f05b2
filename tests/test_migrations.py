"""Migrations against a real PostgreSQL: up, down, up; idempotent; safe to run concurrently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from worker.store.migrations import discover, migrate_down, migrate_up

ROOT = Path(__file__).resolve().parent.parent


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'email'"
        ).fetchall()
    return {name for (name,) in rows}


def test_every_migration_has_a_way_back() -> None:
    migrations = discover()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert all(m.down.exists() for m in migrations)


def test_up_down_up(empty_database_url: str) -> None:
    lines: list[str] = []
    applied = migrate_up(empty_database_url, report=lines.append)
    assert [m.label for m in applied] == [m.label for m in discover()]
    assert {"deliveries", "delivery_events", "schema_migrations"} <= tables(empty_database_url)

    undone = migrate_down(empty_database_url, steps=len(applied), report=lines.append)
    assert [m.label for m in undone] == [m.label for m in reversed(applied)]
    assert tables(empty_database_url) == {"schema_migrations"}

    migrate_up(empty_database_url, report=lines.append)
    assert {"deliveries", "delivery_events"} <= tables(empty_database_url)
    assert lines[0] == "applied 001_ledger"


def test_second_run_is_a_no_op_that_says_so(empty_database_url: str) -> None:
    migrate_up(empty_database_url, report=lambda _: None)
    lines: list[str] = []
    assert migrate_up(empty_database_url, report=lines.append) == []
    assert lines == [f"nothing to apply: the database is at version {discover()[-1].version:03d}"]


def test_rollback_with_nothing_applied_says_so(empty_database_url: str) -> None:
    lines: list[str] = []
    assert migrate_down(empty_database_url, report=lines.append) == []
    assert lines == ["nothing to roll back"]


def run_cli(*args: str, url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_migrators_at_once_apply_each_migration_once(empty_database_url: str) -> None:
    procs = [run_cli("migrate", url=empty_database_url) for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    stdout = "".join(out for out, _ in outputs)
    # Each migration takes the lock on its own, so the two may share the work (one applies
    # 001..003 while the other waits, then takes 004): each is applied by exactly one of them.
    for migration in discover():
        assert stdout.count(f"applied {migration.label}\n") == 1, stdout
    with psycopg.connect(empty_database_url) as conn:
        versions = conn.execute("SELECT version FROM email.schema_migrations").fetchall()
    assert versions == [(m.version,) for m in discover()]


def test_cli_rolls_back_the_newest_migration(empty_database_url: str) -> None:
    migrate_up(empty_database_url, report=lambda _: None)
    proc = run_cli("migrate", "--down", url=empty_database_url)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"rolled back {discover()[-1].label}"


def test_cli_without_database_url_is_one_clear_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_URL")}
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == "error: DATABASE_URL or DATABASE_URL_SECRET is required but not set\n"


def test_applies_beside_other_schemas_and_extensions(empty_database_url: str) -> None:
    """A Supabase-like database: other schemas, extensions, and look-alike names in public."""
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pgcrypto")
        conn.execute("CREATE EXTENSION pg_trgm")
        conn.execute("CREATE SCHEMA auth")
        conn.execute("CREATE TABLE auth.users (id uuid PRIMARY KEY)")
        conn.execute("CREATE TYPE public.delivery_status AS ENUM ('x')")
        conn.execute("CREATE TABLE public.deliveries (delivery_id int)")
        conn.execute(
            "CREATE FUNCTION public.now_utc() RETURNS timestamptz LANGUAGE sql AS 'SELECT now()'"
        )
        (dbname,) = conn.execute("SELECT current_database()").fetchone() or ("",)
        conn.execute(f'ALTER DATABASE "{dbname}" SET search_path = public, auth')
    migrate_up(empty_database_url, report=lambda _: None)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
            " VALUES ('d1', 'invite', 'a@example.com', 'queued')"
        )
        (count,) = conn.execute("SELECT count(*) FROM email.delivery_events").fetchone() or (0,)
        assert count == 1
        assert conn.execute("SELECT count(*) FROM public.deliveries").fetchone() == (0,)
    migrate_down(empty_database_url, report=lambda _: None)
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM auth.users").fetchone() == (0,)
