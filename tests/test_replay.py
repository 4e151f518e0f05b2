"""`python -m worker replay` against PostgreSQL, the Pub/Sub emulator and aiosmtpd: dead letters
the worker made and ones Pub/Sub's dead-letter policy forwarded go back on the delivery topic,
the worker then sends each exactly once, and nothing is replayed twice or lost."""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cloudevents.http import CloudEvent

from tests import factories
from tests.harness.function import FunctionServer
from tests.harness.postgres import wait_until
from tests.harness.pubsub import PubSubNamespace
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import MakeWorker
from worker.core import pubsub as worker_pubsub
from worker.core.settings import pubsub_settings
from worker.delivery.config import RetrySettings
from worker.delivery.pipeline import RetryLater, Worker, handle
from worker.ops import cli
from worker.ops import replay as worker_replay
from worker.store.ledger import Ledger, Status, StatusChange

WAIT = "0.5"  # seconds of empty pulls that end a run: the emulator answers at once
RETRY = RetrySettings(
    max_attempts=5,
    tries_per_invocation=1,
    initial_backoff_seconds=0.01,
    max_backoff_seconds=0.02,
    lease_seconds=30,
)


@pytest.fixture
def worker(make_worker: MakeWorker) -> Worker:
    return make_worker(RETRY)


def replay(capsys: pytest.CaptureFixture[str], pubsub: PubSubNamespace, *args: str) -> str:
    """Run `replay` in-process on the namespace's dead-letter subscription; its stdout."""
    code, out, err = run(capsys, "replay", "--subscription", pubsub.dead_letter_subscription, *args)
    assert (code, err) == (0, ""), out
    return out


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([*args, "--wait", WAIT])
    out, err = capsys.readouterr()
    return code, out, err


def summary(out: str) -> str:
    return out.strip().splitlines()[-1]


def as_event(received: Any) -> CloudEvent:
    """A message pulled from the delivery subscription, as the function would receive it."""
    message = received.message
    return factories.cloud_event(
        bytes(message.data), message_id=message.message_id, attributes=dict(message.attributes)
    )


def publish_dead_letter(
    pubsub: PubSubNamespace, body: dict[str, Any] | bytes, **attributes: str
) -> str:
    """A dead letter as the worker writes it (docs/reference.md)."""
    defaults = {
        "reason": "permanent_failure",
        "error_code": "SMTP_550",
        "error_message": "5.1.1 no such user",
        "attempts": "1",
        "source_message_id": "m-1",
    }
    if isinstance(body, dict):
        defaults |= {"delivery_id": body["delivery_id"], "workflow": body["workflow"]}
    return pubsub.emulator.publish(
        pubsub.dead_letter_topic, factories.encode(body), **(defaults | attributes)
    )


def delivery_ids(received: list[Any]) -> list[str]:
    return sorted(json.loads(m.message.data)["delivery_id"] for m in received)


def statuses(ledger: Ledger, delivery_id: str) -> list[Status]:
    return [e.status for e in status_changes(ledger, delivery_id)]


def status_changes(ledger: Ledger, delivery_id: str) -> list[StatusChange]:
    """The audit trail's status changes (failed attempts' rows left out)."""
    return [e for e in ledger.events(delivery_id) if not e.attempt_failed]


# --- the two kinds of dead letter -------------------------------------------------------------


def test_a_worker_dead_letter_is_replayed_and_sent_exactly_once(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = factories.payload("invite", recipient="gone@example.com")
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    handle(factories.cloud_event(body), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.FAILED
    smtp_server.reset()  # the mailbox exists now

    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0"
    line = next(line for line in out.splitlines() if body["delivery_id"] in line)
    assert line.split()[:6] == [
        "replayed",
        body["delivery_id"],
        "invite",
        "permanent_failure",
        "SMTP_550",
        "row",
    ]
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.attempts, row.replays) == (Status.QUEUED, 0, 1)

    [republished] = pubsub.deliveries(timeout=5)
    assert bytes(republished.message.data) == factories.encode(body)
    assert set(republished.message.attributes) == {"replayed_from"}
    handle(as_event(republished), worker)
    handle(as_event(republished), worker)  # a duplicate delivery changes nothing

    assert [m.rcpt_tos for m in smtp_server.messages] == [("gone@example.com",)]
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.replays, row.attempts) == (Status.SENT, 1, 1)
    assert statuses(ledger, body["delivery_id"]) == [
        Status.IN_PROGRESS,
        Status.FAILED,
        Status.QUEUED,
        Status.IN_PROGRESS,
        Status.SENT,
    ]
    queued = status_changes(ledger, body["delivery_id"])[2]
    assert queued.payload["reason"] == "replay" and queued.payload["replays"] == 1

    # A second run finds nothing: the dead letter was acked after the republish.
    assert summary(replay(capsys, pubsub)) == "replayed 0, skipped 0, failed 0, left for later 0"
    assert pubsub.deliveries(timeout=0.5) == []


