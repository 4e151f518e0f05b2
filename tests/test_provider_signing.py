"""The tests' signing helpers agree with the providers' own libraries, and so do the adapters.

Without this, an adapter and a helper sharing one misreading of a scheme would pass
together. Each library is a test-only dependency (requirements-dev.txt).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from mailgun.security import SecurityGuard
from sendgrid.helpers.eventwebhook import EventWebhook
from svix.webhooks import Webhook as SvixWebhook

from tests.provider_signing import SendGridKeys, mailgun_signature, svix_headers, svix_secret
from worker.providers import mailgun, resend, sendgrid
from worker.providers.model import Refused, WebhookRequest

BODY = json.dumps([{"event": "delivered", "email": "ada@example.com"}]).encode()


def request(provider: str, headers: dict[str, str], body: bytes = BODY) -> WebhookRequest:
    lowered = {name.lower(): value for name, value in headers.items()}
    return WebhookRequest(provider, f"https://hooks.example.com/{provider}", lowered, body)


def test_sendgrid_signatures_verify_with_sendgrids_event_webhook() -> None:
    keys = SendGridKeys()
    headers = keys.headers(BODY)
    library = EventWebhook(keys.public_key_b64)

    assert library.verify_signature(
        BODY.decode(),
        headers["X-Twilio-Email-Event-Webhook-Signature"],
        headers["X-Twilio-Email-Event-Webhook-Timestamp"],
    )
    assert not library.verify_signature(
        BODY.decode() + " ",
        headers["X-Twilio-Email-Event-Webhook-Signature"],
        headers["X-Twilio-Email-Event-Webhook-Timestamp"],
    )
    adapter = sendgrid.SendGridAdapter(sendgrid.load_public_key(keys.public_key_b64))
    adapter.authenticate(request("sendgrid", headers))


def test_sendgrid_signs_the_bytes_as_sent_by_sendgrids_event_webhook_too() -> None:
    """SendGrid's own library verifies the raw body: other spacing verifies, the same events
    re-serialised do not. The adapter agrees both ways."""
    keys = SendGridKeys()
    raw = b'[ {"email" :"ada@example.com",\n  "event": "delivered"} ]'
    reserialised = json.dumps(json.loads(raw)).encode()
    headers = keys.headers(raw)
    signature = headers["X-Twilio-Email-Event-Webhook-Signature"]
    timestamp = headers["X-Twilio-Email-Event-Webhook-Timestamp"]
    library = EventWebhook(keys.public_key_b64)
    adapter = sendgrid.SendGridAdapter(sendgrid.load_public_key(keys.public_key_b64))

    assert library.verify_signature(raw.decode(), signature, timestamp)
    assert not library.verify_signature(reserialised.decode(), signature, timestamp)
    adapter.authenticate(request("sendgrid", headers, raw))
    with pytest.raises(Refused):
        adapter.authenticate(request("sendgrid", headers, reserialised))


def test_mailgun_signatures_verify_with_mailguns_sdk() -> None:
    key = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
    signature = mailgun_signature(key)

    assert SecurityGuard.verify_webhook(
        key, signature["token"], signature["timestamp"], signature["signature"]
    )
    assert not SecurityGuard.verify_webhook(
        "key-other", signature["token"], signature["timestamp"], signature["signature"]
    )
    body = json.dumps({"signature": signature, "event-data": {}}).encode()
    mailgun.MailgunAdapter(key.encode()).authenticate(request("mailgun", {}, body))


def test_svix_signatures_match_the_svix_library_both_ways() -> None:
    secret = svix_secret()
    headers = svix_headers(secret, BODY, msg_id="msg_2KWPBgLlAfxdpx2AI54pPJ85f4W")
    library = SvixWebhook(secret)

    library.verify(BODY, headers)  # raises if ours is not what Svix would send
    expected = library.sign(
        "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        datetime.fromtimestamp(int(headers["svix-timestamp"]), tz=UTC),
        BODY.decode(),
    )
    assert headers["svix-signature"] == expected
    resend.ResendAdapter(resend.load_secret(secret)).authenticate(request("resend", headers))


def test_the_adapters_refuse_what_the_libraries_refuse() -> None:
    secret = svix_secret()
    stale = svix_headers(secret, BODY, timestamp=int(time.time()) - 301)
    with pytest.raises(Exception, match=r"(?i)timestamp|too old"):
        SvixWebhook(secret).verify(BODY, stale)
    with pytest.raises(Refused) as refused:
        resend.ResendAdapter(resend.load_secret(secret)).authenticate(request("resend", stale))
    assert refused.value.status == 403
