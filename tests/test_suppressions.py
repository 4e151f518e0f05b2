"""`python -m worker suppressions list|add|remove`, the suppression state in `history`, and
skipped rows by code in `stats` (docs/operating.md), against a real PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import conninfo
from psycopg.rows import dict_row

from worker.core.settings import RateLimit
from worker.ops import cli
from worker.store.ledger import Claim, Ledger, Skipped
from worker.store.tracking import EventType, ProviderEvent, Tracking


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = run(capsys, *args)
    assert (code, err) == (0, ""), out
    return out


def usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def entries(admin: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return admin.execute(
        "SELECT address, reason, expires_at IS NOT NULL AS expires FROM email.suppressions"
        " ORDER BY address"
    ).fetchall()


def claim(ledger: Ledger, recipient: str, delivery_id: str, limit: RateLimit | None = None) -> Any:
    return ledger.claim_or_skip(
        delivery_id=delivery_id,
        workflow="verification-code",
        recipient=recipient,
        locale="en",
        metadata=None,
        source_message_id=None,
        lease_seconds=60,
        rate_limit=limit,
    )


# --- add ------------------------------------------------------------------------------------


def test_add_is_idempotent_and_lower_cases(
    admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = ok(capsys, "suppressions", "add", "Ada@Example.COM")
    assert out.startswith("suppressed ada@example.com: manual since ")
    assert out.endswith(", never expires\n")
    again = ok(capsys, "suppressions", "add", "ada@example.com", "--reason", "complaint")
    assert again.startswith("ada@example.com was already suppressed: manual since ")
    assert "(unchanged; remove it first to change it)" in again
    assert entries(admin) == [{"address": "ada@example.com", "reason": "manual", "expires": False}]

    doc = json.loads(ok(capsys, "suppressions", "add", "ADA@example.com", "--json"))
    assert doc["created"] is False
    assert (doc["suppression"]["address"], doc["suppression"]["live"]) == ("ada@example.com", True)

    doc = json.loads(
        ok(capsys, "suppressions", "add", "bob@example.com", "--expires", "30d", "--json")
    )
    assert doc["created"] is True and doc["suppression"]["reason"] == "manual"
    expires = datetime.fromisoformat(doc["suppression"]["expires_at"])
    created = datetime.fromisoformat(doc["suppression"]["created_at"])
    assert (expires - created).total_seconds() == pytest.approx(30 * 86400, abs=5)


def test_an_expired_entry_is_renewed_by_add(
    admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    admin.execute(
        "INSERT INTO email.suppressions (address, reason, expires_at)"
        " VALUES ('ada@example.com', 'manual', now() - interval '1 day')"
    )
    out = ok(capsys, "suppressions", "add", "ada@example.com", "--reason", "hard_bounce")
    assert out.startswith("suppressed ada@example.com: hard_bounce since ")
    assert entries(admin) == [
        {"address": "ada@example.com", "reason": "hard_bounce", "expires": False}
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "not-an-address"], "'not-an-address' is not an email address: must be one"),
        (["add", "Ada <ada@example.com>"], "is not an email address"),
        (["add", "a@b@example.com"], "is not an email address"),
        (["remove", "ada@"], "'ada@' is not an email address"),
        (["add", "ada@example.com", "--reason", "spam"], "'spam' is not a suppression reason"),
        (["add", "ada@example.com", "--expires", "soon"], "is not a duration like 30m"),
        (["list", "--reason", "bounce"], "'bounce' is not a suppression reason"),
        ([], "the following arguments are required: ACTION"),
    ],
    ids=" ".join,
)
def test_bad_input_exits_2_naming_the_rule(
    argv: list[str], message: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(capsys, "suppressions", *argv)


# --- list -----------------------------------------------------------------------------------


def test_list_shows_live_and_expired_entries(
    admin: psycopg.Connection[Any], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ok(capsys, "suppressions", "list") == "no suppressed addresses\n"
    sent = claim(ledger, "Grace@example.com", "d-bounced")
    assert isinstance(sent, Claim)
    assert ledger.set_sent_if_claimed(sent, attempts=1, provider_message_id="<d-bounced@x>")
    Tracking(ledger.pool).apply(
        ProviderEvent(
            provider="postmark",
            provider_event_id="b-1",
            event_type=EventType.BOUNCED,
            occurred_at=datetime(2026, 11, 23, tzinfo=UTC),
            recipient=None,
            delivery_id="d-bounced",
            message_id=None,
            relay_message_id=None,
            bounce_type="HardBounce",
        )
    )
    admin.execute(
        "INSERT INTO email.suppressions (address, reason, created_at, expires_at) VALUES"
        " ('old@example.com', 'manual', now() - interval '2 days', now() - interval '1 day')"
    )

    lines = ok(capsys, "suppressions", "list").splitlines()
    assert lines[0].split() == ["ADDRESS", "REASON", "STATE", "SINCE", "EXPIRES", "DELIVERY_ID"]
    assert lines[1].split()[:3] == ["grace@example.com", "hard_bounce", "live"]
    assert lines[1].split()[-2:] == ["never", "d-bounced"]
    assert lines[2].split()[:3] == ["old@example.com", "manual", "expired"]

    doc = json.loads(ok(capsys, "suppressions", "list", "--reason", "hard_bounce", "--json"))
    assert doc["total"] == 1
    assert [(e["address"], e["delivery_id"]) for e in doc["suppressions"]] == [
        ("grace@example.com", "d-bounced")
    ]
    short = ok(capsys, "suppressions", "list", "--limit", "1").splitlines()
    assert len(short) == 3 and short[-1] == "(1 of 2; --limit shows more)"
    assert ok(capsys, "suppressions", "list", "--reason", "complaint") == (
        "no suppressed addresses with reason complaint\n"
    )


# --- remove ---------------------------------------------------------------------------------


def test_remove_lifts_the_suppression(
    admin: psycopg.Connection[Any], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "suppressions", "add", "ada@example.com")
    assert isinstance(claim(ledger, "ADA@example.com", "before"), Skipped)
    out = ok(capsys, "suppressions", "remove", "Ada@Example.com")
    assert out.startswith("removed ada@example.com (manual since ")
    assert out.endswith("; it will be sent to again\n")
    assert entries(admin) == []
    assert isinstance(claim(ledger, "ada@example.com", "after"), Claim)

    code, out, err = run(capsys, "suppressions", "remove", "ada@example.com")
    assert (code, out, err) == (1, "", "error: ada@example.com is not suppressed\n")
    ok(capsys, "suppressions", "add", "bob@example.com")
    doc = json.loads(ok(capsys, "suppressions", "remove", "bob@example.com", "--json"))
    assert doc["removed"]["address"] == "bob@example.com"


def test_only_an_operator_login_may_remove(
    database_url: str,
    admin: psycopg.Connection[Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    login = f"fn_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE ROLE {login} LOGIN IN ROLE email_worker")
    try:
        monkeypatch.setenv("DATABASE_URL", conninfo.make_conninfo(database_url, user=login))
        ok(capsys, "suppressions", "add", "ada@example.com")  # the worker role may add
        code, out, err = run(capsys, "suppressions", "remove", "ada@example.com")
        assert (code, out) == (1, "")
        assert err == (
            "error: permission denied: only the owner of email.suppressions may remove entries;"
            " run this as an operator login\n"
        )
        assert len(entries(admin)) == 1
    finally:
        admin.execute(f"DROP OWNED BY {login}")
        admin.execute(f"DROP ROLE {login}")


# --- history and stats ------------------------------------------------------------------------


def test_history_shows_the_suppression_state(
    admin: psycopg.Connection[Any], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    assert isinstance(claim(ledger, "ada@example.com", "d-1"), Claim)
    ok(capsys, "suppressions", "add", "ada@example.com", "--reason", "complaint")
    skipped = claim(ledger, "ada@example.com", "d-2")
    assert isinstance(skipped, Skipped)

    suppression, header, *rows = ok(
        capsys, "history", "--recipient", "ada@example.com"
    ).splitlines()
    assert suppression.startswith("suppression: complaint since ")
    assert suppression.endswith(", never expires")
    assert header.split()[:4] == ["UPDATED", "DELIVERY_ID", "WORKFLOW", "STATUS"]
    assert rows[0].split()[2:4] == ["d-2", "verification-code"]
    assert "skipped" in rows[0] and "SUPPRESSED" in rows[0]

    doc = json.loads(ok(capsys, "history", "--recipient", "ada@example.com", "--json"))
    assert doc["suppression"]["reason"] == "complaint" and doc["suppression"]["live"] is True
    assert [d["status"] for d in doc["deliveries"]] == ["skipped", "in_progress"]

    code, out, err = run(capsys, "history", "--recipient", "not an address")
    assert (code, out) == (1, "")
    assert err.startswith("error: 'not an address' is not an email address: must be one address")

    admin.execute("UPDATE email.suppressions SET expires_at = now() - interval '1 minute'")
    suppression = ok(capsys, "history", "--recipient", "ada@example.com").splitlines()[0]
    assert suppression.startswith("suppression: expired at ")
    assert suppression.endswith(": no longer suppressed")


def test_stats_count_skipped_rows_by_code(
    admin: psycopg.Connection[Any], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    one = RateLimit(1, 3600, "1/1h")
    assert isinstance(claim(ledger, "ada@example.com", "first", one), Claim)
    for n in range(3):
        assert isinstance(claim(ledger, "ada@example.com", f"limited-{n}", one), Skipped)
    ok(capsys, "suppressions", "add", "bob@example.com")
    for n in range(2):
        assert isinstance(claim(ledger, "bob@example.com", f"suppressed-{n}"), Skipped)

    doc = json.loads(ok(capsys, "stats", "--json"))
    [codes] = [w for w in doc["workflows"] if w["workflow"] == "verification-code"]
    assert codes["counts"]["skipped"] == 5
    assert codes["skipped_by_code"] == {"SUPPRESSED": 2, "RATE_LIMITED": 3, "EXPIRED": 0}
    lines = ok(capsys, "stats").splitlines()
    headers = lines[1].split()
    row = dict(zip(headers, lines[2].split(), strict=False))
    assert (row["SKIPPED"], row["SUPPRESSED"], row["RATE_LIMITED"]) == ("5", "2", "3")


def test_a_reader_login_lists_and_reads_history_but_cannot_add(
    database_url: str,
    admin: psycopg.Connection[Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok(capsys, "suppressions", "add", "ada@example.com")
    login = f"support_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE ROLE {login} LOGIN IN ROLE email_reader")
    try:
        monkeypatch.setenv("DATABASE_URL", conninfo.make_conninfo(database_url, user=login))
        assert "ada@example.com" in ok(capsys, "suppressions", "list")
        history = ok(capsys, "history", "--recipient", "ada@example.com")
        assert history.startswith("suppression: manual since ")
        code, out, err = run(capsys, "suppressions", "add", "bob@example.com")
        assert (code, out) == (1, "")
        assert err.startswith("error: database: permission denied") and err.count("\n") == 1
    finally:
        admin.execute(f"DROP OWNED BY {login}")
        admin.execute(f"DROP ROLE {login}")
