"""`sql/schema.sql`: the schema as the migrations leave it, written and checked from one place.

`pg_dump --schema-only` of a freshly migrated database, with what varies between servers and
runs taken out (the dump header, session SETs, owners), the roles the grants name created first
(as migration 001 does) and the applied migrations recorded, so that loading the file into an
empty database gives the same catalog as `python -m worker migrate` and `migrate` then finds
nothing to do. tests/test_schema.py holds the file to the migrations.

Rewrite it after adding a migration:

    .venv/bin/python -m tests.harness.schema
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.harness.postgres import PG_BIN, TEMPLATE, Databases, PostgresServer

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "sql" / "schema.sql"

HEADER = """\
-- The email schema as the migrations in sql/migrations/ leave it: tables, types, functions,
-- triggers, indexes, row-level security policies and grants, in one file to read.
--
-- Written by `.venv/bin/python -m tests.harness.schema` from `pg_dump --schema-only` of a
-- freshly migrated database; tests/test_schema.py fails when it and the migrations disagree.
-- Do not edit it by hand: add a migration, then rewrite this file.
--
-- It also loads: `psql -v ON_ERROR_STOP=1 -f sql/schema.sql` into an empty database gives the
-- catalog the migrations give, with the migrations recorded as applied.

-- The roles the grants name (cluster-wide, so created only when missing, as migration 001 does).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'email_worker') THEN
        CREATE ROLE email_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'email_reader') THEN
        CREATE ROLE email_reader NOLOGIN;
    END IF;
END
$$;
"""

# What differs between two dumps of the same catalog: the dump's own header, its settings and
# the one-time key of psql's \restrict guard (pg_dump 15.14 and later).
_NOISE = re.compile(
    r"^(--\s*Dumped (from|by) .*|--\s*PostgreSQL database dump( complete)?|SET \w+ = .*;"
    r"|SELECT pg_catalog\.set_config\(.*\);|\\(un)?restrict \w+)$"
)


def dump(url: str) -> str:
    """The schema of one database, normalised: comparable across databases and runs."""
    completed = subprocess.run(
        [str(PG_BIN / "pg_dump"), "--schema-only", "--no-owner", "--schema=email", url],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = [line for line in completed.stdout.splitlines() if not _NOISE.match(line)]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)  # the blank lines the removed ones leave
    return text.strip() + "\n"


def applied_migrations(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT version, name FROM email.schema_migrations ORDER BY version"
        ).fetchall()
    return [(int(version), str(name)) for version, name in rows]


def render(url: str) -> str:
    """The text of sql/schema.sql for the migrated database at `url`."""
    versions = ",\n".join(f"    ({version}, '{name}')" for version, name in applied_migrations(url))
    return (
        HEADER
        + "\n"
        + dump(url)
        + "\n-- The migrations this file stands for, recorded as applied.\n"
        + "INSERT INTO email.schema_migrations (version, name) VALUES\n"
        + versions
        + ";\n"
    )


def load(url: str, path: Path = SCHEMA_FILE) -> None:
    """Load the file with psql, as a reader of its header would."""
    subprocess.run(
        [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )


def main() -> int:
    server = PostgresServer()
    server.init()
    server.start()
    try:
        databases = Databases(server.admin_url)
        databases.prepare_template()
        SCHEMA_FILE.write_text(render(databases.url(TEMPLATE)))
    finally:
        server.destroy()
    print(f"wrote {SCHEMA_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
