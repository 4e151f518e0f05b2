"""What the worker attaches per SMTP_PROVIDER, and the relay ids it reads from `250` replies."""

from __future__ import annotations

import json

import pytest

from worker.relay import SmtpProvider, relay_message_id, tracking_headers


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
