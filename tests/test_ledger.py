"""The ledger against a real PostgreSQL: the state machine, the audit trail, security, races."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from worker.store.ledger import Claim, Failure, Ledger, Reason, Status

STATUSES = list(Status)
ALLOWED: dict[Status | None, set[Status]] = {
    None: {Status.QUEUED, Status.IN_PROGRESS, Status.FAILED, Status.SKIPPED},
    Status.QUEUED: {Status.IN_PROGRESS, Status.FAILED, Status.DEAD_LETTER, Status.SKIPPED},
    Status.IN_PROGRESS: {
        Status.IN_PROGRESS,
        Status.SENT,
        Status.RETRYING,
        Status.FAILED,
        Status.DEAD_LETTER,
        Status.SKIPPED,
    },
    Status.RETRYING: {Status.IN_PROGRESS, Status.FAILED, Status.DEAD_LETTER, Status.SKIPPED},
    Status.FAILED: {Status.QUEUED},
    Status.DEAD_LETTER: {Status.QUEUED},
    Status.SENT: set(),
    Status.SKIPPED: set(),
}
TRANSIENT = Failure(code="SMTP_451", message="try later", reason=Reason.TRANSIENT_FAILURE)
_ids = (f"d-{n}" for n in itertools.count())


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def claim(ledger: Ledger, delivery_id: str, lease_seconds: int = 60) -> Claim | None:
    return ledger.claim(
        delivery_id=delivery_id,
        workflow="invite",
        recipient="ada@example.com",
        locale="en",
        metadata={"team": 7},
        source_message_id="msg-1",
        lease_seconds=lease_seconds,
    )


# A status change written as an operator would, with whatever columns the CHECK constraints
# need for the target status, so that only the transition guard can refuse it.
SET_STATUS = """
UPDATE email.deliveries SET
    status = %(to)s::email.delivery_status,
    sent_at = CASE WHEN %(to)s = 'sent' THEN now() END,
    claim_token = CASE WHEN %(to)s = 'in_progress' THEN gen_random_uuid() END,
    lease_expires_at = CASE WHEN %(to)s = 'in_progress' THEN now() + interval '1 minute' END,
    last_error_code = CASE WHEN %(to)s = 'sent' THEN NULL ELSE last_error_code END,
    last_error_message = CASE WHEN %(to)s = 'sent' THEN NULL ELSE last_error_message END
WHERE delivery_id = %(id)s
"""
INSERT = """
INSERT INTO email.deliveries
    (delivery_id, workflow, recipient, status, claim_token, lease_expires_at)
VALUES (%(id)s, 'invite', 'ada@example.com', %(to)s::email.delivery_status,
        CASE WHEN %(to)s = 'in_progress' THEN gen_random_uuid() END,
        CASE WHEN %(to)s = 'in_progress' THEN now() + interval '1 minute' END)
