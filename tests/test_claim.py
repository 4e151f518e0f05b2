"""The claim as one decision in the database (migrations 004, 005 and 010; docs/reference.md
and docs/operating.md): claim, or end the row `skipped` (validity end passed, suppressed
recipient, rate limit reached), or nothing."""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from worker.core.settings import DatabaseSettings, RateLimit
from worker.store.db import connection_kwargs
from worker.store.ledger import (
    SKIP_CODES,
    SUPPRESSION_REASONS,
    Claim,
    ClaimOutcome,
    ClaimResult,
    Code,
    Failure,
    Ledger,
    Reason,
    Skipped,
    Status,
    Unclaimed,
)
from worker.store.migrations import discover, migrate_down, migrate_up

_ids = (f"c-{n}" for n in itertools.count())
FIVE_PER_HOUR = RateLimit(5, 3600, "5/1h")


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def claim(
    ledger: Ledger,
    recipient: str = "ada@example.com",
    *,
    workflow: str = "verification-code",
    delivery_id: str | None = None,
    limit: RateLimit | None = None,
    published_at: datetime | None = None,
    not_after: datetime | None = None,
) -> ClaimResult:
    return ledger.claim_or_skip(
        delivery_id=delivery_id or next(_ids),
        workflow=workflow,
        recipient=recipient,
        locale="en",
        metadata=None,
        source_message_id="m-1",
        lease_seconds=60,
        rate_limit=limit,
        published_at=published_at,
        not_after=not_after,
    )


def send(ledger: Ledger, result: ClaimResult) -> None:
    assert isinstance(result, Claim), result
    assert ledger.set_sent_if_claimed(result, attempts=1, provider_message_id="<x@example.com>")


def suppress(
    admin: psycopg.Connection[Any], address: str, reason: str = "manual", expires: str = "NULL"
) -> None:
    admin.execute(
        f"INSERT INTO email.suppressions (address, reason, expires_at) VALUES (%s, %s, {expires})",
        (address, reason),
    )


# --- suppression ------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", SUPPRESSION_REASONS)
def test_a_suppressed_recipient_is_skipped_in_any_letter_case(
    admin: psycopg.Connection[Any], ledger: Ledger, reason: Reason
) -> None:
    suppress(admin, "ada@example.com", reason.value)
    result = claim(ledger, "Ada@EXAMPLE.com")
    assert isinstance(result, Skipped)
    assert (result.code, result.reason) == (Code.SUPPRESSED, reason)
    assert result.message.startswith(f"recipient suppressed: {reason.value} since ")
    assert "ada@" not in result.message.lower()  # the address is never in the row's error

    row = ledger.get(result.delivery_id)
    assert row is not None
    assert (row.status, row.status_reason, row.last_error_code, row.attempts) == (
        Status.SKIPPED,
        reason.value,
        "SUPPRESSED",
        0,
    )
    assert (row.claim_token, row.lease_expires_at, row.sent_at) == (None, None, None)
    assert row.recipient == "Ada@EXAMPLE.com"  # stored as given
    [event] = ledger.events(result.delivery_id)
    assert (event.status, event.error_code, event.payload["reason"]) == (
        Status.SKIPPED,
        "SUPPRESSED",
        reason.value,
    )


