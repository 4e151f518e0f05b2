"""Every row of the outcome table (docs/reference.md), against real components:
PostgreSQL, the Pub/Sub emulator (dead letters pulled from a subscription) and an aiosmtpd
server that records what it accepted."""

from __future__ import annotations

import json
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import factories
from tests.harness.pubsub import PubSubNamespace
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import MakeWorker
from worker.core.settings import DatabaseSettings
from worker.delivery.config import SmtpSettings
from worker.delivery.deadletter import DeadLetterPublisher
from worker.delivery.pipeline import RetryLater, Worker, handle
from worker.delivery.rendering import Renderer
from worker.delivery.smtp import OutgoingEmail, SmtpSender
from worker.store.db import connection_kwargs
from worker.store.ledger import Ledger, Status


@pytest.fixture
def worker(make_worker: MakeWorker) -> Worker:
    return make_worker()


def dead_letter_summary(pubsub: PubSubNamespace, timeout: float = 10.0) -> list[dict[str, Any]]:
    return [
        {"data": m.message.data, **dict(m.message.attributes)}
        for m in pubsub.dead_letters(timeout=timeout)
    ]


def test_valid_event_sends_exactly_one_email(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    body = factories.payload("invite")
    handle(factories.cloud_event(body, message_id="m-1"), worker)

    [received] = smtp_server.messages
    assert received.rcpt_tos == ("ada@example.com",)
    assert received.message["Subject"]
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.SENT and row.sent_at is not None
    assert (row.attempts, row.last_error_code, row.last_error_message) == (1, None, None)
    assert row.provider_message_id == received.message["Message-ID"]
    assert row.metadata == {"tenant": "acme"} and row.source_message_id == "m-1"
    assert [e.status for e in ledger.events(body["delivery_id"])] == [
        Status.IN_PROGRESS,
        Status.SENT,
    ]
    assert pubsub.dead_letters(timeout=1) == []


@pytest.mark.parametrize("expires_at", ["2030-12-01", "2030-12-01T12:00:00Z"])
def test_an_invite_expiry_as_a_date_or_an_rfc3339_date_time_is_sent(
    worker: Worker, smtp_server: SmtpTestServer, ledger: Ledger, expires_at: str
) -> None:
    data = {**factories.DATA["invite"], "expires_at": expires_at}
    body = factories.payload("invite", data=data)
    handle(factories.cloud_event(body), worker)
    [received] = smtp_server.messages
    text = received.message.get_body(("plain",))
    assert text is not None and "expires on December 1, 2030." in text.get_content()
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.SENT


def test_same_delivery_again_sends_nothing_and_changes_nothing(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    body = factories.payload()
    handle(factories.cloud_event(body), worker)
    before = ledger.get(body["delivery_id"])
    for _ in range(3):
        handle(factories.cloud_event(body), worker)  # returns: acked
    assert len(smtp_server.messages) == 1
    assert ledger.get(body["delivery_id"]) == before
    assert len(ledger.events(body["delivery_id"])) == 2
    assert pubsub.dead_letters(timeout=1) == []


def test_concurrent_duplicates_send_one_email(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    workers = [make_worker() for _ in range(8)]  # each its own SMTP connection, like instances
    rounds = 15
    with ThreadPoolExecutor(len(workers)) as pool:
        for round_number in range(rounds):
            body = factories.payload(delivery_id=f"dup-{round_number}")
            barrier = threading.Barrier(len(workers))

            def run(
                w: Worker, body: dict[str, Any] = body, barrier: threading.Barrier = barrier
            ) -> str:
                barrier.wait()
                try:
                    handle(factories.cloud_event(body), w)
                    return "returned"
                except RetryLater:
                    return "retry"

            outcomes = list(pool.map(run, workers))
            # Pub/Sub brings back the copies that asked for a retry: they must not send either.
            for w, outcome in zip(workers, outcomes, strict=True):
                if outcome == "retry":
                    handle(factories.cloud_event(body), w)
            sent_to_this_id = [
                m
                for m in smtp_server.messages
                if body["delivery_id"] in str(m.message["Message-ID"])
            ]
            assert len(sent_to_this_id) == 1, f"round {round_number}: {outcomes}"
    assert len(smtp_server.messages) == rounds


def test_transient_failure_retries_then_asks_pubsub_to_redeliver(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    body = factories.payload()
    smtp_server.fail_next(2, 451, "4.3.0 try again later")
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(body), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.RETRYING
    assert (row.attempts, row.last_error_code) == (2, "SMTP_451")
    assert smtp_server.messages == []
    assert pubsub.dead_letters(timeout=1) == []

    handle(factories.cloud_event(body), worker)  # the redelivery
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.SENT and row.attempts == 3
    assert row.last_error_code is None and len(smtp_server.messages) == 1
    events = ledger.events(body["delivery_id"])
    changes = [e.status for e in events if not e.payload.get("attempt_failed")]
    assert changes == [Status.IN_PROGRESS, Status.RETRYING, Status.IN_PROGRESS, Status.SENT]
    # Each failed send attempt leaves its own row: the status at the time, the error, the relay.
    failed = [
        (e.status, e.attempt, e.error_code, e.payload["relay"])
        for e in events
        if e.payload.get("attempt_failed")
    ]
    assert failed == [
        (Status.IN_PROGRESS, 1, "SMTP_451", "primary"),
        (Status.IN_PROGRESS, 2, "SMTP_451", "primary"),
    ]
    assert events[-1].payload["relay"] == "primary" and row.relay == "primary"


@pytest.mark.parametrize("fault", ["421", "drop", "timeout", "refused"])
def test_transient_failures_up_to_max_attempts_are_dead_lettered(
    make_worker: MakeWorker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    fault: str,
) -> None:
    worker = make_worker()
    if fault == "421":
        smtp_server.fail_next(10, 421, "4.7.0 too busy")
    elif fault == "drop":
        smtp_server.drop_next(10)
    elif fault == "timeout":
        smtp_server.delay(1.5)
        worker = replace(
            worker,
            sender=SmtpSender(replace(worker.settings.smtp, timeout_seconds=0.5)),
        )
    else:
        closed = replace(worker.settings.smtp, port=_closed_port())
        worker = replace(
            worker, sender=SmtpSender(closed), settings=replace(worker.settings, smtp=closed)
        )
    body = factories.payload("password-reset")
    event = factories.cloud_event(body, message_id="m-dead")

    with pytest.raises(RetryLater):
        handle(event, worker)  # attempts 1 and 2 in the first invocation
    handle(event, worker)  # attempt 3 == MAX_ATTEMPTS: dead-lettered, returns

    assert smtp_server.messages == []
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.DEAD_LETTER and row.attempts == 3
    expected_code = {
        "421": "SMTP_421",
        "drop": "DISCONNECTED",
        "timeout": "TIMEOUT",
        "refused": "CONN_REFUSED",
    }
    assert row.last_error_code == expected_code[fault]
    [letter] = dead_letter_summary(pubsub)
    assert letter["data"] == factories.encode(body)
    assert letter["reason"] == "retries_exhausted"
    assert (letter["attempts"], letter["delivery_id"], letter["workflow"]) == (
        "3",
        body["delivery_id"],
        "password-reset",
    )
    assert letter["source_message_id"] == "m-dead" and letter["error_code"] == expected_code[fault]
    handle(event, worker)  # a late redelivery changes nothing
    assert pubsub.dead_letters(timeout=1) == []


def test_permanent_failure_is_failed_and_dead_lettered(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    body = factories.payload(recipient="gone@example.com")
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 <gone@example.com>: no such user")
    handle(factories.cloud_event(body), worker)

    assert smtp_server.messages == []
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.FAILED
    assert (row.last_error_code, row.attempts) == ("SMTP_550", 1)
    assert row.last_error_message is not None and "gone@example.com" not in row.last_error_message
    [letter] = dead_letter_summary(pubsub)
    assert (letter["reason"], letter["error_code"]) == ("permanent_failure", "SMTP_550")
    assert letter["data"] == factories.encode(body)


def padded(body: dict[str, Any], size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes (blanks before the closing brace)."""
    raw = json.dumps(body).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


INVALID_BODIES: dict[str, tuple[bytes, str | None]] = {
    "not json": (b"{not json", None),
    "not utf-8": (b"\xff\xfe\x00garbage", None),
    "missing recipient": (
        json.dumps({"delivery_id": "inv-1", "workflow": "invite", "data": {}}).encode(),
        "inv-1",
    ),
    "crlf recipient": (
        json.dumps(
            factories.payload(delivery_id="inv-2", recipient="a@b.com\r\nBcc: x@y.com")
        ).encode(),
        "inv-2",
    ),
    "unknown workflow": (
        json.dumps({**factories.payload(delivery_id="inv-3"), "workflow": "newsletter"}).encode(),
        "inv-3",
    ),
    "missing variable": (
        json.dumps(factories.payload(delivery_id="inv-4", data={})).encode(),
        "inv-4",
    ),
    # Mail readers decode an RFC 2047 encoded-word in the subject: U+202E (right-to-left
    # override) here, a CR LF in the next one, past the rule against such characters.
    "encoded-word organization name": (
        json.dumps(
            factories.payload(
                "invite",
                delivery_id="inv-5",
                data={
                    **factories.DATA["invite"],
                    "organization_name": "=?utf-8?b?4oCuZ25wLmV4ZQ==?=",
                },
            )
        ).encode(),
        "inv-5",
    ),
    "encoded-word inviter name": (
        json.dumps(
            factories.payload(
                "invite",
                delivery_id="inv-6",
                data={**factories.DATA["invite"], "inviter_name": "Grace =?utf-8?q?=0D=0ABcc:_x?="},
            )
        ).encode(),
        "inv-6",
    ),
    # A delivery event is small: data over 64 KiB is invalid, dead-lettered unchanged.
    "over 64 KiB": (padded(factories.payload(delivery_id="inv-7"), 64 * 1024 + 1), None),
    "5 MB": (padded(factories.payload(delivery_id="inv-8"), 5_000_000), None),
}


@pytest.mark.parametrize("case", list(INVALID_BODIES), ids=str)
def test_invalid_events_are_recorded_and_dead_lettered(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger, case: str
) -> None:
    raw, delivery_id = INVALID_BODIES[case]
    handle(factories.cloud_event(raw, message_id="m-bad"), worker)  # returns: never crash-loops

    assert smtp_server.messages == []
    [letter] = dead_letter_summary(pubsub)
    assert letter["data"] == raw
    assert (letter["reason"], letter["error_code"]) == ("invalid_event", "INVALID_EVENT")
    assert letter["error_message"] and letter["source_message_id"] == "m-bad"
    assert letter.get("delivery_id") == delivery_id
    with ledger.pool.connection() as conn:
        rows = conn.execute(
            "SELECT delivery_id, status, last_error_code FROM email.deliveries"
        ).fetchall()
    assert rows == ([(delivery_id, "failed", "INVALID_EVENT")] if delivery_id else [])


def test_a_received_subject_never_decodes_to_a_control_or_bidi_character(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> None:
    """Names go into the subject. What the relay received, decoded as a mail reader decodes it
    (RFC 2047 encoded-words included), holds no control, line-break or bidi character:
    names that would decode to one are refused, the others arrive as written."""
    refused = [
        "=?utf-8?b?4oCuZ25wLmV4ZQ==?=",  # U+202E
        "=?UTF-8?B?4oCu?=exe",
        "Acme =?utf-8?q?=0D=0ABcc:_x?=",  # CR LF
        "=?iso-8859-1?q?=07?=",  # BEL
    ]
    sent = ["Ünïcödé GmbH & Co.", "Why?=Because", "a = b? c", "Acme ?= ?"]
    for name in refused + sent:
        for variable in ("organization_name", "inviter_name"):
            data = {**factories.DATA["invite"], variable: name}
            handle(factories.cloud_event(factories.payload("invite", data=data)), worker)

    subjects = [str(m.message["Subject"]) for m in smtp_server.messages]
    assert len(subjects) == 2 * len(sent)
    for subject in subjects:
        assert not [ch for ch in subject if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")], (
            subject
        )
    for name in sent:
        assert f"join {name}" in " ".join(subjects) and f"{name} invited you" in " ".join(subjects)
    letters = pubsub.dead_letters()
    assert len(letters) == 2 * len(refused)
    assert {m.message.attributes["error_code"] for m in letters} == {"INVALID_EVENT"}


def test_envelope_that_is_not_base64_is_dead_lettered(
    worker: Worker, pubsub: PubSubNamespace
) -> None:
    event = factories.cloud_event(b"x", message_id="m-b64")
    event.data["message"]["data"] = "%%% not base64 %%%"
    handle(event, worker)
    [letter] = dead_letter_summary(pubsub)
    assert letter["reason"] == "invalid_event" and letter["source_message_id"] == "m-b64"


def test_missing_template_is_a_permanent_failure(
    make_worker: MakeWorker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    tmp_path: Path,
) -> None:
    worker = make_worker(renderer=Renderer(tmp_path))  # no templates at all
    body = factories.payload()
    handle(factories.cloud_event(body), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.last_error_code) == (
        Status.FAILED,
        "TEMPLATE_ERROR",
    )
    [letter] = dead_letter_summary(pubsub)
    assert letter["reason"] == "permanent_failure"
    assert smtp_server.messages == []


def test_database_unreachable_raises_and_sends_nothing(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    settings = DatabaseSettings(url=url, connect_timeout_seconds=1)
    with psycopg_pool.ConnectionPool(
        url, min_size=0, max_size=1, kwargs=connection_kwargs(settings), timeout=1, open=True
    ) as down:
        worker = make_worker(ledger=Ledger(down))
        with pytest.raises((psycopg.OperationalError, psycopg_pool.PoolTimeout)):
            handle(factories.cloud_event(factories.payload()), worker)
    assert smtp_server.messages == []
    assert pubsub.dead_letters(timeout=1) == []


def test_dead_letter_publish_failure_raises_and_does_not_mark_the_row(
    make_worker: MakeWorker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    dead_pubsub: Any,
) -> None:
    worker = make_worker()
    worker = replace(
        worker,
        settings=replace(
            worker.settings, pubsub=replace(pubsub.settings, publish_timeout_seconds=2)
        ),
    )
    body = factories.payload(recipient="gone@example.com")
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    with pytest.raises(RetryLater, match="dead-letter publish failed"):
        handle(factories.cloud_event(body), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.RETRYING  # not failed, not dead_letter

    with pytest.raises(RetryLater):
        handle(factories.cloud_event(b"{broken", message_id="m-x"), worker)
    assert smtp_server.messages == []


def test_dead_letter_publish_recovers_on_redelivery(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    worker = make_worker()
    # The instance's publisher is the worker's own: this one cannot reach its topic.
    unreachable = DeadLetterPublisher(replace(pubsub.settings, dead_letter_topic="no-such-topic"))
    body = factories.payload(recipient="gone@example.com")
    smtp_server.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    try:
        with pytest.raises(RetryLater, match="dead-letter publish failed"):
            handle(factories.cloud_event(body), replace(worker, dead_letters=unreachable))
    finally:
        unreachable.close()
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.status_reason) == (
        Status.RETRYING,
        "dead_letter_publish_failed",
    )
    handle(factories.cloud_event(body), worker)  # the redelivery, with a working publisher
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.status_reason) == (
        Status.FAILED,
        "permanent_failure",
    )
    assert [d["reason"] for d in dead_letter_summary(pubsub)] == ["permanent_failure"]
    assert smtp_server.messages == []


def test_a_duplicate_during_a_live_lease_is_not_acked(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    """Another worker holds the claim: acking this copy would lose the email if that worker
    died, so the copy asks to come back (503), and sends and changes nothing meanwhile."""
    body = factories.payload()
    held = ledger.claim(
        delivery_id=body["delivery_id"],
        workflow=body["workflow"],
        recipient=body["recipient"],
        locale="en",
        metadata=None,
        source_message_id="m-other",
        lease_seconds=60,
    )
    assert held is not None
    before, history = ledger.get(body["delivery_id"]), ledger.events(body["delivery_id"])

    with pytest.raises(RetryLater, match="in_progress under another claim"):
        handle(factories.cloud_event(body), worker)

    assert smtp_server.messages == []
    assert ledger.get(body["delivery_id"]) == before
    assert ledger.events(body["delivery_id"]) == history
    assert pubsub.dead_letters(timeout=1) == []
    # The other worker can still finish its claim: nothing fenced it off.
    assert ledger.set_sent_if_claimed(held, attempts=1, provider_message_id="<other@x>")


def test_an_invalid_replay_of_a_queued_row_ends_it_failed(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    """A replayed event that is still invalid: its `queued` row must not wait forever."""
    delivery_id = "inv-replayed"
    with ledger.pool.connection() as conn:
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
            " VALUES (%s, 'invite', 'ada@example.com', 'queued')",
            (delivery_id,),
        )
    raw = json.dumps(factories.payload("invite", delivery_id=delivery_id, data={})).encode()

    handle(factories.cloud_event(raw, message_id="m-replayed"), worker)

    row = ledger.get(delivery_id)
    assert row is not None
    assert (row.status, row.status_reason, row.last_error_code) == (
        Status.FAILED,
        "invalid_event",
        "INVALID_EVENT",
    )
    assert row.last_error_message and "invite_url" in row.last_error_message
    audit = ledger.events(delivery_id)
    assert [(e.status, e.error_code) for e in audit] == [
        (Status.QUEUED, None),
        (Status.FAILED, "INVALID_EVENT"),
    ]
    assert audit[-1].payload["from"] == "queued"
    [letter] = dead_letter_summary(pubsub)
    assert (letter["reason"], letter["delivery_id"], letter["data"]) == (
        "invalid_event",
        delivery_id,
        raw,
    )
    assert smtp_server.messages == []


class _KillsLedgerConnectionsAfterSending(SmtpSender):
    """The relay has accepted the email; before the worker records it, every ledger
    connection of this database is terminated (a failover, a pooler restart)."""

    def __init__(self, settings: SmtpSettings, database_url: str) -> None:
        super().__init__(settings)
        self.database_url = database_url
        self.killed = 0

    def send(self, message: OutgoingEmail) -> None:
        super().send(message)
        with psycopg.connect(self.database_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        self.killed += killed[0] if killed else 0


def test_the_sent_write_survives_a_dropped_connection(
    worker: Worker, smtp_server: SmtpTestServer, ledger: Ledger, database_url: str
) -> None:
    sender = _KillsLedgerConnectionsAfterSending(worker.settings.smtp, database_url)
    body = factories.payload()
    try:
        handle(factories.cloud_event(body), replace(worker, sender=sender))
    finally:
        sender.close()
    assert sender.killed >= 1, "no ledger connection was dropped"
    assert len(smtp_server.messages) == 1
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.attempts) == (Status.SENT, 1)


def test_expired_claims_use_up_the_budget(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    """A worker that keeps dying mid-send (lease expiries) must not loop forever."""
    body = factories.payload()
    with ledger.pool.connection() as conn:
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, attempts,"
            " claim_token, lease_expires_at) VALUES (%s, 'verification-code', 'ada@example.com',"
            " 'in_progress', 3, gen_random_uuid(), now() - interval '1 second')",
            (body["delivery_id"],),
        )
    handle(factories.cloud_event(body), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.DEAD_LETTER
    assert [d["reason"] for d in dead_letter_summary(pubsub)] == ["retries_exhausted"]
    assert smtp_server.messages == []


def test_logs_carry_no_codes_links_or_passwords(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = [factories.payload(w) for w in factories.DATA]
    smtp_server.fail_next(1, 451, "4.3.0 try https://relay.example.com/status?token=abc later")
    for body in events:
        try:
            handle(
                factories.cloud_event(
                    body, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                ),
                worker,
            )
        except RetryLater:
            handle(factories.cloud_event(body), worker)
    handle(
        factories.cloud_event(json.dumps(factories.payload(data={"code": "12"})).encode()), worker
    )
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines, "the worker logged nothing"
    for secret in (
        factories.CODE,
        factories.INVITE_URL,
        factories.RESET_URL,
        "token=abc",
        "ada@example.com",
    ):
        assert secret not in out
    sent = [line for line in lines if line["message"] == "delivery sent"]
    assert len(sent) == 3
    assert all(
        line["severity"] == "INFO" and line["delivery_id"] and line["workflow"] for line in sent
    )
    # Ids stay verbatim (a log line must match its email); the recipient is masked.
    assert {line["provider_message_id"] for line in sent} == {
        f"<{body['delivery_id']}@example.com>" for body in events
    }
    assert {line["recipient"] for line in sent} == {"a***@example.com"}
    traced = [line for line in lines if "logging.googleapis.com/trace" in line]
    assert traced and traced[0]["logging.googleapis.com/trace"].endswith(
        "/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert len(smtp_server.messages) == 3


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=10), children, max_size=4)
            ),
            max_leaves=20,
        ).map(lambda value: json.dumps(value).encode()),
        st.fixed_dictionaries(
            {
                "delivery_id": st.text(max_size=30),
                "workflow": st.sampled_from(["invite", "x"]),
                "recipient": st.text(max_size=30),
                "data": st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
            }
        ).map(lambda value: json.dumps(value).encode()),
    )
)
def test_arbitrary_input_never_escapes_and_is_dead_lettered(
    worker: Worker, smtp_server: SmtpTestServer, ledger: Ledger, pubsub: PubSubNamespace, raw: bytes
) -> None:
    handle(factories.cloud_event(raw), worker)  # must return: no exception escapes
    assert smtp_server.messages == []
    with ledger.pool.connection() as conn:
        bad = conn.execute(
            "SELECT count(*) FROM email.deliveries"
            " WHERE status <> 'failed' OR last_error_code <> 'INVALID_EVENT'"
        ).fetchone()
    assert bad == (0,)
    [letter] = pubsub.emulator.pull(pubsub.dead_letter_subscription, timeout=10, quiet=0.2)
    assert letter.message.data == raw and letter.message.attributes["reason"] == "invalid_event"


def _closed_port() -> int:
    from tests.harness.postgres import free_port

    return free_port()


# --- freshness: a time-limited email is never sent late --------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def assert_expired(
    ledger: Ledger, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, delivery_id: str
) -> None:
    """Skipped with EXPIRED: no email, no dead letter (the handler returned: acked)."""
    row = ledger.get(delivery_id)
    assert row is not None
    assert (row.status, row.status_reason, row.last_error_code) == (
        Status.SKIPPED,
        "expired",
        "EXPIRED",
    )
    assert smtp_server.messages == []
    assert pubsub.dead_letters(timeout=1) == []


def test_an_event_past_its_not_after_is_skipped_expired_and_acked(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    end = datetime.now(UTC) - timedelta(seconds=1)
    body = factories.payload("invite", not_after=rfc3339(end))
    handle(factories.cloud_event(body), worker)  # returns: acked
    assert_expired(ledger, smtp_server, pubsub, body["delivery_id"])
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.not_after == end
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "{" in line]
    [line] = [line for line in lines if line.get("message") == "delivery skipped"]
    assert (line["reason"], line["error_code"]) == ("expired", "EXPIRED")


def test_a_not_after_in_the_future_is_sent_and_kept(
    worker: Worker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    end = datetime(2030, 1, 31, 12, tzinfo=UTC)
    body = factories.payload("verification-code", not_after="2030-01-31T13:30:00+01:30")
    published = datetime.now(UTC).replace(microsecond=0)
    handle(factories.cloud_event(body, published=published), worker)
    assert len(smtp_server.messages) == 1
    row = ledger.get(body["delivery_id"])
    # The event's own end wins over the one its minutes would give.
    assert row is not None and (row.status, row.published_at, row.not_after) == (
        Status.SENT,
        published,
        end,
    )


@pytest.mark.parametrize("workflow", ["verification-code", "password-reset"])
def test_a_code_or_link_expires_its_minutes_after_its_publish_time(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    workflow: str,
) -> None:
    minutes = factories.DATA[workflow]["expires_in_minutes"]
    now = datetime.now(UTC).replace(microsecond=0)
    late = factories.payload(workflow)
    handle(
        factories.cloud_event(late, published=now - timedelta(minutes=minutes, seconds=1)), worker
    )
    assert_expired(ledger, smtp_server, pubsub, late["delivery_id"])

    fresh = factories.payload(workflow)
    published = now - timedelta(minutes=minutes - 1)
    handle(factories.cloud_event(fresh, published=published), worker)
    assert len(smtp_server.messages) == 1
    row = ledger.get(fresh["delivery_id"])
    assert row is not None and (row.status, row.published_at, row.not_after) == (
        Status.SENT,
        published,
        published + timedelta(minutes=minutes),
    )


def test_the_cloudevent_time_is_the_publish_time_when_the_message_has_none(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    body = factories.payload()
    event = factories.cloud_event(body)
    del event.data["message"]["publishTime"]
    event["time"] = rfc3339(datetime.now(UTC) - timedelta(minutes=11))
    handle(event, worker)
    assert_expired(ledger, smtp_server, pubsub, body["delivery_id"])


def age(ledger: Ledger, delivery_id: str, by: timedelta) -> None:
    """Time passes for one row: its publish time and validity end move `by` into the past."""
    with ledger.pool.connection() as conn:
        conn.execute(
            "UPDATE email.deliveries SET published_at = published_at - %s,"
            " not_after = not_after - %s WHERE delivery_id = %s",
            (by, by, delivery_id),
        )


def test_a_redelivery_after_the_end_is_expired_and_a_later_copy_does_not_extend_it(
    worker: Worker, smtp_server: SmtpTestServer, pubsub: PubSubNamespace, ledger: Ledger
) -> None:
    """A code fails transiently; Pub/Sub brings it back after its 10 minutes (the same
    message), and upstream publishes the same delivery again (a copy with a fresh publish
    time, which would give it 10 more minutes): neither sends."""
    body = factories.payload()
    published = datetime.now(UTC).replace(microsecond=0)
    smtp_server.fail_next(2, 451, "4.3.0 try again later")
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(body, message_id="m-1", published=published), worker)
    age(ledger, body["delivery_id"], timedelta(minutes=11))
    published -= timedelta(minutes=11)

    handle(factories.cloud_event(body, message_id="m-1", published=published), worker)
    assert_expired(ledger, smtp_server, pubsub, body["delivery_id"])
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.attempts, row.published_at) == (2, published)

    copy = {**body, "delivery_id": f"{body['delivery_id']}-copy"}
    smtp_server.fail_next(2, 451, "4.3.0 try again later")
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(copy, message_id="m-2"), worker)
    age(ledger, copy["delivery_id"], timedelta(minutes=11))
    handle(factories.cloud_event(copy, message_id="m-3"), worker)  # published just now
    assert_expired(ledger, smtp_server, pubsub, copy["delivery_id"])


@pytest.mark.parametrize("form", ["date", "date-time"])
def test_an_invite_expires_at_its_expires_at(
    worker: Worker,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    ledger: Ledger,
    form: str,
) -> None:
    """A date alone ends at the end of that day, UTC; a date-time where it says."""
    today = datetime.now(UTC).date()
    if form == "date":
        past, future = (
            (today - timedelta(days=1)).isoformat(),
            (today + timedelta(days=1)).isoformat(),
        )
        future_end = datetime.combine(today + timedelta(days=2), datetime.min.time(), UTC)
    else:
        now = datetime.now(UTC).replace(microsecond=0)
        past = (now - timedelta(minutes=1)).astimezone(timezone(timedelta(hours=-5))).isoformat()
        future_end = now + timedelta(hours=1)
        future = future_end.astimezone(timezone(timedelta(hours=9))).isoformat()
    gone = factories.payload("invite", data={**factories.DATA["invite"], "expires_at": past})
    handle(factories.cloud_event(gone), worker)
    assert_expired(ledger, smtp_server, pubsub, gone["delivery_id"])

    live = factories.payload("invite", data={**factories.DATA["invite"], "expires_at": future})
    handle(factories.cloud_event(live), worker)
    assert len(smtp_server.messages) == 1
    row = ledger.get(live["delivery_id"])
    assert row is not None and (row.status, row.not_after) == (Status.SENT, future_end)
