"""One way to the database: every statement the code runs is a named query of `sql/*.sql`,
loaded by one loader in which a name means one statement."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.store import db

ROOT = Path(__file__).resolve().parents[1]
# A named query the code runs: `_one("x"`, `_all`, `_row`, `_transition`, `query("x")`, and
# `query("x" if up else "y")`.
_USED = re.compile(
    r"""\bquery\(\s*["']([a-z_]+)["'] if \w+ else ["']([a-z_]+)["']"""
    r"""|\b(?:_one|_all|_row|_transition|query)\(\s*["']([a-z_]+)["']"""
)


def used_names() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "worker").rglob("*.py"):
        for groups in _USED.findall(path.read_text()):
            names.update(name for name in groups if name)
    return names


def test_every_query_the_code_names_is_in_sql() -> None:
    used = used_names()
    assert len(used) > 30  # the pattern still finds the code's queries
    assert sorted(used - set(db.queries())) == []


def test_every_named_query_is_used() -> None:
    # A statement nothing runs is dead weight (and an index it needed, a cost on every write).
    assert sorted(set(db.queries()) - used_names()) == []


def test_no_statement_is_written_in_python() -> None:
    inline = re.compile(r"""["'](?:SELECT|INSERT|UPDATE|DELETE|WITH|CREATE)\s""")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "worker").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if inline.search(line)
    ]
    assert found == []


def test_a_name_in_two_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- name: same\nSELECT 1;\n")
    (tmp_path / "b.sql").write_text("-- name: same\nSELECT 2;\n")
    with pytest.raises(ValueError, match=r"'same' is named in both a.sql and b.sql"):
        db.queries(tmp_path)


def test_the_schema_file_is_not_read_for_queries(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- name: one\nSELECT 1;\n")
    (tmp_path / "schema.sql").write_text("CREATE TABLE t ();\n")
    assert dict(db.queries(tmp_path)) == {"one": "SELECT 1;"}


def test_an_unknown_name_says_where_it_looked() -> None:
    with pytest.raises(KeyError, match=r"no query named 'nope' in sql/\*\.sql"):
        db.query("nope")