def test_a_dead_letter_forwarded_by_the_pubsub_policy_is_replayed(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    emulator = pubsub.emulator
    policy_sub = emulator.create_pull_subscription(
        pubsub.delivery_topic,
        f"policy-{uuid.uuid4().hex[:12]}",
        dead_letter_topic=pubsub.dead_letter_topic,
        max_delivery_attempts=5,
    )
    body = factories.payload("password-reset")
    # The worker saw it once and asked for a retry; Pub/Sub then gave up on the message.
    smtp_server.fail_next(1, 451, "4.3.0 try again later")
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(body), worker)
    emulator.publish(pubsub.delivery_topic, factories.encode(body), origin="upstream")
    pubsub.deliveries(timeout=5)  # drain the harness's own copy of the original

    letters: list[Any] = []

    def forwarded() -> bool:
        """Nack the delivery until the emulator gives up on it; peek at the dead letter."""
        for received in emulator.pull_once(policy_sub):
            emulator.nack(policy_sub, [received.ack_id])
        letters.extend(emulator.pull_once(pubsub.dead_letter_subscription))
        if letters:  # only looking: hand it back for the replay
            emulator.nack(pubsub.dead_letter_subscription, [m.ack_id for m in letters])
        return bool(letters)

    wait_until(forwarded, timeout=20)
    attributes = dict(letters[0].message.attributes)
    assert attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
    assert attributes["CloudPubSubDeadLetterSourceSubscription"].endswith(policy_sub.split("/")[-1])
    assert "reason" not in attributes and attributes["origin"] == "upstream"
    emulator.delete_subscription(policy_sub)  # it would pull the republished copy too

    out = replay(capsys, pubsub, "--reason", "pubsub_dead_letter_policy")
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0"
    assert "abandoned row closed and requeued" in out and "password-reset" in out
    [republished] = pubsub.deliveries(timeout=5)
    assert dict(republished.message.attributes) == {
        "origin": "upstream",
        "replayed_from": letters[0].message.message_id,
    }
    smtp_server.reset()
    handle(as_event(republished), worker)

    assert len(smtp_server.messages) == 1
    events = status_changes(ledger, body["delivery_id"])
    assert [e.status for e in events] == [
        Status.IN_PROGRESS,
        Status.RETRYING,
        Status.DEAD_LETTER,
        Status.QUEUED,
        Status.IN_PROGRESS,
        Status.SENT,
    ]
    assert events[2].payload["reason"] == "pubsub_dead_letter_policy"
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.replays) == (Status.SENT, 1)


