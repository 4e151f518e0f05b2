"""sql/schema.sql is the schema the migrations build: loaded into an empty database with psql,
it gives the same catalog (tables, types, functions, triggers, indexes, policies, grants) and
the same recorded migrations, so `migrate` then has nothing to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import schema
from tests.harness.postgres import TEMPLATE, Databases
from worker.store.migrations import migrate_up


def test_schema_file_is_the_migrated_schema(databases: Databases) -> None:
    # The template database is built by the migrations (python -m worker migrate).
    expected = schema.render(databases.url(TEMPLATE))
    assert schema.SCHEMA_FILE.read_text() == expected, (
        "sql/schema.sql is out of date: rewrite it with `.venv/bin/python -m tests.harness.schema`"
    )


def test_schema_file_loads_into_the_same_catalog(
    databases: Databases, empty_database_url: str
) -> None:
    schema.load(empty_database_url)
    assert schema.dump(empty_database_url) == schema.dump(databases.url(TEMPLATE))
    assert schema.applied_migrations(empty_database_url) == schema.applied_migrations(
        databases.url(TEMPLATE)
    )
    assert migrate_up(empty_database_url, report=lambda _line: None) == []


def test_a_catalog_difference_is_seen(
    databases: Databases, empty_database_url: str, tmp_path: Path
) -> None:
    # The comparison itself can fail: a schema file missing one index loads into another catalog.
    text = schema.SCHEMA_FILE.read_text()
    index_line = next(line for line in text.splitlines() if line.startswith("CREATE INDEX"))
    edited = tmp_path / "schema.sql"
    edited.write_text(text.replace(index_line, ""))
    schema.load(empty_database_url, edited)
    assert schema.dump(empty_database_url) != schema.dump(databases.url(TEMPLATE))


@pytest.mark.parametrize(
    "statement", ["GRANT", "CREATE POLICY", "CREATE TRIGGER", "CREATE FUNCTION"]
)
def test_schema_file_carries_every_kind_of_object(statement: str) -> None:
    assert statement in schema.SCHEMA_FILE.read_text()
