"""Provider events against a real PostgreSQL (contract section 6): the order enforced by the
database for every writer, matching, the earliest times whatever the arrival order,
duplicates, suppressions, concurrency, and each role's rights on the new tables."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from tests.harness.postgres import free_port
from worker.db import connection_kwargs
from worker.ledger import Ledger
from worker.providers.model import Applied, EventType, ProviderEvent
from worker.settings import DatabaseSettings
from worker.tracking import ProviderStatus, Tracking, allowed

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
P = ProviderStatus
# Contract section 6, written out: from -> the statuses it may move to.
ORDER: dict[ProviderStatus | None, set[ProviderStatus]] = {
    None: set(P),
    P.DELIVERED: {P.OPENED, P.CLICKED, P.BOUNCED, P.COMPLAINED},
    P.OPENED: {P.CLICKED, P.COMPLAINED},
    P.CLICKED: {P.COMPLAINED},
    P.BOUNCED: set(),
    P.COMPLAINED: set(),
}
_ids = (f"pe-{n}" for n in itertools.count())


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def tracking(pool: ConnectionPool) -> Tracking:
    return Tracking(pool)


def sent(ledger: Ledger, recipient: str | None = None, relay_id: str | None = None) -> str:
    """A delivery the relay accepted: Message-ID `<id@example.com>`. Each to its own address
    unless one is given: a bounce suppresses its recipient, and the claim skips a suppressed
    one (migration 005)."""
    delivery_id = next(_ids)
    recipient = recipient or f"ada+{delivery_id}@example.com"
    claim = ledger.claim(
        delivery_id=delivery_id,
        workflow="password-reset",
        recipient=recipient,
        locale="en",
        metadata=None,
        source_message_id=None,
        lease_seconds=60,
    )
    assert claim is not None
    assert ledger.set_sent_if_claimed(
        claim, attempts=1, provider_message_id=f"<{delivery_id}@example.com>"
    )
    if relay_id is not None:
        with ledger.pool.connection() as conn:
            conn.execute(
                "UPDATE email.deliveries SET relay_message_id = %s WHERE delivery_id = %s",
                (relay_id, delivery_id),
            )
    return delivery_id


def event(
    kind: EventType | str,
    minute: int,
    *,
    delivery_id: str | None = None,
    message_id: str | None = None,
    relay_message_id: str | None = None,
    event_id: str | None = None,
    provider: str = "sendgrid",
    recipient: str | None = "ada@example.com",
    bounce_type: str | None = None,
) -> ProviderEvent:
    return ProviderEvent(
        provider=provider,
        provider_event_id=event_id or uuid.uuid4().hex,
        event_type=EventType(kind),
        occurred_at=T0 + timedelta(minutes=minute),
        recipient=recipient,
        delivery_id=delivery_id,
        message_id=message_id,
        relay_message_id=relay_message_id,
        bounce_type=bounce_type,
        detail={"bounce_type": bounce_type} if bounce_type else {},
    )


def row(admin: psycopg.Connection[dict[str, Any]], delivery_id: str) -> dict[str, Any]:
    found = admin.execute(
        "SELECT status, provider_status, delivered_at, opened_at, clicked_at, bounced_at,"
        " complained_at, bounce_type FROM email.deliveries WHERE delivery_id = %s",
        (delivery_id,),
    ).fetchone()
    assert found is not None
    return found


def provider_audit(admin: psycopg.Connection[dict[str, Any]], delivery_id: str) -> list[Any]:
    rows = admin.execute(
        "SELECT payload FROM email.delivery_events WHERE delivery_id = %s"
        " AND payload ? 'provider_status' ORDER BY id",
        (delivery_id,),
    ).fetchall()
    return [r["payload"] for r in rows]


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


# --- the order, enforced by the database ------------------------------------------------


def test_the_order_table_in_sql_and_python(admin: psycopg.Connection[Any]) -> None:
    for source, target in itertools.product([None, *P], P):
        expected = target in ORDER[source]
        assert allowed(source, target) is expected, (source, target)
        ok = admin.execute(
            "SELECT email.provider_status_allowed(%s::email.provider_status,"
            " %s::email.provider_status) AS ok",
            (source, target),
        ).fetchone()
        assert ok == {"ok": expected}, (source, target)


@pytest.mark.parametrize("source", list(P), ids=str)
def test_a_manual_update_is_held_to_the_order(
    admin: psycopg.Connection[Any], ledger: Ledger, source: ProviderStatus
) -> None:
    delivery_id = sent(ledger)
    admin.execute(
        "UPDATE email.deliveries SET provider_status = %s WHERE delivery_id = %s",
        (source, delivery_id),
    )
    for target in [None, *P]:
        if target is source or (target is not None and target in ORDER[source]):
            continue
        with pytest.raises(psycopg.errors.CheckViolation, match="illegal provider status change"):
            admin.execute(
                "UPDATE email.deliveries SET provider_status = %s WHERE delivery_id = %s",
                (target, delivery_id),
            )
    assert row(admin, delivery_id)["provider_status"] == source


def test_every_arrival_order_ends_in_the_same_state(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    # Two opens and two clicks: the first of each (by occurred_at) must win whatever arrives
    # first. 6! orders, one delivery each.
    timeline = [
        ("delivered", 1),
        ("opened", 2),
        ("clicked", 3),
        ("complained", 4),
        ("opened", 5),
        ("clicked", 6),
    ]
    for order in itertools.permutations(timeline):
        delivery_id = sent(ledger)
        for kind, minute in order:
            assert tracking.apply(event(kind, minute, delivery_id=delivery_id)) is Applied.APPLIED
        assert row(admin, delivery_id) == {
            "status": "sent",
            "provider_status": "complained",
            "delivered_at": at(1),
            "opened_at": at(2),
            "clicked_at": at(3),
            "bounced_at": None,
            "complained_at": at(4),
            "bounce_type": None,
        }, order
        # The audit trail is a chain of legal steps ending where the row is.
        chain = provider_audit(admin, delivery_id)
        assert chain[-1]["provider_status"] == "complained"
        for before, after in itertools.pairwise([{"provider_status": None}, *chain]):
            assert after.get("from") == before["provider_status"]
            assert allowed(
                None if after.get("from") is None else P(after["from"]),
                P(after["provider_status"]),
            )
        assert all(step["provider"] == "sendgrid" for step in chain)


def test_delivered_and_bounced_in_either_order(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    for order in itertools.permutations([("delivered", 1), ("bounced", 2), ("bounced", 3)]):
        delivery_id = sent(ledger)
        for kind, minute in order:
            tracking.apply(
                event(kind, minute, delivery_id=delivery_id, bounce_type=f"hard-{minute}")
            )
        assert row(admin, delivery_id) == {
            "status": "sent",
            "provider_status": "bounced",
            "delivered_at": at(1),
            "opened_at": None,
            "clicked_at": None,
            "bounced_at": at(2),
            "complained_at": None,
            "bounce_type": "hard-2",  # the earliest bounce's
        }, order


def test_the_same_event_ten_times_is_one_row(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    delivery_id = sent(ledger)
    outcomes = [
        tracking.apply(event("opened", 5, delivery_id=delivery_id, event_id="evt-1"))
        for _ in range(10)
    ]
    assert outcomes == [Applied.APPLIED] + [Applied.DUPLICATE] * 9
    # The same id from another provider is another event.
    assert (
        tracking.apply(
            event("opened", 5, delivery_id=delivery_id, event_id="evt-1", provider="mailgun")
        )
        is Applied.APPLIED
    )
    assert [e.provider for e in tracking.events(delivery_id)] == ["sendgrid", "mailgun"]
    assert len(provider_audit(admin, delivery_id)) == 1


def test_a_bounce_after_a_complaint_does_not_uncomplain(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    delivery_id = sent(ledger)
    tracking.apply(event("complained", 5, delivery_id=delivery_id))
    assert tracking.apply(event("bounced", 3, delivery_id=delivery_id)) is Applied.APPLIED
    state = row(admin, delivery_id)
    assert (state["provider_status"], state["complained_at"], state["bounced_at"]) == (
        "complained",
        at(5),
        at(3),  # the late event fills its own time, and moves nothing back
    )
    assert [p["provider_status"] for p in provider_audit(admin, delivery_id)] == ["complained"]


def test_deferred_is_recorded_without_a_status_change(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    delivery_id = sent(ledger)
    assert tracking.apply(event("deferred", 1, delivery_id=delivery_id, bounce_type="soft")) is (
        Applied.APPLIED
    )
    assert row(admin, delivery_id)["provider_status"] is None
    assert [e.event_type for e in tracking.events(delivery_id)] == ["deferred"]
    assert provider_audit(admin, delivery_id) == []
    assert admin.execute("SELECT count(*) AS n FROM email.suppressions").fetchone() == {"n": 0}


def test_concurrent_events_for_one_delivery_leave_a_consistent_row(
    admin: psycopg.Connection[Any], database_url: str, ledger: Ledger
) -> None:
    kinds = [("delivered", 1), ("opened", 2), ("opened", 4), ("clicked", 3), ("clicked", 5)]
    kinds += [("complained", 6), ("delivered", 7), ("bounced", 8)]
    threads = len(kinds)
    with (
        ConnectionPool(
            database_url, min_size=threads, max_size=threads, kwargs={"autocommit": True}
        ) as pool,
        ThreadPoolExecutor(threads) as executor,
    ):
        pool.wait()
        tracking = Tracking(pool)
        for _ in range(15):
            delivery_id = sent(ledger)
            barrier = threading.Barrier(threads)

            def send(
                kind: tuple[str, int], delivery_id: str = delivery_id, b: Any = barrier
            ) -> Applied:
                b.wait()
                return tracking.apply(event(kind[0], kind[1], delivery_id=delivery_id))

            assert set(executor.map(send, kinds)) == {Applied.APPLIED}
            state = row(admin, delivery_id)
            # A bounce can come first only if nothing else moved the status before it.
            chain = provider_audit(admin, delivery_id)
            assert state["provider_status"] == chain[-1]["provider_status"]
            assert state["provider_status"] in ("complained", "bounced")
            assert (state["delivered_at"], state["opened_at"], state["clicked_at"]) == (
                at(1),
                at(2),
                at(3),
            )
            assert (state["complained_at"], state["bounced_at"]) == (at(6), at(8))
            for before, after in itertools.pairwise([{"provider_status": None}, *chain]):
                assert after.get("from") == before["provider_status"]
            assert len(tracking.events(delivery_id)) == threads


# --- matching ---------------------------------------------------------------------------


def test_matching_by_each_key_in_order(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    by_id, by_msgid, by_bare_msgid, by_relay = (
        sent(ledger, relay_id=f"relay-{n}") for n in range(4)
    )
    cases = {
        by_id: event("delivered", 1, delivery_id=by_id, message_id=f"<{by_msgid}@example.com>"),
        by_msgid: event("delivered", 1, message_id=f"<{by_msgid}@example.com>"),
        # Unknown tag, Message-ID without brackets: the next key matches.
        by_bare_msgid: event(
            "delivered", 1, delivery_id="not-ours", message_id=f"{by_bare_msgid}@example.com"
        ),
        by_relay: event("delivered", 1, message_id="<other@elsewhere>", relay_message_id="relay-3"),
    }
    for delivery_id, case in cases.items():
        assert tracking.apply(case) is Applied.APPLIED
        assert [e.provider_event_id for e in tracking.events(delivery_id)] == [
            case.provider_event_id
        ]
        assert row(admin, delivery_id)["provider_status"] == "delivered"


def test_an_unmatched_event_is_kept_with_its_keys(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    sent(ledger)
    lost = event(
        "bounced",
        1,
        delivery_id="gone-1",
        message_id="<gone-1@example.com>",
        relay_message_id="r-9",
        recipient="Lost@Example.com",
    )
    assert tracking.apply(lost) is Applied.UNMATCHED
    assert tracking.apply(lost) is Applied.DUPLICATE
    stored = admin.execute(
        "SELECT delivery_id, tagged_delivery_id, message_id, relay_message_id, recipient"
        " FROM email.provider_events"
    ).fetchall()
    assert stored == [
        {
            "delivery_id": None,
            "tagged_delivery_id": "gone-1",
            "message_id": "<gone-1@example.com>",
            "relay_message_id": "r-9",
            "recipient": "Lost@Example.com",
        }
    ]
    # Nobody's status moved and nobody was suppressed on an unmatched event's word.
    assert admin.execute(
        "SELECT count(*) AS n FROM email.deliveries WHERE provider_status IS NOT NULL"
    ).fetchone() == {"n": 0}
    assert admin.execute("SELECT count(*) AS n FROM email.suppressions").fetchone() == {"n": 0}


def test_matching_uses_the_indexes(admin: psycopg.Connection[Any]) -> None:
    admin.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
        " provider_message_id, relay_message_id)"
        " SELECT 'bulk-' || n, 'invite', 'x@example.com', 'failed',"
        " '<bulk-' || n || '@example.com>', 'relay-' || n FROM generate_series(1, 20000) AS n"
    )
    admin.execute("ANALYZE email.deliveries")
    for column, index in (
        ("provider_message_id", "deliveries_provider_message_id_idx"),
        ("relay_message_id", "deliveries_relay_message_id_idx"),
    ):
        plan = admin.execute(
            f"EXPLAIN SELECT delivery_id FROM email.deliveries WHERE {column} IN ('a', '<a>')"
        ).fetchall()
        assert any(index in str(line) for line in plan), plan


# --- suppressions -----------------------------------------------------------------------


def suppressions(admin: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return admin.execute(
        "SELECT address, reason, delivery_id, expires_at FROM email.suppressions ORDER BY address"
    ).fetchall()


def test_a_bounce_and_a_complaint_suppress_the_recipient_once(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    first = sent(ledger, recipient="Ada.Lovelace@Example.COM")
    second = sent(ledger, recipient="ada.lovelace@example.com")
    other = sent(ledger, recipient="Grace@Example.com")
    tracking.apply(event("bounced", 1, delivery_id=first, bounce_type="hard"))
    tracking.apply(event("bounced", 2, delivery_id=second, bounce_type="hard"))
    tracking.apply(event("complained", 3, delivery_id=first))
    tracking.apply(event("opened", 1, delivery_id=other))
    assert suppressions(admin) == [
        {
            "address": "ada.lovelace@example.com",
            "reason": "hard_bounce",
            "delivery_id": first,
            "expires_at": None,
        }
    ]
    tracking.apply(event("complained", 4, delivery_id=other))
    assert suppressions(admin)[1] == {
        "address": "grace@example.com",
        "reason": "complaint",
        "delivery_id": other,
        "expires_at": None,
    }


def test_an_expired_entry_is_renewed_a_live_one_kept(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    # Sent first: a live entry would have skipped its delivery (migration 005).
    old, live = (
        sent(ledger, recipient="old@example.com"),
        sent(ledger, recipient="live@example.com"),
    )
    admin.execute(
        "INSERT INTO email.suppressions (address, reason, expires_at) VALUES"
        " ('old@example.com', 'manual', now() - interval '1 day'),"
        " ('live@example.com', 'manual', now() + interval '1 day')"
    )
    tracking.apply(event("bounced", 1, delivery_id=old))
    tracking.apply(event("complained", 1, delivery_id=live))
    entries = {e["address"]: e for e in suppressions(admin)}
    assert (entries["old@example.com"]["reason"], entries["old@example.com"]["expires_at"]) == (
        "hard_bounce",
        None,
    )
    assert entries["live@example.com"]["reason"] == "manual"
    with pytest.raises(psycopg.errors.CheckViolation):
        admin.execute("INSERT INTO email.suppressions (address, reason) VALUES ('A@b.c', 'manual')")


# --- the database down ------------------------------------------------------------------


def test_an_unreachable_database_raises_for_the_webhook_to_answer_503() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with (
        ConnectionPool(url, min_size=0, max_size=1, timeout=1, open=True) as pool,
        pytest.raises((psycopg.OperationalError, PoolTimeout)),
    ):
        Tracking(pool).apply(event("delivered", 1, delivery_id="x"))


# --- roles ------------------------------------------------------------------------------


def test_the_worker_applies_events_but_deletes_nothing(
    database_url: str, admin: psycopg.Connection[Any], ledger: Ledger
) -> None:
    delivery_id = sent(ledger)

    def as_worker(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET ROLE email_worker")

    with ConnectionPool(database_url, kwargs={"autocommit": True}, configure=as_worker) as pool:
        tracking = Tracking(pool)
        assert tracking.apply(event("bounced", 1, delivery_id=delivery_id)) is Applied.APPLIED
        assert tracking.apply(event("bounced", 1, delivery_id="nope")) is Applied.UNMATCHED
        assert len(tracking.events(delivery_id)) == 1
    assert suppressions(admin)[0]["reason"] == "hard_bounce"

    admin.execute("SET ROLE email_worker")
    admin.execute("UPDATE email.suppressions SET expires_at = now() + interval '1 day'")
    for statement in (
        "DELETE FROM email.provider_events",
        "UPDATE email.provider_events SET detail = '{}'",
        "DELETE FROM email.suppressions",
        "TRUNCATE email.suppressions",
        "DELETE FROM email.deliveries",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute(statement)


def test_the_reader_reads_everything_and_writes_nothing(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    delivery_id = sent(ledger)
    tracking.apply(event("complained", 1, delivery_id=delivery_id))
    admin.execute("SET ROLE email_reader")
    for table, n in (
        ("deliveries", 1),
        ("delivery_events", 3),
        ("provider_events", 1),
        ("suppressions", 1),
    ):
        assert admin.execute(f"SELECT count(*) AS n FROM email.{table}").fetchone() == {"n": n}
    for statement in (
        "INSERT INTO email.suppressions (address, reason) VALUES ('x@y.z', 'manual')",
        "UPDATE email.suppressions SET expires_at = now()",
        "DELETE FROM email.suppressions",
        "INSERT INTO email.provider_events (provider, provider_event_id, event_type, occurred_at)"
        " VALUES ('x', 'y', 'opened', now())",
        "UPDATE email.provider_events SET detail = '{}'",
        "DELETE FROM email.provider_events",
        "UPDATE email.deliveries SET provider_status = 'clicked'",
        "SELECT email.apply_provider_event('x', 'y', 'opened', now())",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute(statement)


def test_an_outsider_sees_nothing_new(admin: psycopg.Connection[Any]) -> None:
    role = f"outsider_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        admin.execute(f"SET ROLE {role}")
        for statement in (
            "SELECT * FROM email.provider_events",
            "SELECT * FROM email.suppressions",
            "SELECT email.apply_provider_event('x', 'y', 'opened', now())",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute(statement)
    finally:
        admin.execute("RESET ROLE")
        admin.execute(f"DROP ROLE {role}")


def test_events_through_a_transaction_mode_pooler(
    admin: psycopg.Connection[Any], pooled_database_url: str, ledger: Ledger
) -> None:
    """No session state: the provider name for the audit row is set per transaction."""
    delivery_ids = [sent(ledger) for _ in range(6)]
    kinds = [("delivered", 1), ("opened", 2), ("clicked", 3), ("opened", 4)]
    with (
        ConnectionPool(
            pooled_database_url,
            max_size=8,
            kwargs=connection_kwargs(DatabaseSettings(url=pooled_database_url)),
        ) as pool,
        ThreadPoolExecutor(8) as executor,
    ):
        tracking = Tracking(pool)
        jobs = [(d, kind) for d in delivery_ids for kind in kinds for _ in range(2)]
        outcomes = list(
            executor.map(
                lambda job: tracking.apply(
                    event(job[1][0], job[1][1], delivery_id=job[0], event_id=f"{job[0]}{job[1]}")
                ),
                jobs,
            )
        )
    assert outcomes.count(Applied.APPLIED) == len(jobs) // 2
    assert outcomes.count(Applied.DUPLICATE) == len(jobs) // 2
    for delivery_id in delivery_ids:
        state = row(admin, delivery_id)
        assert (state["provider_status"], state["opened_at"]) == ("clicked", at(2))
        assert {p["provider"] for p in provider_audit(admin, delivery_id)} == {"sendgrid"}