"""
# The legal path to each status from a new row.
PATH_TO = {
    Status.QUEUED: [Status.QUEUED],
    Status.IN_PROGRESS: [Status.IN_PROGRESS],
    Status.SENT: [Status.IN_PROGRESS, Status.SENT],
    Status.RETRYING: [Status.IN_PROGRESS, Status.RETRYING],
    Status.FAILED: [Status.FAILED],
    Status.DEAD_LETTER: [Status.IN_PROGRESS, Status.DEAD_LETTER],
    Status.SKIPPED: [Status.SKIPPED],
}


def row_in(conn: psycopg.Connection[Any], status: Status) -> str:
    delivery_id = next(_ids)
    first, *rest = PATH_TO[status]
    conn.execute(INSERT, {"id": delivery_id, "to": first})
    for step in rest:
        conn.execute(SET_STATUS, {"id": delivery_id, "to": step})
    return delivery_id


@pytest.mark.parametrize(
    ("source", "target"),
    [(s, t) for s in STATUSES for t in STATUSES if t in ALLOWED[s]],
    ids=str,
)
def test_every_allowed_transition_succeeds(
    admin: psycopg.Connection[Any], source: Status, target: Status
) -> None:
    delivery_id = row_in(admin, source)
    admin.execute(SET_STATUS, {"id": delivery_id, "to": target})
    row = admin.execute(
        "SELECT status FROM email.deliveries WHERE delivery_id = %s", (delivery_id,)
    ).fetchone()
    assert row == {"status": target.value}


@pytest.mark.parametrize(
    ("source", "target"),
    [(s, t) for s in STATUSES for t in STATUSES if t not in ALLOWED[s] and t != s],
    ids=str,
)
def test_every_disallowed_transition_is_refused_by_the_database(
    admin: psycopg.Connection[Any], source: Status, target: Status
) -> None:
    delivery_id = row_in(admin, source)
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        admin.execute(SET_STATUS, {"id": delivery_id, "to": target})
    assert f"illegal delivery transition {source} -> {target}" in str(refused.value)


@pytest.mark.parametrize("status", [Status.SENT, Status.RETRYING, Status.DEAD_LETTER], ids=str)
def test_new_rows_may_only_start_queued_in_progress_failed_or_skipped(
    admin: psycopg.Connection[Any], status: Status
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=r"\(new row\) -> "):
        admin.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, sent_at)"
            " VALUES ('x', 'invite', 'a@example.com', %s, now())",
            (status.value,),
        )


def test_check_constraints_make_bad_rows_impossible(admin: psycopg.Connection[Any]) -> None:
    delivery_id = row_in(admin, Status.QUEUED)
    bad_updates = [
        "attempts = -1",
        "sent_at = now()",  # not sent
        "claim_token = gen_random_uuid(), lease_expires_at = now()",  # lease on a queued row
    ]
    for assignment in bad_updates:
        with pytest.raises(psycopg.errors.CheckViolation):
            admin.execute(
                f"UPDATE email.deliveries SET {assignment} WHERE delivery_id = %s",
                (delivery_id,),
            )
    with pytest.raises(psycopg.errors.CheckViolation):
        admin.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
            " VALUES ('bad id with spaces', 'invite', 'a@example.com', 'queued')"
        )


def test_an_event_per_status_change_and_none_without_one(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    claimed = claim(ledger, "evt")
    assert claimed is not None
    assert ledger.set_retrying_if_claimed(claimed, attempts=1, failure=TRANSIENT)
    before = admin.execute(
        "SELECT updated_at FROM email.deliveries WHERE delivery_id = 'evt'"
    ).fetchone()
    admin.execute(
        "UPDATE email.deliveries SET metadata = '{\"edited\": true}' WHERE delivery_id = 'evt'"
    )
    after = admin.execute(
        "SELECT updated_at FROM email.deliveries WHERE delivery_id = 'evt'"
    ).fetchone()
    assert before is not None and after is not None and after["updated_at"] > before["updated_at"]

    again = claim(ledger, "evt")
    assert again is not None and again.attempts == 2
    assert ledger.set_sent_if_claimed(again, attempts=2, provider_message_id="<evt@example.com>")

    events = ledger.events("evt")
    assert [(e.status, e.attempt) for e in events] == [
        (Status.IN_PROGRESS, 1),
        (Status.RETRYING, 1),
        (Status.IN_PROGRESS, 2),
        (Status.SENT, 2),
    ]
    assert (events[1].error_code, events[1].error_message) == ("SMTP_451", "try later")
    assert events[1].payload["from"] == "in_progress"
    assert events[3].payload["provider_message_id"] == "<evt@example.com>"

    row = ledger.get("evt")
    assert row is not None and row.status is Status.SENT and row.sent_at is not None
    assert (row.last_error_code, row.last_error_message, row.claim_token) == (None, None, None)


def test_claim_returns_nothing_for_finished_deliveries(ledger: Ledger) -> None:
    for final in ("sent", "failed", "dead_letter"):
        claimed = claim(ledger, final)
        assert claimed is not None
        failure = Failure(code="SMTP_550", message="no", reason=Reason.PERMANENT_FAILURE)
        if final == "sent":
            assert ledger.set_sent_if_claimed(claimed, attempts=1, provider_message_id="<x@y>")
        elif final == "failed":
            assert ledger.set_failed_if_claimed(claimed, attempts=1, failure=failure)
        else:
            assert ledger.set_dead_letter_if_claimed(claimed, attempts=1, failure=failure)
        assert claim(ledger, final) is None


def test_a_live_lease_cannot_be_taken_over_an_expired_one_can(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    first = claim(ledger, "lease")
    assert first is not None
    assert claim(ledger, "lease") is None

    admin.execute(
        "UPDATE email.deliveries SET lease_expires_at = now() - interval '1 second'"
        " WHERE delivery_id = 'lease'"
    )
    second = claim(ledger, "lease")
    assert second is not None and second.attempts == 2 and second.claim_token != first.claim_token

    # The old holder wakes up: every one of its transitions is fenced off by the token.
    assert not ledger.set_sent_if_claimed(first, attempts=1, provider_message_id="<old@x>")
    assert not ledger.set_retrying_if_claimed(first, attempts=1, failure=TRANSIENT)
    assert not ledger.set_failed_if_claimed(first, attempts=1, failure=TRANSIENT)
    assert not ledger.set_dead_letter_if_claimed(first, attempts=1, failure=TRANSIENT)
    assert ledger.set_sent_if_claimed(second, attempts=2, provider_message_id="<new@x>")
    row = ledger.get("lease")
    assert row is not None and row.provider_message_id == "<new@x>"
    takeover = ledger.events("lease")[1]
    assert (takeover.status, takeover.payload.get("reason")) == (
        Status.IN_PROGRESS,
        "lease_expired",
    )


def terminate_ledger_connections(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchone()
    assert row is not None
    return int(row["n"])


@pytest.mark.parametrize("ending", ["sent", "retrying", "failed", "dead_letter"])
def test_transitions_survive_a_dropped_connection(
    admin: psycopg.Connection[Any], ledger: Ledger, ending: str
) -> None:
    """The connection the claim used is gone (failover, pooler restart): the write after
    the send is retried on a new one, by the ledger, whoever calls it."""
    claimed = claim(ledger, f"drop-{ending}")
    assert claimed is not None
    assert terminate_ledger_connections(admin) >= 1
    if ending == "sent":
        assert ledger.set_sent_if_claimed(claimed, attempts=1, provider_message_id="<d@x>")
    elif ending == "retrying":
        assert ledger.set_retrying_if_claimed(claimed, attempts=1, failure=TRANSIENT)
    elif ending == "failed":
        assert ledger.set_failed_if_claimed(claimed, attempts=1, failure=TRANSIENT)
    else:
        assert ledger.set_dead_letter_if_claimed(claimed, attempts=1, failure=TRANSIENT)
    row = ledger.get(f"drop-{ending}")
    assert row is not None and row.status == ending


def test_many_threads_claiming_one_new_delivery_exactly_one_wins(ledger: Ledger) -> None:
    threads, rounds = 12, 40
    with ThreadPoolExecutor(threads) as executor:
        for round_number in range(rounds):
            delivery_id = f"race-{round_number}"
            barrier = threading.Barrier(threads)

            def contend(
                delivery_id: str = delivery_id, barrier: threading.Barrier = barrier
            ) -> bool:
                barrier.wait()
                return claim(ledger, delivery_id) is not None

            wins = list(executor.map(lambda _: contend(), range(threads)))
            assert wins.count(True) == 1, f"round {round_number}: {wins.count(True)} winners"
            row = ledger.get(delivery_id)
            assert row is not None and row.attempts == 1


def test_requeue_gives_a_fresh_budget_and_keeps_history(ledger: Ledger) -> None:
    first = claim(ledger, "replay")
    assert first is not None
    exhausted = Failure(code="SMTP_451", message="later", reason=Reason.RETRIES_EXHAUSTED)
    assert ledger.set_dead_letter_if_claimed(first, attempts=5, failure=exhausted)
    assert ledger.set_queued_if_finished("replay")
    assert not ledger.set_queued_if_finished("replay")  # already queued: nothing to do

    row = ledger.get("replay")
    assert row is not None and (row.status, row.attempts, row.replays) == (Status.QUEUED, 0, 1)
    again = claim(ledger, "replay")
    assert again is not None and again.attempts == 1
    statuses = [e.status for e in ledger.events("replay")]
    assert statuses == [Status.IN_PROGRESS, Status.DEAD_LETTER, Status.QUEUED, Status.IN_PROGRESS]


def test_invalid_event_rows(ledger: Ledger) -> None:
    invalid = Failure(
        code="INVALID_EVENT", message="recipient: must be one address", reason=Reason.INVALID_EVENT
    )
    assert ledger.set_failed_if_new_or_queued(
        delivery_id="bad", workflow=None, recipient=None, source_message_id="m", failure=invalid
    )
    row = ledger.get("bad")
    assert row is not None and (row.status, row.last_error_code) == (Status.FAILED, "INVALID_EVENT")
    # A row another copy of the event is working on is left alone.
    live = claim(ledger, "live")
    assert live is not None
    assert not ledger.set_failed_if_new_or_queued(
        delivery_id="live", workflow=None, recipient=None, source_message_id="m", failure=invalid
    )
    assert ledger.set_sent_if_claimed(live, attempts=1, provider_message_id="<live@x>")


def test_stuck_finds_expired_leases(admin: psycopg.Connection[Any], ledger: Ledger) -> None:
    assert claim(ledger, "stuck") is not None
    assert claim(ledger, "fine") is not None
    assert ledger.stuck() == []
    admin.execute(
        "UPDATE email.deliveries SET lease_expires_at = now() - interval '1 minute'"
        " WHERE delivery_id = 'stuck'"
    )
    assert [d.delivery_id for d in ledger.stuck()] == ["stuck"]
    # With a realistic mix (mostly finished rows), the planner picks the partial index.
    admin.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
        " SELECT 'old-' || n, 'invite', 'x@example.com', 'failed'"
        " FROM generate_series(1, 20000) AS n"
    )
    admin.execute("ANALYZE email.deliveries")
    plan = admin.execute(
        "EXPLAIN SELECT * FROM email.deliveries"
        " WHERE status = 'in_progress' AND lease_expires_at < now()"
    ).fetchall()
    assert any("deliveries_in_progress_lease_idx" in str(line) for line in plan), plan


def test_reads_for_support(ledger: Ledger) -> None:
    for n in range(3):
        assert claim(ledger, f"r{n}") is not None
    found = ledger.for_recipient("ada@example.com", limit=2)
    assert len(found) == 2 and all(d.recipient == "ada@example.com" for d in found)
    assert ledger.for_recipient("nobody@example.com") == []
    assert ledger.get("missing") is None


# --- row-level security and grants ------------------------------------------------------


def as_role(conn: psycopg.Connection[Any], role: str) -> None:
    conn.execute(f"SET ROLE {role}")


def test_reader_can_read_and_cannot_write(admin: psycopg.Connection[Any]) -> None:
    delivery_id = row_in(admin, Status.QUEUED)
    as_role(admin, "email_reader")
    assert admin.execute("SELECT delivery_id, status FROM email.deliveries").fetchall() == [
        {"delivery_id": delivery_id, "status": "queued"}
    ]
    assert admin.execute("SELECT delivery_id, status FROM email.delivery_events").fetchall() == [
        {"delivery_id": delivery_id, "status": "queued"}
    ]
    for statement in (
        "UPDATE email.deliveries SET metadata = '{}'",
        "DELETE FROM email.deliveries",
        "INSERT INTO email.deliveries (delivery_id, status) VALUES ('r', 'queued')",
        "DELETE FROM email.delivery_events",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute(statement)


def test_worker_runs_the_whole_lifecycle_but_cannot_delete_or_rewrite_history(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    from psycopg_pool import ConnectionPool

    def as_worker(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET ROLE email_worker")

    with ConnectionPool(database_url, kwargs={"autocommit": True}, configure=as_worker) as pool:
        ledger = Ledger(pool)
        claimed = claim(ledger, "w1")
        assert claimed is not None
        assert ledger.set_sent_if_claimed(claimed, attempts=1, provider_message_id="<w1@x>")
        assert ledger.get("w1") is not None

    as_role(admin, "email_worker")
    for statement in (
        "DELETE FROM email.deliveries",
        "UPDATE email.delivery_events SET error_code = 'x'",
        "DELETE FROM email.delivery_events",
        "SELECT * FROM email.delivery_events",
        "TRUNCATE email.deliveries",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute(statement)


def test_a_third_role_sees_nothing(admin: psycopg.Connection[Any]) -> None:
    row_in(admin, Status.QUEUED)
    role = f"outsider_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        as_role(admin, role)
        for statement in ("SELECT * FROM email.deliveries", "SELECT * FROM email.delivery_events"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute(statement)
    finally:
        admin.execute("RESET ROLE")
        admin.execute(f"DROP ROLE {role}")


def test_roles_are_nologin_and_row_level_security_is_on(admin: psycopg.Connection[Any]) -> None:
    roles = admin.execute(
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'email\\_%' ORDER BY 1"
    ).fetchall()
    assert roles == [
        {"rolname": "email_reader", "rolcanlogin": False},
        {"rolname": "email_worker", "rolcanlogin": False},
    ]
    rls = admin.execute(
        "SELECT relname, relrowsecurity FROM pg_class WHERE relnamespace = 'email'::regnamespace"
        " AND relkind = 'r' AND relname <> 'schema_migrations' ORDER BY 1"
    ).fetchall()
    assert rls == [
        {"relname": "deliveries", "relrowsecurity": True},
        {"relname": "delivery_events", "relrowsecurity": True},
        {"relname": "provider_events", "relrowsecurity": True},
        {"relname": "relay_circuits", "relrowsecurity": True},
        {"relname": "suppressions", "relrowsecurity": True},
        {"relname": "webhook_tokens", "relrowsecurity": True},
    ]


UNSENT = """
SELECT * FROM email.set_unsent_if_claimed(
    delivery_id => %(id)s, claim_token => %(token)s, status => %(to)s::email.delivery_status,
    reason => 'transient_failure', attempts => 1, error_code => 'X', error_message => 'x')
