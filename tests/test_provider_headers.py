"""What the worker attaches per SMTP_PROVIDER, and the relay ids it reads from `250` replies."""

from __future__ import annotations

import json

import pytest

from tests.harness.smtp import SmtpTestServer
from worker import smtp
from worker.relay import SmtpProvider, relay_message_id, tracking_headers
from worker.settings import SmtpSettings


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
