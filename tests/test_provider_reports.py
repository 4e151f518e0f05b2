"""What operators see of provider events (docs/reference.md and docs/webhooks.md): `status`
shows the provider status, its times and the events; `stats` the delivered, bounced and complained
rates per workflow and the skipped count; `prune` takes provider events with their delivery."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from worker.ops import cli
from worker.store.ledger import Ledger
from worker.store.tracking import EventType, ProviderEvent, Tracking

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
_ids = (f"rep-{n}" for n in itertools.count())


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert cli.main(list(args)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def sent(ledger: Ledger, workflow: str = "invite", *, backdate: bool = False) -> str:
    delivery_id = next(_ids)
    claim = ledger.claim(
        delivery_id=delivery_id,
        workflow=workflow,
        # Its own address: a bounce reported below suppresses it (migration 005).
        recipient=f"Ada+{delivery_id}@example.com",
        locale="en",
        metadata=None,
        source_message_id=None,
        lease_seconds=60,
    )
    assert claim is not None
    assert ledger.set_sent_if_claimed(
        claim, attempts=1, provider_message_id=f"<{delivery_id}@example.com>"
    )
    if not backdate:
        return delivery_id
    # Sent an hour before T0, for tests that read the reports' times: a provider time before
    # the send is not one this email had, and would be taken as the receipt time.
    with ledger.pool.connection() as conn:
        conn.execute(
            "UPDATE email.deliveries SET created_at = %s, queued_at = %s, sent_at = %s"
            " WHERE delivery_id = %s",
            (*[T0 - timedelta(hours=1)] * 3, delivery_id),
        )
    return delivery_id


def report(ledger: Ledger, delivery_id: str, kind: str, minute: int, **extra: Any) -> None:
    Tracking(ledger.pool).apply(
        ProviderEvent(
            provider=extra.pop("provider", "sendgrid"),
            provider_event_id=f"{delivery_id}-{kind}-{minute}",
            event_type=EventType(kind),
            occurred_at=T0 + timedelta(minutes=minute),
            recipient=f"ada+{delivery_id}@example.com",
            delivery_id=delivery_id,
            message_id=None,
            relay_message_id=None,
            **extra,
        )
    )


def test_status_shows_the_provider_status_its_times_and_events(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    delivery_id = sent(ledger, backdate=True)
    report(ledger, delivery_id, "opened", 7)
    report(ledger, delivery_id, "delivered", 2, provider="ses")
    report(ledger, delivery_id, "bounced", 9, bounce_type="hard")  # too late: opened

    out = ok(capsys, "status", delivery_id)
    head, changes, events = out.split("\n\n")
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in head.splitlines())
    assert fields["provider status"] == "opened"
    assert (fields["delivered at"], fields["first opened at"]) == (
        "2026-11-23 09:02:00+00:00",
        "2026-11-23 09:07:00+00:00",
    )
    # The late bounce fills its own fields, and moves nothing back.
    assert (fields["bounced at"], fields["bounce type"]) == ("2026-11-23 09:09:00+00:00", "hard")
    assert fields["first clicked at"] == "-"
    # The provider-status change sits in the history beside the delivery status changes.
    rows = [line.split() for line in changes.splitlines()[1:]]
    assert [(r[2], r[3]) for r in rows] == [
        ("in_progress", "-"),
        ("sent", "in_progress"),
        ("provider:", "opened"),
    ]
    assert rows[2][-2:] == ["sendgrid", "-"]  # REASON: who reported it; no ERROR
    lines = events.splitlines()
    assert lines[0].split() == [
        "OCCURRED",
        "RECEIVED",
        "PROVIDER",
        "EVENT",
        "BOUNCE_TYPE",
        "PROVIDER_EVENT_ID",
    ]
    assert [line.split()[5] for line in lines[1:]] == ["delivered", "opened", "bounced"]
    assert lines[3].split()[4:7] == ["sendgrid", "bounced", "hard"]

    doc = json.loads(ok(capsys, "status", delivery_id, "--json"))
    assert doc["delivery"]["provider_status"] == "opened"
    assert [e["event_type"] for e in doc["provider_events"]] == ["delivered", "opened", "bounced"]
    assert doc["events"][-1]["payload"] == {
        "provider_status": "opened",
        "provider": "sendgrid",
    }


def test_stats_rates_and_skipped(
    admin: psycopg.Connection[Any], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    invites = [sent(ledger) for _ in range(5)]
    for delivery_id, kind in zip(
        invites[:4], ["delivered", "clicked", "bounced", "complained"], strict=True
    ):
        report(ledger, delivery_id, kind, 1)
    report(ledger, invites[0], "deferred", 0)  # no status: counts for nothing
    sent(ledger, "password-reset")
    admin.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
        " last_error_code) VALUES ('skip-1', 'password-reset', 'a@example.com', 'skipped',"
        " 'SUPPRESSED')"
    )
    doc = json.loads(ok(capsys, "stats", "--json"))
    rows = {row["workflow"]: row for row in doc["workflows"]}
    invite, reset = rows["invite"], rows["password-reset"]
    assert invite["provider"] == {"delivered": 3, "bounced": 1, "complained": 1}
    assert (invite["delivered_rate"], invite["bounce_rate"], invite["complaint_rate"]) == (
        pytest.approx(3 / 5),
        pytest.approx(1 / 5),
        pytest.approx(1 / 5),
    )
    # Skipped is counted, and left out of the success rate: it was never attempted.
    assert (reset["counts"]["skipped"], reset["success_rate"]) == (1, 1.0)
    assert (reset["delivered_rate"], reset["bounce_rate"]) == (0.0, 0.0)

    lines = ok(capsys, "stats").splitlines()
    header = lines[1].split()
    invite_line = dict(zip(header, lines[2].split(), strict=True))
    assert (invite_line["DELIVERED"], invite_line["BOUNCED"], invite_line["COMPLAINED"]) == (
        "60.0%",
        "20.0%",
        "20.0%",
    )
    assert invite_line["SKIPPED"] == "0"


def test_prune_takes_skipped_rows_and_provider_events_with_them(
    admin: psycopg.Connection[Any], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    delivery_id = sent(ledger)
    report(ledger, delivery_id, "bounced", 1)
    admin.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
        " last_error_code) VALUES ('skip-2', 'invite', 'a@example.com', 'skipped', 'SUPPRESSED')"
    )
    with admin.transaction():
        admin.execute("SET LOCAL session_replication_role = replica")  # backdate, no triggers
        admin.execute("UPDATE email.deliveries SET updated_at = now() - interval '100 days'")
    out = ok(capsys, "prune", "--older-than", "90d")
    assert out.startswith("deleted 2 deliveries")
    counts = admin.execute(
        "SELECT (SELECT count(*) FROM email.deliveries), (SELECT count(*) FROM"
        " email.provider_events), (SELECT count(*) FROM email.suppressions),"
        " (SELECT delivery_id FROM email.suppressions)"
    ).fetchone()
    # The suppression outlives the delivery that caused it.
    assert counts == (0, 0, 1, None)


def test_prune_takes_old_unmatched_events(
    admin: psycopg.Connection[Any], ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(3):
        report(ledger, f"nobody-{n}", "bounced", n)
    admin.execute(
        "UPDATE email.provider_events SET received_at = now() - interval '100 days'"
        " WHERE provider_event_id <> 'nobody-2-bounced-2'"
    )
    assert ok(capsys, "prune", "--older-than", "90d", "--dry-run").splitlines()[-1] == (
        "would delete 2 unmatched provider events (received more than 90d ago)"
    )
    out = ok(capsys, "prune", "--older-than", "90d", "--batch-size", "1")
    assert out.splitlines() == [
        "deleted 0 deliveries and 0 events (finished, last updated more than 90d ago) in 0"
        " batch(es)",
        "deleted 2 unmatched provider events (received more than 90d ago)",
    ]
    assert admin.execute("SELECT provider_event_id FROM email.provider_events").fetchall() == [
        ("nobody-2-bounced-2",)
    ]
