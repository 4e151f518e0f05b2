"""What the worker attaches per SMTP_PROVIDER, and the relay ids it reads from `250` replies."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from psycopg_pool import ConnectionPool

from tests import factories
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import MakeWorker
from tests.provider_signing import SendGridKeys
from worker.delivery import smtp
from worker.delivery.config import SmtpSettings
from worker.delivery.pipeline import handle
from worker.delivery.relay import SmtpProvider, relay_message_id, tracking_headers
from worker.providers import sendgrid
from worker.providers.model import WebhookRequest
from worker.store.ledger import Ledger, Status
from worker.store.tracking import Applied, Tracking


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"Ok 0100018c5e6f7a8b-1a2b3c4d-000000", "0100018c5e6f7a8b-1a2b3c4d-000000"),  # SES
        (b"Ok: queued as 8QuyHvU8TzqdSx0eFJmHMQ", "8QuyHvU8TzqdSx0eFJmHMQ"),  # SendGrid
        (b"2.0.0 OK: queued as <4Bq1Z50pDkz1wT>", "4Bq1Z50pDkz1wT"),
        (b"2.0.0 Ok: queued as 3F1A2B4C5D", "3F1A2B4C5D"),  # Postfix
        (b"OK QUEUED AS abc.def@relay", "abc.def@relay"),
        (b"ok <a1b2c3>", "a1b2c3"),
        (b"OK", None),
        (b"2.0.0 Ok: queued", None),  # smtp-sink, and relays that name no id
        (b"Ok queued", None),
        (b"Great success", None),  # Mailgun: no id
        (b"2.0.0 OK  1700000000 a640c23a62f3a-ab1 - gsmtp", None),  # Gmail: not one id
        (b"", None),
        ("Ok: queued as id-from-str", "id-from-str"),
    ],
)
def test_the_relay_id_is_read_from_the_250_reply(reply: bytes | str, expected: str | None) -> None:
    assert relay_message_id(reply) == expected


def test_each_provider_gets_the_header_it_echoes_back() -> None:
    assert tracking_headers(SmtpProvider.NONE, "inv_2f6c9d1e") == []
    assert tracking_headers(SmtpProvider.RESEND, "inv_2f6c9d1e") == []
    assert tracking_headers(SmtpProvider.SES, "inv_2f6c9d1e") == [
        ("X-SES-MESSAGE-TAGS", "delivery_id=inv_2f6c9d1e")
    ]
    [(name, value)] = tracking_headers(SmtpProvider.SENDGRID, "inv.1:a@b")
    assert name == "X-SMTPAPI"
    assert json.loads(value) == {"unique_args": {"delivery_id": "inv.1:a@b"}}
    [(name, value)] = tracking_headers(SmtpProvider.MAILGUN, "inv.1:a@b")
    assert (name, json.loads(value)) == ("X-Mailgun-Variables", {"delivery_id": "inv.1:a@b"})
    assert tracking_headers(SmtpProvider.POSTMARK, "inv.1:a@b") == [
        ("X-PM-Metadata-delivery_id", "inv.1:a@b"),
        ("X-PM-KeepID", "true"),
    ]


def test_an_id_ses_cannot_carry_as_a_tag_gets_none() -> None:
    # SES tag values: ASCII letters, digits, _ and - only; matched by Message-ID instead.
    for delivery_id in ("inv.1", "a:b", "x@y"):
        assert tracking_headers(SmtpProvider.SES, delivery_id) == []


# --- over SMTP, against aiosmtpd ------------------------------------------------------------


def _email(settings: SmtpSettings, delivery_id: str, provider: SmtpProvider) -> smtp.OutgoingEmail:
    message = smtp.build_message(
        settings,
        delivery_id=delivery_id,
        recipient="ada@example.com",
        subject="Reset your password",
        text="hello",
        html="<p>hello</p>",
    )
    return message.with_headers(tracking_headers(provider, delivery_id))


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 Ok 0100018c5e6f7a8b-1a2b3c4d-000000", "0100018c5e6f7a8b-1a2b3c4d-000000"),
        ("250 Ok: queued as 8QuyHvU8TzqdSx0eFJmHMQ", "8QuyHvU8TzqdSx0eFJmHMQ"),
        ("250 2.0.0 OK: queued as <4Bq1Z50pDkz1wT>", "4Bq1Z50pDkz1wT"),
        ("250 OK", None),
    ],
)
def test_the_relay_id_of_the_final_250_is_returned(
    smtp_server: SmtpTestServer, reply: str, expected: str | None
) -> None:
    smtp_server.accept_reply = reply
    sender = smtp.SmtpSender(smtp_server.settings())
    try:
        first = smtp.send_with_retry(
            sender,
            _email(sender.settings, "rst_1", SmtpProvider.NONE),
            tries=1,
            initial_backoff=0.01,
            max_backoff=0.01,
        )
        # The kept connection's next transaction reads its own reply, not the last one's.
        smtp_server.accept_reply = "250 OK"
        second = sender.send(_email(sender.settings, "rst_2", SmtpProvider.NONE))
    finally:
        sender.close()
    assert first.ok and first.relay_message_id == expected
    assert second is None


@pytest.mark.parametrize("provider", list(SmtpProvider))
def test_the_delivery_id_header_reaches_the_relay(
    smtp_server: SmtpTestServer, provider: SmtpProvider
) -> None:
    sender = smtp.SmtpSender(smtp_server.settings())
    try:
        sender.send(_email(sender.settings, "inv_2f6c9d1e", provider))
    finally:
        sender.close()
    [received] = smtp_server.messages
    headers = dict(received.message.items())
    expected = dict(tracking_headers(provider, "inv_2f6c9d1e"))
    assert {name: headers.get(name) for name in expected} == expected
    assert received.message["Message-ID"] == "<inv_2f6c9d1e@example.com>"
    assert received.message.get_body(("plain",)) is not None  # still a well-formed email


# --- through the worker, into the ledger, and back from the provider --------------------------


@pytest.mark.parametrize("provider", [SmtpProvider.SENDGRID, SmtpProvider.POSTMARK])
def test_the_worker_records_the_relay_id_and_attaches_the_providers_header(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger, provider: SmtpProvider
) -> None:
    smtp_server.accept_reply = "250 2.0.0 OK: queued as 4Bq1Z50pDkz1wT"
    worker = make_worker(smtp=smtp_server.settings(provider=provider))
    body = factories.payload("password-reset")

    handle(factories.cloud_event(body), worker)

    [received] = smtp_server.messages
    for name, value in tracking_headers(provider, body["delivery_id"]):
        assert received.message[name] == value
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.SENT
    assert row.relay_message_id == "4Bq1Z50pDkz1wT"
    assert row.provider_message_id == received.message["Message-ID"]


def test_a_sendgrid_report_of_the_sent_email_finds_its_delivery(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger, pool: ConnectionPool
) -> None:
    """What SendGrid echoes (the unique argument, its X-Message-ID) matches the ledger row."""
    smtp_server.accept_reply = "250 Ok: queued as 8QuyHvU8TzqdSx0eFJmHMQ"
    worker = make_worker(smtp=smtp_server.settings(provider=SmtpProvider.SENDGRID))
    body = factories.payload("password-reset")
    handle(factories.cloud_event(body), worker)
    [received] = smtp_server.messages
    unique_args = json.loads(received.message["X-SMTPAPI"])["unique_args"]
    keys = SendGridKeys()
    report = {
        "event": "delivered",
        "email": "ada@example.com",
        "timestamp": int(time.time()),
        "sg_event_id": "hqFbp3HH9WxIM0R2-x2M1Q==",
        "sg_message_id": "8QuyHvU8TzqdSx0eFJmHMQ.filter0001.16648.5515E0B88.0",
        **unique_args,  # SendGrid adds the unique arguments to every event
    }
    raw = json.dumps([report]).encode()
    headers = {k.lower(): v for k, v in keys.headers(raw).items()}
    adapter = sendgrid.SendGridAdapter(sendgrid.load_public_key(keys.public_key_b64))
    request = WebhookRequest("sendgrid", "https://hooks.example.com/sendgrid", headers, raw)
    adapter.authenticate(request)
    [event] = adapter.events(request).events
    assert event.relay_message_id == "8QuyHvU8TzqdSx0eFJmHMQ"

    assert Tracking(pool).apply(event) is Applied.APPLIED
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.provider_status == "delivered"
    # Without the unique argument the relay id alone finds it too.
    unmatched_keys = replace(event, provider_event_id="other", delivery_id=None, message_id=None)
    assert Tracking(pool).apply(unmatched_keys) is Applied.APPLIED