def test_an_expired_entry_does_not_suppress_a_future_one_does(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    suppress(admin, "old@example.com", expires="now() - interval '1 second'")
    suppress(admin, "new@example.com", expires="now() + interval '1 day'")
    assert isinstance(claim(ledger, "old@example.com"), Claim)
    assert isinstance(claim(ledger, "new@example.com"), Skipped)


def test_a_skipped_row_stays_skipped_and_says_so(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    suppress(admin, "ada@example.com")
    first = claim(ledger)
    assert isinstance(first, Skipped)
    admin.execute("DELETE FROM email.suppressions")
    # Pub/Sub redelivers the same event: nothing changes, and the answer names the status
    # (no second read needed to tell "finished" from "held elsewhere").
    again = claim(ledger, delivery_id=first.delivery_id)
    assert again == Unclaimed(first.delivery_id, Status.SKIPPED)
    assert len(ledger.events(first.delivery_id)) == 1


def test_a_suppression_stops_a_retry_but_never_touches_a_sent_or_live_row(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    retrying = claim(ledger)
    assert isinstance(retrying, Claim)
    failure = Failure("SMTP_451", "later", Reason.TRANSIENT_FAILURE)
    assert ledger.set_retrying_if_claimed(retrying, attempts=1, failure=failure)
    done = claim(ledger)
    send(ledger, done)
    live = claim(ledger)
    assert isinstance(live, Claim)

    suppress(admin, "ada@example.com", "complaint")
    skipped = claim(ledger, delivery_id=retrying.delivery_id)
    assert isinstance(skipped, Skipped)
    row = ledger.get(retrying.delivery_id)
    assert row is not None and (row.status, row.attempts) == (Status.SKIPPED, 1)
    assert row.last_error_message is not None and "complaint" in row.last_error_message
    assert claim(ledger, delivery_id=done.delivery_id) == Unclaimed(done.delivery_id, Status.SENT)
    assert claim(ledger, delivery_id=live.delivery_id) == Unclaimed(
        live.delivery_id, Status.IN_PROGRESS
    )
    # The live claim still finishes normally.
    send(ledger, live)


def test_skipped_is_final_even_for_a_manual_update(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    suppress(admin, "ada@example.com")
    skipped = claim(ledger)
    assert isinstance(skipped, Skipped)
    for target in ("queued", "in_progress", "retrying", "failed", "dead_letter", "sent"):
        with pytest.raises(psycopg.errors.CheckViolation, match="illegal delivery transition"):
            admin.execute(
                "UPDATE email.deliveries SET status = %s::email.delivery_status,"
                " sent_at = CASE WHEN %s = 'sent' THEN now() END,"
                " last_error_code = NULL, last_error_message = NULL,"
                " claim_token = CASE WHEN %s = 'in_progress' THEN gen_random_uuid() END,"
                " lease_expires_at = CASE WHEN %s = 'in_progress' THEN now() END"
                " WHERE delivery_id = %s",
                (target, target, target, target, skipped.delivery_id),
            )


# --- rate limits ----------------------------------------------------------------------------


def test_the_limit_counts_sent_and_in_flight_emails_per_workflow_and_recipient(
    ledger: Ledger,
) -> None:
    results = [claim(ledger, "Ada@Example.com", limit=FIVE_PER_HOUR) for _ in range(3)]
    for result in results[:2]:
        send(ledger, result)  # two sent, one still in progress: all three count
    results += [claim(ledger, "ADA@example.com", limit=FIVE_PER_HOUR) for _ in range(4)]
    assert [type(r).__name__ for r in results] == ["Claim"] * 5 + ["Skipped"] * 2
    over = results[-1]
    assert isinstance(over, Skipped)
    assert (over.code, over.reason) == ("RATE_LIMITED", Reason.RATE_LIMIT)
    assert over.message == "rate limit: 5 verification-code emails to this recipient per 3600 s"
    row = ledger.get(over.delivery_id)
    assert row is not None
    assert (row.status, row.status_reason, row.last_error_code) == (
        Status.SKIPPED,
        "rate_limit",
        "RATE_LIMITED",
    )

    # Another recipient, another workflow: their own counts. No limit: no count at all.
    assert isinstance(claim(ledger, "grace@example.com", limit=FIVE_PER_HOUR), Claim)
    assert isinstance(
        claim(ledger, "ada@example.com", workflow="password-reset", limit=FIVE_PER_HOUR), Claim
    )
    assert isinstance(claim(ledger, "ada@example.com"), Claim)


def test_what_was_never_sent_does_not_count(admin: psycopg.Connection[Any], ledger: Ledger) -> None:
    one = RateLimit(1, 3600, "1/1h")
    first = claim(ledger, limit=one)
    assert isinstance(first, Claim)
    failure = Failure("SMTP_451", "later", Reason.TRANSIENT_FAILURE)
    assert ledger.set_retrying_if_claimed(first, attempts=1, failure=failure)
    # retrying: no email went out, so another delivery may go...
    second = claim(ledger, limit=one)
    assert isinstance(second, Claim)
    # ...and the retried one's own claim does not count itself, but the other's does.
    again = claim(ledger, delivery_id=first.delivery_id, limit=one)
    assert isinstance(again, Skipped) and again.code == "RATE_LIMITED"


def test_a_row_leaves_the_window_at_its_send_time_or_its_lease(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    one = RateLimit(1, 60, "1/1m")
    sent = claim(ledger, limit=one)
    send(ledger, sent)
    assert isinstance(claim(ledger, limit=one), Skipped)
    admin.execute(
        "UPDATE email.deliveries SET sent_at = now() - interval '61 seconds'"
        " WHERE delivery_id = %s",
        (sent.delivery_id,),
    )
    in_flight = claim(ledger, limit=one)
    assert isinstance(in_flight, Claim)
    assert isinstance(claim(ledger, limit=one), Skipped)
    # A worker that died mid-send: its email, if any, left before its lease expired.
    admin.execute(
        "UPDATE email.deliveries SET lease_expires_at = now() - interval '61 seconds'"
        " WHERE delivery_id = %s",
        (in_flight.delivery_id,),
    )
    assert isinstance(claim(ledger, limit=one), Claim)


def test_concurrent_claims_for_one_recipient_never_admit_one_too_many(ledger: Ledger) -> None:
    """8 threads, 3 x N deliveries to one address in four spellings, every claim at once."""
    limit = RateLimit(4, 3600, "4/1h")
    threads = 8
    spellings = ["eve@example.com", "Eve@example.com", "EVE@EXAMPLE.COM", "eve@Example.com"]
    for round_number in range(5):
        barrier = threading.Barrier(threads)

        def contend(
            index: int, round_number: int = round_number, barrier: threading.Barrier = barrier
        ) -> list[ClaimResult]:
            barrier.wait()
            results = []
            for n in range(index, 3 * limit.count, threads):
                result = claim(
                    ledger,
                    spellings[n % 4],
                    delivery_id=f"burst-{round_number}-{n}",
                    limit=limit,
                )
                if isinstance(result, Claim) and n % 2:
                    send(ledger, result)  # some finish while others still claim
                results.append(result)
            return results

        with ThreadPoolExecutor(threads) as executor:
            results = [r for rs in executor.map(contend, range(threads)) for r in rs]
        claimed = [r for r in results if isinstance(r, Claim)]
        skipped = [r for r in results if isinstance(r, Skipped)]
        assert len(claimed) == limit.count, f"round {round_number}"
        assert len(skipped) == 2 * limit.count
        assert {s.code for s in skipped} == {"RATE_LIMITED"}
        for result in claimed:
            ledger.set_sent_if_claimed(result, attempts=1, provider_message_id="<x@example.com>")
        with ledger.pool.connection() as conn:
            # The next round's window must start empty: age this round's emails out.
            conn.execute(
                "UPDATE email.deliveries SET sent_at = now() - interval '2 hours'"
                " WHERE status = 'sent'"
            )


def test_suppression_wins_over_the_rate_limit(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    one = RateLimit(1, 3600, "1/1h")
    send(ledger, claim(ledger, limit=one))
    suppress(admin, "ada@example.com", "hard_bounce")
    result = claim(ledger, limit=one)
    assert isinstance(result, Skipped) and result.code == "SUPPRESSED"


def test_the_count_uses_its_index(admin: psycopg.Connection[Any]) -> None:
    admin.execute("SET session_replication_role = replica")  # bulk rows: no guard, no audit
    admin.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, sent_at)"
        " SELECT 'bulk-' || n, 'verification-code', 'user' || (n % 5000) || '@example.com',"
        " 'sent', now() - n * interval '1 second' FROM generate_series(1, 50000) AS n"
    )
    admin.execute("RESET session_replication_role")
    admin.execute("ANALYZE email.deliveries")
    plan = admin.execute(
        "EXPLAIN SELECT count(*) FROM email.deliveries d"
        " WHERE lower(d.recipient) = 'user7@example.com' AND d.workflow = 'verification-code'"
        " AND d.status IN ('sent', 'in_progress')"
        " AND coalesce(d.sent_at, d.lease_expires_at) > now() - interval '1 hour'"
        " AND d.delivery_id <> 'x'"
    ).fetchall()
    assert any("deliveries_rate_limit_idx" in str(line) for line in plan), plan


# --- freshness (migration 010) -----------------------------------------------------------------


def db_now(admin: psycopg.Connection[Any]) -> datetime:
    row = admin.execute("SELECT now() AS now").fetchone()
    assert row is not None
    return row["now"]  # type: ignore[no-any-return]


def age(admin: psycopg.Connection[Any], delivery_id: str, by: timedelta) -> None:
    """Time passes for one row: its publish time and validity end move `by` into the past."""
    admin.execute(
        "UPDATE email.deliveries SET published_at = published_at - %s,"
        " not_after = not_after - %s WHERE delivery_id = %s",
        (by, by, delivery_id),
    )


def test_a_claim_after_the_validity_end_ends_the_row_skipped_expired(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    now = db_now(admin)
    published, end = now - timedelta(minutes=11), now - timedelta(minutes=1)
    result = claim(ledger, published_at=published, not_after=end)
    assert isinstance(result, Skipped)
    assert (result.code, result.reason) == (Code.EXPIRED, Reason.EXPIRED)
    assert result.message == f"expired: valid until {end:%Y-%m-%d %H:%M:%S} UTC"
    row = ledger.get(result.delivery_id)
    assert row is not None
    assert (row.status, row.status_reason, row.last_error_code, row.attempts) == (
        Status.SKIPPED,
        "expired",
        "EXPIRED",
        0,
    )
    assert (row.published_at, row.not_after) == (published, end)
    assert (row.claim_token, row.sent_at) == (None, None)
    [event] = ledger.events(result.delivery_id)
    assert (event.status, event.error_code) == (Status.SKIPPED, "EXPIRED")


def test_a_claim_exactly_at_the_validity_end_is_expired_a_microsecond_before_is_not(
    admin: psycopg.Connection[Any],
) -> None:
    """now() is the transaction's start: inside one transaction, a validity end equal to it is
    the boundary itself."""
    call = (
        "SELECT outcome, code FROM email.claim_delivery(delivery_id => %s,"
        " workflow => 'verification-code', recipient => 'ada@example.com', locale => 'en',"
        " metadata => NULL, source_message_id => NULL, lease_seconds => 60,"
        " not_after => now() + %s)"
    )
    with admin.transaction():
        at = admin.execute(call, ("at-the-end", timedelta(0))).fetchone()
        before = admin.execute(call, ("just-before", timedelta(microseconds=1))).fetchone()
    assert at == {"outcome": "skipped", "code": "EXPIRED"}
    assert before == {"outcome": "claimed", "code": None}


def test_a_later_copy_never_moves_the_publish_time_or_the_end_later(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    now = db_now(admin)
    first = claim(ledger, published_at=now, not_after=now + timedelta(minutes=10))
    assert isinstance(first, Claim)
    failure = Failure("SMTP_451", "later", Reason.TRANSIENT_FAILURE)
    assert ledger.set_retrying_if_claimed(first, attempts=1, failure=failure)
    later = now + timedelta(minutes=5)
    again = claim(
        ledger,
        delivery_id=first.delivery_id,
        published_at=later,
        not_after=later + timedelta(minutes=10),
    )
    assert isinstance(again, Claim)
    row = ledger.get(first.delivery_id)
    assert row is not None
    assert (row.published_at, row.not_after) == (now, now + timedelta(minutes=10))
    # An earlier end does move it (a copy that says the email is pointless sooner).
    assert ledger.set_retrying_if_claimed(again, attempts=2, failure=failure)
    sooner = now + timedelta(minutes=3)
    assert isinstance(claim(ledger, delivery_id=first.delivery_id, not_after=sooner), Claim)
    row = ledger.get(first.delivery_id)
    assert row is not None and (row.published_at, row.not_after) == (now, sooner)


@pytest.mark.parametrize("way_back", ["retrying", "lease_taken_over", "replayed"])
def test_every_way_back_after_the_end_is_expired(
    admin: psycopg.Connection[Any], ledger: Ledger, way_back: str
) -> None:
    """Whatever brings the delivery back after its validity end: a redelivery after a
    transient failure, a take-over of an expired lease, a replay; the copy that comes back
    carries a fresh publish time, and its own later end does not count."""
    now = db_now(admin)
    first = claim(ledger, published_at=now, not_after=now + timedelta(minutes=10))
    assert isinstance(first, Claim)
    failure = Failure("SMTP_451", "later", Reason.TRANSIENT_FAILURE)
    if way_back == "retrying":
        assert ledger.set_retrying_if_claimed(first, attempts=1, failure=failure)
    elif way_back == "lease_taken_over":
        admin.execute(
            "UPDATE email.deliveries SET lease_expires_at = now() - interval '1 second'"
            " WHERE delivery_id = %s",
            (first.delivery_id,),
        )
    else:
        assert ledger.set_dead_letter_if_claimed(first, attempts=5, failure=failure)
        assert ledger.set_queued_if_finished(first.delivery_id)
    age(admin, first.delivery_id, timedelta(minutes=11))
    fresh = db_now(admin)
    result = claim(
        ledger,
        delivery_id=first.delivery_id,
        published_at=fresh,
        not_after=fresh + timedelta(minutes=10),
    )
    assert isinstance(result, Skipped) and result.code == Code.EXPIRED
    row = ledger.get(first.delivery_id)
    assert row is not None
    assert (row.status, row.last_error_code, row.claim_token) == (Status.SKIPPED, "EXPIRED", None)


def test_an_expired_delivery_that_is_sent_or_held_is_left_alone(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    now = db_now(admin)
    done = claim(ledger, not_after=now + timedelta(minutes=10))
    send(ledger, done)
    live = claim(ledger, not_after=now + timedelta(minutes=10))
    assert isinstance(live, Claim)
    for delivery_id in (done.delivery_id, live.delivery_id):
        age(admin, delivery_id, timedelta(minutes=11))
    assert claim(ledger, delivery_id=done.delivery_id) == Unclaimed(done.delivery_id, Status.SENT)
    assert claim(ledger, delivery_id=live.delivery_id) == Unclaimed(
        live.delivery_id, Status.IN_PROGRESS
    )
    send(ledger, live)  # the claim that was already sending finishes normally


def test_expiry_comes_before_the_suppression_and_the_rate_limit(
    admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    suppress(admin, "ada@example.com")
    gone = db_now(admin) - timedelta(seconds=1)
    result = claim(ledger, limit=FIVE_PER_HOUR, not_after=gone)
    assert isinstance(result, Skipped) and result.code == Code.EXPIRED


# --- the vocabulary, the roles, the pooler ----------------------------------------------------


def test_the_words_of_the_claim_are_the_python_enums(admin: psycopg.Connection[Any]) -> None:
    """email.claim_delivery() writes the skipped rows' codes and reasons itself: every word it
    spells is a member of the enum Python reads it with, and every member is spelled there."""
    [check] = admin.execute(
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conrelid = 'email.suppressions'::regclass AND contype = 'c'"
        " AND pg_get_constraintdef(oid) LIKE '%reason%'"
    ).fetchall()
    assert set(re.findall(r"'(\w+)'::text", check["def"])) == {r.value for r in SUPPRESSION_REASONS}
    row = admin.execute(
        "SELECT prosrc FROM pg_proc WHERE oid = 'email.claim_delivery'::regproc"
    ).fetchone()
    assert row is not None
    source = row["prosrc"]

    def spelled(variable: str) -> set[str]:
        assignments = re.findall(rf"\b{variable} := (.*?);", source, re.S)
        return {word for text in assignments for word in re.findall(r"'(\w+)'", text)}

    assert spelled("code") == {code.value for code in SKIP_CODES}
    # The others come from the suppression entry.
    assert spelled("reason") == {Reason.RATE_LIMIT.value, Reason.EXPIRED.value}
    assert spelled("outcome") == {o.value for o in ClaimOutcome}


def test_the_worker_role_may_claim(database_url: str, admin: psycopg.Connection[Any]) -> None:
    suppress(admin, "ada@example.com")

    def as_worker(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET ROLE email_worker")

    with ConnectionPool(database_url, kwargs={"autocommit": True}, configure=as_worker) as pool:
        ledger = Ledger(pool)
        assert isinstance(claim(ledger), Skipped)
        assert isinstance(claim(ledger, "grace@example.com", limit=FIVE_PER_HOUR), Claim)
    admin.execute("SET ROLE email_reader")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        admin.execute(
            "SELECT * FROM email.claim_delivery('x', 'invite', 'a@example.com', 'en',"
            " NULL, NULL, 60)"
        )


def test_a_burst_through_a_transaction_mode_pooler_is_limited_exactly(
    pooled_database_url: str,
) -> None:
    settings = DatabaseSettings(url=pooled_database_url, pool_max_size=8)
    limit = RateLimit(3, 3600, "3/1h")
    with ConnectionPool(
        pooled_database_url, min_size=1, max_size=8, kwargs=connection_kwargs(settings)
    ) as pool:
        ledger = Ledger(pool)
        with ThreadPoolExecutor(8) as executor:
            results = list(
                executor.map(lambda _: claim(ledger, "bob@example.com", limit=limit), range(24))
            )
    assert sum(isinstance(r, Claim) for r in results) == limit.count
    assert sum(isinstance(r, Skipped) for r in results) == 24 - limit.count


# --- the migration --------------------------------------------------------------------------


def test_migrations_004_and_005_go_down_and_up_again(empty_database_url: str) -> None:
    url = empty_database_url

    def objects() -> tuple[int, int]:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM pg_proc WHERE proname = 'claim_delivery'),"
                " (SELECT count(*) FROM pg_class WHERE relname = 'deliveries_rate_limit_idx')"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def quiet(_line: str) -> None:
        pass

    # Up to 005 only: the test is about these two, whatever later migrations add.
    through_005 = [m for m in discover() if m.version <= 5]
    migrate_up(url, [m for m in through_005 if m.version <= 3], report=quiet)
    assert objects() == (0, 0)
    migrate_up(url, through_005, report=quiet)
    assert objects() == (1, 1)
    with psycopg.connect(url, autocommit=True) as conn:
        suppress(conn, "ada@example.com")
        # 005's own call (today's Ledger passes migration 010's parameters too).
        [(outcome, skipped_id)] = conn.execute(
            "SELECT outcome, 'c-005' FROM email.claim_delivery('c-005', 'invite',"
            " 'ada@example.com', 'en', NULL, NULL, 60)"
        ).fetchall()
        assert outcome == ClaimOutcome.SKIPPED
    assert [m.version for m in migrate_down(url, migrations=through_005, report=quiet)] == [5]
    assert objects() == (0, 1)
    assert [m.version for m in migrate_down(url, migrations=through_005, report=quiet)] == [4]
    assert objects() == (0, 0)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT status FROM email.deliveries WHERE delivery_id = %s", (skipped_id,)
        ).fetchone()
    assert row == ("skipped",)  # kept, and still final
    assert [m.version for m in migrate_up(url, through_005, report=quiet)] == [4, 5]
    assert objects() == (1, 1)