"""


def test_the_transition_functions_are_guarded_like_any_writer(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    """Migration 006's functions run the worker's guarded UPDATEs; they are no way around
    the state machine, the claim token or the audit trail."""
    claimed = claim(ledger, "fn")
    assert claimed is not None
    params = {"id": "fn", "token": claimed.claim_token}
    with pytest.raises(
        psycopg.errors.CheckViolation, match="in_progress -> queued for delivery fn"
    ):
        admin.execute(UNSENT, {**params, "to": "queued"})
    # Another claim's token: no row back, nothing written.
    assert admin.execute(UNSENT, {**params, "token": uuid.uuid4(), "to": "failed"}).fetchall() == []
    assert admin.execute(UNSENT, {**params, "to": "retrying"}).fetchall() == [
        {"set_unsent_if_claimed": "fn"}
    ]
    assert [(e.status, e.error_code) for e in ledger.events("fn")] == [
        (Status.IN_PROGRESS, None),
        (Status.RETRYING, "X"),
    ]

    as_role(admin, "email_reader")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        admin.execute(UNSENT, {**params, "to": "failed"})


def test_the_transition_table_is_inlined_into_the_guard(admin: psycopg.Connection[Any]) -> None:
    """transition_allowed() stays a plain SQL function the planner inlines (no SET clause):
    a called SQL function's body is parsed and planned again in every transaction, that is
    on every ledger write of the autocommit worker (bench ledgercost, migration 006)."""
    plan = admin.execute(
        # A column, not a constant: an immutable call on constants is folded either way.
        "EXPLAIN (VERBOSE, COSTS OFF)"
        " SELECT email.transition_allowed(status, 'sent') FROM email.deliveries"
    ).fetchall()
    assert plan and "transition_allowed" not in str(plan)
