"""Provider events against a real PostgreSQL (docs/webhooks.md): the order enforced by the
database for every writer, matching, the earliest times whatever the arrival order,
duplicates, suppressions, concurrency, and each role's rights on the new tables."""

from __future__ import annotations

import hashlib
import itertools
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from tests.harness.postgres import free_port
from worker.core.settings import DatabaseSettings
from worker.store.db import connection_kwargs
from worker.store.ledger import Ledger
from worker.store.migrations import discover, migrate_down, migrate_up
from worker.store.tracking import (
    Applied,
    EventType,
    ProviderEvent,
    ProviderStatus,
    Tracking,
    Unreachable,
    WebhookTokens,
    allowed,
)

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
    one (migration 005). Its row dates from before T0, so that the events' times (T0 on) are
    ones the email can have had (migration 008 clamps the others)."""
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
    with ledger.pool.connection() as conn:
        conn.execute(
            "UPDATE email.deliveries SET relay_message_id = %s, created_at = %s,"
            " queued_at = %s, sent_at = %s WHERE delivery_id = %s",
            (relay_id, *[T0 - timedelta(hours=1)] * 3, delivery_id),
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
    recipient: str | None = None,
    bounce_type: str | None = None,
    occurred_at: datetime | None = None,
) -> ProviderEvent:
    return ProviderEvent(
        provider=provider,
        provider_event_id=event_id or uuid.uuid4().hex,
        event_type=EventType(kind),
        occurred_at=occurred_at or T0 + timedelta(minutes=minute),
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


def recipient_of(admin: psycopg.Connection[Any], delivery_id: str) -> str:
    found = admin.execute(
        "SELECT recipient FROM email.deliveries WHERE delivery_id = %s", (delivery_id,)
    ).fetchone()
    assert found is not None
    return str(found["recipient"])


@pytest.mark.parametrize("key", ["delivery_id", "message_id", "relay_message_id"])
def test_an_event_naming_someone_else_is_kept_unmatched_and_suppresses_no_one(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking, key: str
) -> None:
    """A signed bounce naming a delivery but another recipient acts on nobody, whichever key
    names the delivery."""
    relay_id = f"relay-{uuid.uuid4().hex}"
    victim = sent(ledger, relay_id=relay_id)
    keys: dict[str, Any] = {
        "delivery_id": victim,
        "message_id": f"<{victim}@example.com>",
        "relay_message_id": relay_id,
    }
    forged = replace(
        event("bounced", 1, recipient="mallory@example.com", bounce_type="hard"),
        **{key: keys[key]},
    )

    assert tracking.apply(forged) is Applied.UNMATCHED
    assert row(admin, victim)["provider_status"] is None
    assert suppressions(admin) == []
    assert tracking.events(victim) == []
    stored = admin.execute(
        "SELECT delivery_id, recipient FROM email.provider_events WHERE provider_event_id = %s",
        (forged.provider_event_id,),
    ).fetchone()
    assert stored == {"delivery_id": None, "recipient": "mallory@example.com"}


@pytest.mark.parametrize(
    "spelling",
    ["{r}", "  {R}  ", "{R}", "Ada Lovelace <{R}>"],
    ids=["same", "spaces", "case", "name"],
)
def test_the_recipient_is_compared_normalised(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking, spelling: str
) -> None:
    delivery_id = sent(ledger, recipient="Ada.Lovelace+x@Example.com")
    named = spelling.format(r="Ada.Lovelace+x@Example.com", R="ada.lovelace+X@example.COM")
    assert tracking.apply(event("bounced", 1, delivery_id=delivery_id, recipient=named)) is (
        Applied.APPLIED
    )
    assert row(admin, delivery_id)["provider_status"] == "bounced"
    assert [s["address"] for s in suppressions(admin)] == ["ada.lovelace+x@example.com"]


def unsent(admin: psycopg.Connection[Any], status: str) -> str:
    """A delivery that never reached the relay: ended `status` by the worker."""
    delivery_id = next(_ids)
    admin.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
        " provider_message_id, created_at, queued_at)"
        " VALUES (%s, 'password-reset', %s, %s, %s, %s, %s)",
        (
            delivery_id,
            f"ada+{delivery_id}@example.com",
            status,
            f"<{delivery_id}@example.com>",
            T0 - timedelta(hours=1),
            T0 - timedelta(hours=1),
        ),
    )
    return delivery_id


@pytest.mark.parametrize(
    ("status", "kind"),
    [("skipped", "bounced"), ("failed", "delivered"), ("failed", "complained")],
)
def test_an_event_for_an_email_never_sent_is_kept_and_changes_nothing(
    admin: psycopg.Connection[Any], tracking: Tracking, status: str, kind: str
) -> None:
    delivery_id = unsent(admin, status)
    recipient = recipient_of(admin, delivery_id)
    before = row(admin, delivery_id)

    outcome = tracking.apply(
        event(kind, 1, delivery_id=delivery_id, recipient=recipient, bounce_type="hard")
    )

    assert outcome is Applied.APPLIED  # recorded, as a soft bounce is
    assert [e.event_type for e in tracking.events(delivery_id)] == [kind]
    assert row(admin, delivery_id) == before
    assert provider_audit(admin, delivery_id) == []
    assert suppressions(admin) == []


def stored_time(admin: psycopg.Connection[Any], provider_event_id: str) -> dict[str, Any]:
    found = admin.execute(
        "SELECT occurred_at, received_at, detail FROM email.provider_events"
        " WHERE provider_event_id = %s",
        (provider_event_id,),
    ).fetchone()
    assert found is not None
    return dict(found)


def test_a_time_far_in_the_future_is_clamped_to_the_receipt_and_flagged(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    delivery_id = sent(ledger)
    year_5138 = datetime.fromtimestamp(1e11, tz=UTC)  # a timestamp in milliseconds, misread
    delivered = event("delivered", 0, delivery_id=delivery_id, occurred_at=year_5138)
    lost = event("opened", 0, delivery_id="nobody", occurred_at=year_5138)

    assert tracking.apply(delivered) is Applied.APPLIED
    assert tracking.apply(lost) is Applied.UNMATCHED

    for provider_event_id in (delivered.provider_event_id, lost.provider_event_id):
        stored = stored_time(admin, provider_event_id)
        assert stored["occurred_at"] == stored["received_at"]
        assert stored["detail"] == {"occurred_at_clamped": "5138-11-16T09:46:40.000000Z"}
    assert (
        row(admin, delivery_id)["delivered_at"]
        == stored_time(admin, delivered.provider_event_id)["received_at"]
    )


def test_a_time_long_before_the_email_existed_is_clamped(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    delivery_id = sent(ledger)  # created an hour before T0
    early = event(
        "bounced", 0, delivery_id=delivery_id, occurred_at=T0 - timedelta(hours=1, minutes=6)
    )
    tracking.apply(early)
    stored = stored_time(admin, early.provider_event_id)
    assert stored["occurred_at"] == stored["received_at"] == row(admin, delivery_id)["bounced_at"]
    assert stored["detail"] == {"occurred_at_clamped": "2026-11-23T07:54:00.000000Z"}


def test_a_time_long_before_the_send_is_clamped_even_after_the_row_existed(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    # Created two hours before T0, retried, sent one hour before: a delivery report from
    # between the two is from before the relay had the email.
    delivery_id = sent(ledger)
    admin.execute(
        "UPDATE email.deliveries SET created_at = %s WHERE delivery_id = %s",
        (T0 - timedelta(hours=2), delivery_id),
    )
    early = event(
        "delivered", 0, delivery_id=delivery_id, occurred_at=T0 - timedelta(hours=1, minutes=30)
    )
    tracking.apply(early)
    stored = stored_time(admin, early.provider_event_id)
    assert stored["occurred_at"] == stored["received_at"] == row(admin, delivery_id)["delivered_at"]
    assert stored["detail"] == {"occurred_at_clamped": "2026-11-23T07:30:00.000000Z"}


def test_times_within_the_bounds_are_kept_as_given(
    admin: psycopg.Connection[Any], ledger: Ledger, tracking: Tracking
) -> None:
    delivery_id = sent(ledger)
    now = datetime.now(UTC)
    # The provider's clock a little behind ours, and an hour ahead less a minute.
    skewed = T0 - timedelta(hours=1, minutes=4)
    ahead = now + timedelta(minutes=59)
    for kind, when in (("delivered", skewed), ("opened", ahead)):
        given = event(kind, 0, delivery_id=delivery_id, occurred_at=when)
        tracking.apply(given)
        stored = stored_time(admin, given.provider_event_id)
        assert (stored["occurred_at"], stored["detail"]) == (when, {})
    assert row(admin, delivery_id)["delivered_at"] == skewed


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


# --- used signature tokens (Mailgun) -----------------------------------------------------


def tokens_of(pool: ConnectionPool) -> WebhookTokens:
    return WebhookTokens(lambda: pool)


def test_a_token_is_used_once_per_provider(
    admin: psycopg.Connection[Any], pool: ConnectionPool
) -> None:
    first, second = tokens_of(pool), tokens_of(pool)  # two instances, one database
    token = uuid.uuid4().hex + uuid.uuid4().hex[:18]
    assert first.first_use("mailgun", token, 660) is True
    assert first.first_use("mailgun", token, 660) is False
    assert second.first_use("mailgun", token, 660) is False
    assert second.first_use("other", token, 660) is True
    # Only the token's digest is kept, and only for the window.
    rows = admin.execute(
        "SELECT provider, token_sha256, expires_at - now() AS kept FROM email.webhook_tokens"
        " ORDER BY provider"
    ).fetchall()
    assert [(r["provider"], bytes(r["token_sha256"])) for r in rows] == [
        ("mailgun", hashlib.sha256(token.encode()).digest()),
        ("other", hashlib.sha256(token.encode()).digest()),
    ]
    assert all(r["kept"] <= timedelta(seconds=660) for r in rows)
    assert token not in dump(admin)


def dump(admin: psycopg.Connection[Any]) -> str:
    return "\n".join(
        str(r["t"]) for r in admin.execute("SELECT t::text AS t FROM email.webhook_tokens t")
    )


def test_concurrent_claims_of_one_token_admit_exactly_one(database_url: str) -> None:
    with (
        ConnectionPool(database_url, min_size=8, max_size=8, kwargs={"autocommit": True}) as pool,
        ThreadPoolExecutor(8) as executor,
    ):
        pool.wait()
        tokens = tokens_of(pool)
        for n in range(10):
            barrier = threading.Barrier(8)

            def claim(_: int, token: str = f"token-{n}", b: Any = barrier) -> bool:
                b.wait()
                return tokens.first_use("mailgun", token, 660)

            assert sorted(executor.map(claim, range(8))) == [False] * 7 + [True]


def test_expired_tokens_are_forgotten_by_the_next_claim(
    admin: psycopg.Connection[Any], pool: ConnectionPool
) -> None:
    admin.execute(
        "INSERT INTO email.webhook_tokens (provider, token_sha256, expires_at)"
        " SELECT 'mailgun', sha256(n::text::bytea), now() - n * interval '1 second'"
        " FROM generate_series(1, 150) AS n"
    )
    live = tokens_of(pool)
    assert live.first_use("mailgun", "fresh-1", 660)
    left = admin.execute("SELECT count(*) AS n FROM email.webhook_tokens").fetchone()
    assert left == {"n": 150 - 100 + 1}  # at most 100 a claim: each claim stays short
    assert live.first_use("mailgun", "fresh-2", 660)
    assert admin.execute(
        "SELECT count(*) AS n FROM email.webhook_tokens WHERE expires_at < now()"
    ).fetchone() == {"n": 0}


def test_an_unreachable_database_is_unreachable_never_a_first_use() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with (
        ConnectionPool(url, min_size=0, max_size=1, timeout=1, open=True) as pool,
        pytest.raises(Unreachable),
    ):
        tokens_of(pool).first_use("mailgun", "t", 660)


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


def test_the_worker_claims_tokens_and_forgets_only_expired_ones(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(
        "INSERT INTO email.webhook_tokens (provider, token_sha256, expires_at) VALUES"
        " ('mailgun', sha256('old'), now() - interval '1 second'),"
        " ('mailgun', sha256('live'), now() + interval '5 minutes')"
    )

    def as_worker(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET ROLE email_worker")

    with ConnectionPool(database_url, kwargs={"autocommit": True}, configure=as_worker) as pool:
        tokens = tokens_of(pool)
        assert tokens.first_use("mailgun", "new", 660) is True
        assert tokens.first_use("mailgun", "new", 660) is False
        with pool.connection() as conn:
            # Row-level security: a live token cannot be forgotten, nor changed.
            assert conn.execute("DELETE FROM email.webhook_tokens").rowcount == 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE email.webhook_tokens SET expires_at = now()")
    left = admin.execute(
        "SELECT token_sha256 FROM email.webhook_tokens ORDER BY expires_at"
    ).fetchall()
    assert [bytes(r["token_sha256"]) for r in left] == [
        hashlib.sha256(b"live").digest(),
        hashlib.sha256(b"new").digest(),
    ]
    outsider = f"outsider_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE ROLE {outsider} NOLOGIN")
    try:
        for role in ("email_reader", outsider):
            admin.execute(f"SET ROLE {role}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                admin.execute("SELECT count(*) FROM email.webhook_tokens")
            admin.execute("RESET ROLE")
    finally:
        admin.execute("RESET ROLE")
        admin.execute(f"DROP ROLE {outsider}")


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


# --- the migration --------------------------------------------------------------------------


def test_migration_008_goes_down_to_the_previous_function_word_for_word_and_up_again(
    empty_database_url: str,
) -> None:
    url = empty_database_url

    def quiet(_line: str) -> None:
        pass

    def state() -> tuple[str, bool]:
        with psycopg.connect(url) as conn:
            found = conn.execute(
                "SELECT pg_get_functiondef('email.apply_provider_event(text, text, text,"
                " timestamptz, text, text, text, text, text, jsonb)'::regprocedure),"
                " to_regclass('email.webhook_tokens') IS NOT NULL"
            ).fetchone()
        assert found is not None
        return str(found[0]), bool(found[1])

    # Up to 008 only: the test is about this one, whatever later migrations add.
    through_008 = [m for m in discover() if m.version <= 8]
    migrate_up(url, [m for m in through_008 if m.version <= 7], report=quiet)
    before = state()
    assert before[1] is False
    migrate_up(url, through_008, report=quiet)
    after = state()
    assert after[1] is True and after[0] != before[0]
    assert [m.version for m in migrate_down(url, migrations=through_008, report=quiet)] == [8]
    assert state() == before
    assert [m.version for m in migrate_up(url, through_008, report=quiet)] == [8]
    assert state() == after