def test_a_dead_letter_still_invalid_is_left_and_its_row_untouched(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Republished, the same bytes would be refused and dead-lettered again, run after run:
    replay checks them with the worker's own rules, leaves them on the subscription and the
    ledger row `failed` as it is."""
    body = factories.payload("invite", data={"organization_name": "Acme"})  # no invite_url
    handle(factories.cloud_event(body, message_id="m-invalid"), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.last_error_code) == (
        Status.FAILED,
        "INVALID_EVENT",
    )

    for args in ((), ("--reason", "invalid_event"), ("--delivery-id", body["delivery_id"])):
        out = replay(capsys, pubsub, *args)
        assert summary(out) == "replayed 0, skipped 1, failed 0, left for later 0"
        line = next(line for line in out.splitlines() if body["delivery_id"] in line)
        assert line.split()[0] == "skipped"
        assert "still invalid, not republished" in line
        assert "data.invite_url: required" in line
    assert pubsub.deliveries(timeout=0.5) == []
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.replays) == (Status.FAILED, 0)
    assert statuses(ledger, body["delivery_id"]) == [Status.FAILED]
    [letter] = pubsub.dead_letters(timeout=5)  # still there, for whoever fixes the event
    assert bytes(letter.message.data) == factories.encode(body)
    assert smtp_server.messages == []


def test_an_invalid_event_dead_letter_valid_by_todays_rules_is_replayed(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A dead letter the worker refused under older rules (an RFC 3339 `expires_at`) is
    valid now: replay puts it back and it is sent."""
    data = dict(factories.DATA["invite"], expires_at="2030-12-01T12:00:00Z")
    body = factories.payload("invite", data=data)
    publish_dead_letter(
        pubsub,
        body,
        reason="invalid_event",
        error_code="INVALID_EVENT",
        error_message="data.expires_at: optional, but when given must be a date",
    )
    out = replay(capsys, pubsub, "--reason", "invalid_event")
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0"
    [republished] = pubsub.deliveries(timeout=5)
    handle(as_event(republished), worker)
    [email] = smtp_server.messages
    text = email.message.get_body(("plain",))
    assert text is not None and "expires on December 1, 2030" in text.get_content()


# --- dead letters of any size Pub/Sub allows ----------------------------------------------------


def oversized(size: int) -> bytes:
    """A delivery event padded to `size` bytes: over the 64 KiB rule, so an invalid event."""
    raw = factories.encode(factories.payload())
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_a_five_megabyte_dead_letter_does_not_stop_replay(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The client library's emulator channel receives at most 4 MiB: a 5.2 MB dead letter
    made every pull fail, with any filter, until someone removed it by hand."""
    poison = oversized(5_200_000)
    handle(factories.cloud_event(poison, message_id="m-poison"), worker)  # dead-lettered
    good = factories.payload(recipient="gone@example.com")
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    handle(factories.cloud_event(good), worker)
    smtp_server.reset()

    out = replay(capsys, pubsub, "--delivery-id", "not-there")
    assert summary(out) == "replayed 0, skipped 0, failed 0, left for later 2"
    out = replay(capsys, pubsub, "--reason", "invalid_event")
    assert summary(out) == "replayed 0, skipped 1, failed 0, left for later 1"
    assert "message.data: must be at most 65536 bytes" in out
    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 1, skipped 1, failed 0, left for later 0"
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [good["delivery_id"]]

    # Never republished; still on the subscription with its bytes unchanged.
    [letter] = pubsub.emulator.pull(pubsub.dead_letter_subscription, timeout=5)
    assert bytes(letter.message.data) == poison
    assert letter.message.attributes["reason"] == "invalid_event"


def test_a_pull_too_large_to_receive_is_reported_and_the_rest_replayed(
    pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    """With a 1 MiB client (standing in for messages beyond any limit): a response holding
    several big messages is lost, so the run pulls one at a time and waits out the ack
    deadline for them; one message larger than the limit on its own is counted, not fatal."""
    big = [oversized(600_000), oversized(600_001)]
    too_big = oversized(1_500_000)
    good = factories.payload()
    for data in (*big, too_big):
        publish_dead_letter(pubsub, data, reason="invalid_event", error_code="INVALID_EVENT")
    publish_dead_letter(pubsub, good)

    items: list[worker_replay.Item] = []
    client = worker_pubsub.subscriber_client(max_bytes=1024 * 1024)
    try:
        result = worker_replay.replay(
            ledger,
            pubsub.settings,
            worker_replay.ReplayOptions(
                subscription=pubsub.dead_letter_subscription, wait_seconds=0.5
            ),
            on_item=items.append,
            subscriber=client,
        )
    finally:
        client.close()

    assert (result.replayed, result.skipped, result.failed, result.left) == (1, 2, 0, 0)
    assert result.too_large >= 1  # the 1.5 MB one, each time it came back during the run
    invalid = [i for i in items if i.action is worker_replay.Action.SKIP_INVALID]
    assert sorted(len(i.letter.data) for i in invalid) == [600_000, 600_001]
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [good["delivery_id"]]
    # Nothing was lost: the three invalid ones are all still there (the 1.5 MB one once its
    # lost pull's ack deadline has passed).
    left: list[Any] = []

    def all_three() -> bool:
        batch = pubsub.emulator.pull_once(pubsub.dead_letter_subscription, 1)
        if batch:
            pubsub.emulator.acknowledge(pubsub.dead_letter_subscription, [batch[0].ack_id])
        left.extend(batch)
        return len(left) == 3

    wait_until(all_three, timeout=30)
    assert sorted(len(m.message.data) for m in left) == [600_000, 600_001, 1_500_000]


def test_the_too_large_count_is_shown_in_the_summary() -> None:
    text = cli._replay_summary(worker_replay.Summary(dry_run=False, replayed=2, too_large=1))
    assert text == "replayed 2, skipped 0, failed 0, left for later 0, too large to receive 1"


# --- what is and is not replayed ------------------------------------------------------------


def test_filters_leave_other_messages_for_a_later_run(
    pubsub: PubSubNamespace, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    invite = factories.payload("invite")
    reset = factories.payload("password-reset")
    publish_dead_letter(pubsub, invite)
    publish_dead_letter(pubsub, reset, reason="retries_exhausted", error_code="SMTP_421")
    publish_dead_letter(pubsub, b"{not json", reason="invalid_event", error_code="INVALID_EVENT")

    out = replay(capsys, pubsub, "--reason", "retries_exhausted")
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 2"
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [reset["delivery_id"]]

    out = replay(capsys, pubsub, "--workflow", "invite")
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 1"
    out = replay(capsys, pubsub, "--delivery-id", "not-there")
    assert summary(out) == "replayed 0, skipped 0, failed 0, left for later 1"
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [invite["delivery_id"]]

    out = replay(capsys, pubsub)  # the invalid one would fail again: left where it is
    assert summary(out) == "replayed 0, skipped 1, failed 0, left for later 0"
    assert pubsub.deliveries(timeout=0.5) == []
    [invalid] = pubsub.dead_letters(timeout=5)
    assert bytes(invalid.message.data) == b"{not json"


def test_dry_run_lists_and_changes_nothing(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = factories.payload(recipient="gone@example.com")
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    handle(factories.cloud_event(body), worker)
    unknown = factories.payload("invite")
    publish_dead_letter(pubsub, unknown, reason="invalid_event", error_code="INVALID_EVENT")
    before = ledger.get(body["delivery_id"])

    out = replay(capsys, pubsub, "--dry-run")
    assert summary(out) == (
        "would replay 2, skipped 0, failed 0, left for later 0 (dry run: nothing changed)"
    )
    lines = out.splitlines()
    assert lines[0].split() == [
        "OUTCOME",
        "DELIVERY_ID",
        "WORKFLOW",
        "REASON",
        "ERROR_CODE",
        "DECISION",
    ]
    rows = {line.split()[2]: line for line in lines[1:-1]}
    assert "verification-code" in rows[body["delivery_id"]]
    assert "SMTP_550" in rows[body["delivery_id"]] and "row requeued" in rows[body["delivery_id"]]
    assert "INVALID_EVENT" in rows[unknown["delivery_id"]]
    assert "no ledger row" in rows[unknown["delivery_id"]]

    assert ledger.get(body["delivery_id"]) == before
    assert len(status_changes(ledger, body["delivery_id"])) == 2
    assert ledger.get(unknown["delivery_id"]) is None
    assert pubsub.deliveries(timeout=0.5) == []
    # Nothing was acked: the real run finds both.
    assert summary(replay(capsys, pubsub)) == "replayed 2, skipped 0, failed 0, left for later 0"


def test_sent_rows_are_skipped_and_acked_live_leases_left_expired_ones_requeued(
    worker: Worker,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sent = factories.payload()
    handle(factories.cloud_event(sent), worker)
    live, expired = factories.payload(), factories.payload()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for body, lease in ((live, "1 hour"), (expired, "-1 second")):
            conn.execute(
                "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
                " attempts, claim_token, lease_expires_at) VALUES (%s, %s, %s, 'in_progress',"
                " 1, gen_random_uuid(), now() + %s::interval)",
                (body["delivery_id"], body["workflow"], body["recipient"], lease),
            )
    for body in (sent, live, expired):
        publish_dead_letter(pubsub, body)

    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 1, skipped 2, failed 0, left for later 0"
    assert "already sent" in out and "in progress under a live lease" in out
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [expired["delivery_id"]]
    row = ledger.get(expired["delivery_id"])
    assert row is not None and (row.status, row.replays) == (Status.QUEUED, 1)
    assert statuses(ledger, expired["delivery_id"])[-2:] == [Status.DEAD_LETTER, Status.QUEUED]
    live_row = ledger.get(live["delivery_id"])
    assert live_row is not None and live_row.status is Status.IN_PROGRESS

    # The sent one was acked, the live one released for later.
    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 0, skipped 1, failed 0, left for later 0"
    assert live["delivery_id"] in out and sent["delivery_id"] not in out


def test_limit(
    pubsub: PubSubNamespace, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bodies = [factories.payload() for _ in range(3)]
    for body in bodies:
        publish_dead_letter(pubsub, body)

    out = replay(capsys, pubsub, "--limit", "2")
    assert summary(out) == "replayed 2, skipped 0, failed 0, left for later 0"
    first = pubsub.deliveries(timeout=5)
    assert len(first) == 2
    out = replay(capsys, pubsub, "--limit", "2")
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0"
    second = pubsub.deliveries(timeout=5)
    assert delivery_ids(first + second) == sorted(b["delivery_id"] for b in bodies)


def test_one_delivery_dead_lettered_twice_is_replayed_once(
    pubsub: PubSubNamespace, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    body = factories.payload()
    publish_dead_letter(pubsub, body)
    publish_dead_letter(pubsub, body, reason="retries_exhausted")

    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 1, skipped 1, failed 0, left for later 0"
    assert "already replayed in this run" in out
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [body["delivery_id"]]
    assert summary(replay(capsys, pubsub)) == "replayed 0, skipped 0, failed 0, left for later 0"


def test_a_failed_republish_is_counted_and_left_on_the_subscription(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = factories.payload(recipient="gone@example.com")
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    handle(factories.cloud_event(body), worker)
    monkeypatch.setenv("DELIVERY_TOPIC", "no-such-topic")

    code, out, err = run(capsys, "replay", "--subscription", pubsub.dead_letter_subscription)
    assert code == 1
    assert summary(out) == "replayed 0, skipped 0, failed 1, left for later 0"
    assert err.count("\n") == 1 and err.startswith("error: 1 message(s) could not be replayed")
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.QUEUED  # the next run republishes it

    monkeypatch.setenv("DELIVERY_TOPIC", pubsub.delivery_topic)
    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0"
    assert "row already queued" in out
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [body["delivery_id"]]


def test_subscription_by_id_and_a_missing_one(
    pubsub: PubSubNamespace, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_dead_letter(pubsub, factories.payload())
    subscription_id = pubsub.dead_letter_subscription.rsplit("/", 1)[1]
    code, out, _ = run(capsys, "replay", "--subscription", subscription_id)
    assert code == 0 and summary(out).startswith("replayed 1,")

    code, out, err = run(capsys, "replay", "--subscription", "no-such-subscription")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "no-such-subscription" in err


def test_replay_needs_its_settings(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
    monkeypatch.delenv("DELIVERY_TOPIC", raising=False)
    code, _, err = run(capsys, "replay", "--subscription", "dead-letters")
    assert (code, err) == (1, "error: DELIVERY_TOPIC is required but not set\n")


def test_progress_is_shown_on_a_terminal_only(
    pubsub: PubSubNamespace,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_dead_letter(pubsub, factories.payload())
    controller, terminal = pty.openpty()
    shown = b""
    with os.fdopen(terminal, "w") as tty:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stderr", tty)
            out = replay(capsys, pubsub)
        while select.select([controller], [], [], 0.2)[0]:
            shown += os.read(controller, 65536)
    os.close(controller)
    shown_text = shown.decode()
    assert "replay: pulled 1, replayed 1, skipped 0, failed 0, left for later 0" in shown_text
    assert shown_text.endswith("\r\x1b[K")  # cleared before the summary went to stdout
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0"


# --- against the running function, as an operator tries it -----------------------------------


@pytest.fixture
def function(
    database_url: str, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> Iterator[FunctionServer]:
    """main.py under functions-framework, pushed to by the emulator as in the local stack."""
    server = FunctionServer(
        {
            "DATABASE_URL": database_url,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_server.port),
            "SMTP_SECURITY": "none",
            "EMAIL_FROM": "Example <noreply@example.com>",
            "GOOGLE_CLOUD_PROJECT": pubsub.project,
            "DELIVERY_TOPIC": pubsub.delivery_topic,
            "DEAD_LETTER_TOPIC": pubsub.dead_letter_topic,
            "PUBSUB_EMULATOR_HOST": pubsub.emulator.host,
            "SEND_TRIES_PER_INVOCATION": "1",
            "LEASE_SECONDS": "30",
        }
    ).start()
    pubsub.emulator.create_push_subscription(
        pubsub.delivery_topic,
        f"push-{pubsub.delivery_topic}",
        server.push_endpoint(pubsub.project, pubsub.delivery_topic),
        minimum_backoff=1,
        maximum_backoff=2,
    )
    yield server
    server.stop()


def test_a_dead_letter_of_this_runs_own_republish_is_left_for_the_next_run(
    function: FunctionServer,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 8, section 3: replaying while the address is still refused. The republished
    event fails again while the run goes on, and its new dead letter reaches the run's
    subscription; the run must leave it there (not ack it as a copy it already replayed)."""
    body = factories.payload(recipient="bounce@example.com")
    delivery_id = body["delivery_id"]
    smtp_server.fail_recipient("bounce@example.com", 550, "5.1.1 no such user")
    pubsub.emulator.publish(pubsub.delivery_topic, factories.encode(body))

    def row_is(status: Status, replays: int) -> bool:
        row = ledger.get(delivery_id)
        return row is not None and (row.status, row.replays) == (status, replays)

    wait_until(lambda: row_is(Status.FAILED, 0), timeout=30)

    items: list[worker_replay.Item] = []

    def on_item(item: worker_replay.Item) -> None:
        items.append(item)
        if item.outcome is worker_replay.ItemResult.REPLAYED:
            # Hold the run until the function failed the republished copy again: the row is
            # marked `failed` only once its new dead letter is confirmed on the topic, so the
            # run's next pulls find it.
            wait_until(lambda: row_is(Status.FAILED, 1), timeout=30)

    options = worker_replay.ReplayOptions(
        subscription=pubsub.dead_letter_subscription, wait_seconds=1.0
    )
    run = worker_replay.replay(ledger, pubsub_settings(), options, on_item=on_item)
    assert (run.replayed, run.skipped, run.failed, run.left) == (1, 0, 0, 1)
    assert [(i.action, i.outcome) for i in items] == [
        (worker_replay.Action.REQUEUE, worker_replay.ItemResult.REPLAYED),
        (worker_replay.Action.FAILED_AGAIN, worker_replay.ItemResult.LEFT),
    ]
    assert items[1].letter.attributes["source_message_id"] == items[0].detail.split()[-1]

    # The next run, once the mailbox exists, finds the new dead letter and the email goes out.
    out = replay(capsys, pubsub, "--dry-run")
    assert summary_line_of(out, delivery_id).startswith("would replay")
    smtp_server.reset()
    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0"
    wait_until(lambda: row_is(Status.SENT, 2), timeout=30)
    assert [m.rcpt_tos for m in smtp_server.messages] == [("bounce@example.com",)]


def summary_line_of(out: str, delivery_id: str) -> str:
    return next(line for line in out.splitlines() if delivery_id in line)


def test_a_policy_forwarded_copy_of_this_runs_republish_is_left_for_the_next_run(
    pubsub: PubSubNamespace, ledger: Ledger, database_url: str
) -> None:
    """Pub/Sub's own dead-letter policy forwards the republished message with its attributes,
    `replayed_from` among them: that names the dead letter this run replayed."""
    body = factories.payload()
    first = publish_dead_letter(pubsub, body)
    items: list[worker_replay.Item] = []

    def on_item(item: worker_replay.Item) -> None:
        items.append(item)
        if item.outcome is worker_replay.ItemResult.REPLAYED:
            [republished] = pubsub.deliveries(timeout=5)
            pubsub.emulator.publish(
                pubsub.dead_letter_topic,
                bytes(republished.message.data),
                **dict(republished.message.attributes),
                CloudPubSubDeadLetterSourceDeliveryCount="10",
            )

    options = worker_replay.ReplayOptions(
        subscription=pubsub.dead_letter_subscription, wait_seconds=1.0
    )
    run = worker_replay.replay(ledger, pubsub_settings(), options, on_item=on_item)
    assert (run.replayed, run.skipped, run.left) == (1, 0, 1)
    assert items[1].action is worker_replay.Action.FAILED_AGAIN
    assert items[1].letter.attributes["replayed_from"] == first
    [left] = pubsub.dead_letters(timeout=5)  # still there for the next run
    assert left.message.attributes["replayed_from"] == first


def test_a_skipped_row_is_final_its_dead_letter_acked(
    pubsub: PubSubNamespace, ledger: Ledger, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    body = factories.payload()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
            " last_error_code) VALUES (%s, %s, %s, 'skipped', 'SUPPRESSED')",
            (body["delivery_id"], body["workflow"], body["recipient"]),
        )
    publish_dead_letter(pubsub, body)

    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 0, skipped 1, failed 0, left for later 0"
    assert "deliberately not sent" in out
    assert pubsub.deliveries(timeout=0.5) == []
    assert summary(replay(capsys, pubsub)) == "replayed 0, skipped 0, failed 0, left for later 0"


# --- freshness: expired dead letters are never republished ------------------------------------


def test_an_expired_dead_letter_is_left_counted_and_acked_only_with_drop_expired(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Expired by its ledger row (a code dead-lettered more than its 10 minutes ago) or, with
    no row, by its own `not_after` or an invite's `expires_at`; a fresh one beside them is
    replayed as before."""
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    old, fresh = (factories.payload(recipient="gone@example.com") for _ in range(2))
    for body in (old, fresh):
        handle(factories.cloud_event(body), worker)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE email.deliveries SET published_at = published_at - interval '11 minutes',"
            " not_after = not_after - interval '11 minutes' WHERE delivery_id = %s",
            (old["delivery_id"],),
        )
    gone = datetime.now(UTC) - timedelta(seconds=1)
    unrecorded = factories.payload("invite", not_after=gone.isoformat())
    publish_dead_letter(pubsub, unrecorded, reason="pubsub_dead_letter_policy")
    yesterday = (gone - timedelta(days=1)).date().isoformat()
    invite = factories.payload("invite", data={**factories.DATA["invite"], "expires_at": yesterday})
    publish_dead_letter(pubsub, invite, reason="pubsub_dead_letter_policy")
    smtp_server.reset()
    expired_ids = {old["delivery_id"], unrecorded["delivery_id"], invite["delivery_id"]}

    out = replay(capsys, pubsub, "--dry-run")
    assert summary(out) == (
        "would replay 1, skipped 0, failed 0, left for later 0, expired 3 (left)"
        " (dry run: nothing changed)"
    )
    out = replay(capsys, pubsub, "--drop-expired", "--dry-run")  # a dry run acks nothing
    assert "expired 3 (left)" in summary(out)
    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 1, skipped 0, failed 0, left for later 0, expired 3 (left)"
    expired_lines = [line for line in out.splitlines() if line.startswith("expired")]
    assert {line.split()[1] for line in expired_lines} == expired_ids
    assert all("not republished" in line and "--drop-expired" in line for line in expired_lines)
    assert delivery_ids(pubsub.deliveries(timeout=5)) == [fresh["delivery_id"]]
    row = ledger.get(old["delivery_id"])
    assert row is not None and (row.status, row.replays) == (Status.FAILED, 0)  # untouched
    assert ledger.get(unrecorded["delivery_id"]) is None

    # Left on the subscription: the next run finds them again, and drops them when told to.
    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 0, skipped 0, failed 0, left for later 0, expired 3 (left)"
    out = replay(capsys, pubsub, "--drop-expired")
    assert summary(out) == "replayed 0, skipped 0, failed 0, left for later 0, expired 3 (dropped)"
    assert summary(replay(capsys, pubsub)) == "replayed 0, skipped 0, failed 0, left for later 0"
    assert pubsub.deliveries(timeout=1) == []
    assert smtp_server.messages == []


def test_an_expired_dead_letter_of_a_sent_delivery_is_acked_as_sent(
    worker: Worker, pubsub: PubSubNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only what would be republished is asked about its validity end."""
    body = factories.payload()
    handle(factories.cloud_event(body), worker)
    gone = datetime.now(UTC) - timedelta(seconds=1)
    publish_dead_letter(pubsub, {**body, "not_after": gone.isoformat()})
    out = replay(capsys, pubsub)
    assert summary(out) == "replayed 0, skipped 1, failed 0, left for later 0"
    assert "already sent" in out
