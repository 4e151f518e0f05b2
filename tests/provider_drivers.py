"""One driver per provider of worker/core/providers.py, for the shared suite
(tests/test_provider_contract.py): how to make that provider's webhook requests.

A driver builds the *content* of an event as the provider reports it (SendGrid's array,
Mailgun's `event-data`, Postmark's object, Resend's object, the SES record that SNS carries
as its `Message`), and wraps content into a request: as the provider sends it (`sign`), signed
with a key that is not the provider's (`forge`), without its signature (`strip`), and, where
the scheme signs a time the webhook holds to a window (`Timestamped`), signed at a given time.
Signing the same content again is how the provider retries it: Resend's svix-id and SNS's
MessageId stay the same, SendGrid and Mailgun sign afresh (a new time, a new token).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import rsa

from tests.harness.https import SnsSigner, SnsTestServer
from tests.harness.webhook import FIXTURES, ProviderKeys, fixture, new_id, now_unix
from tests.provider_signing import (
    SendGridKeys,
    basic_auth,
    mailgun_signature,
    svix_headers,
    svix_secret,
)

SNS_TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
# Events happened half a minute ago: a time the email, sent just now, can have had.
AGE_SECONDS = 30


@dataclass(frozen=True)
class Signed:
    """One request: its body and the headers that go with it."""

    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Email:
    """A sent email as tests.harness.webhook.seed_delivery leaves it in the ledger: the keys
    a provider may echo back (each driver puts those its provider does), and whom it names."""

    delivery_id: str
    recipient: str = "ada@example.com"

    @property
    def message_id(self) -> str:
        """The Message-ID header the worker wrote (seed_delivery's)."""
        return f"<{self.delivery_id}@example.com>"


class Driver(ABC):
    name: ClassVar[str]  # the PROVIDERS row and the route's last path segment
    # What a request signed with a key not the provider's is answered.
    forged_status: ClassVar[int] = 403
    # The largest body the provider sends, where the webhook holds it to that (its body is
    # parsed before it is verified); None: the webhook's own ceiling, far above these tests.
    body_cap: ClassVar[int | None] = None
    # Content that cannot be read hides the signature too (Mailgun's travels in the same
    # JSON document): 401 rather than 400.
    unreadable_content_is_unsigned: ClassVar[bool] = False

    @abstractmethod
    def env(self) -> dict[str, str]:
        """The webhook settings that serve this provider."""

    @abstractmethod
    def sign(self, content: bytes) -> Signed: ...

    @abstractmethod
    def forge(self, content: bytes) -> Signed: ...

    @abstractmethod
    def strip(self, content: bytes) -> Signed:
        """As `sign` without the signature (or the credentials)."""

    @abstractmethod
    def delivered(self, email: Email) -> bytes:
        """A `delivered` report of `email`, naming `email.recipient`, with fresh ids."""

    @abstractmethod
    def bounced(self, email: Email) -> bytes:
        """A hard bounce of `email`, naming `email.recipient`, with fresh ids."""

    @abstractmethod
    def malformed(self) -> dict[str, bytes]:
        """Content that, signed, is authentic but not what the provider documents."""


class Timestamped(Driver):
    """A scheme that signs a time, which the webhook refuses outside its window."""

    @abstractmethod
    def signed_at(self, content: bytes, unix_time: int) -> Signed: ...


def _ago(seconds: int = AGE_SECONDS) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- SendGrid: ECDSA over timestamp + body ------------------------------------------------------


@dataclass
class SendGridDriver(Timestamped):
    keys: SendGridKeys
    other: SendGridKeys = field(default_factory=SendGridKeys)
    name: ClassVar[str] = "sendgrid"
    signature_header: ClassVar[str] = "X-Twilio-Email-Event-Webhook-Signature"

    def env(self) -> dict[str, str]:
        return {"SENDGRID_WEBHOOK_PUBLIC_KEY": self.keys.public_key_b64}

    def sign(self, content: bytes) -> Signed:
        return Signed(content, self.keys.headers(content))

    def signed_at(self, content: bytes, unix_time: int) -> Signed:
        return Signed(content, self.keys.headers(content, unix_time))

    def forge(self, content: bytes) -> Signed:
        return Signed(content, self.other.headers(content))

    def strip(self, content: bytes) -> Signed:
        headers = self.keys.headers(content)
        return Signed(content, {k: v for k, v in headers.items() if k != self.signature_header})

    def _event(self, index: int, email: Email) -> bytes:
        event = fixture("sendgrid", "events.json")[index]
        event |= {
            "delivery_id": email.delivery_id,
            "email": email.recipient,
            "smtp-id": email.message_id,
            "sg_event_id": new_id("sg"),
            "sg_message_id": f"{secrets.token_hex(8)}.filter0001.16648.5515E0B88.0",
            "timestamp": now_unix() - AGE_SECONDS,
        }
        return _dumps([event])

    def delivered(self, email: Email) -> bytes:
        return self._event(2, email)

    def bounced(self, email: Email) -> bytes:
        return self._event(5, email)  # type "bounce": a hard bounce

    def malformed(self) -> dict[str, bytes]:
        return {"text": b"not json", "an object": b'{"event": "delivered"}', "numbers": b"[1, 2]"}


# --- Mailgun: HMAC of timestamp + token, in the body beside the event -----------------------------


@dataclass
class MailgunDriver(Timestamped):
    key: str
    name: ClassVar[str] = "mailgun"
    body_cap: ClassVar[int | None] = 256 * 1024
    unreadable_content_is_unsigned: ClassVar[bool] = True

    def env(self) -> dict[str, str]:
        return {"MAILGUN_WEBHOOK_SIGNING_KEY": self.key}

    @staticmethod
    def _body(content: bytes, signature: Mapping[str, str] | None) -> Signed:
        # The content as given, byte for byte, even where it is no JSON.
        signed = b'"signature": ' + _dumps(signature) + b", " if signature else b""
        return Signed(b"{" + signed + b'"event-data": ' + content + b"}", {})

    def sign(self, content: bytes) -> Signed:
        return self._body(content, mailgun_signature(self.key))

    def signed_at(self, content: bytes, unix_time: int) -> Signed:
        return self._body(content, mailgun_signature(self.key, unix_time))

    def forge(self, content: bytes) -> Signed:
        return self._body(content, mailgun_signature("key-someone-else"))

    def strip(self, content: bytes) -> Signed:
        return self._body(content, None)

    def _data(self, name: str, email: Email) -> dict[str, Any]:
        data: dict[str, Any] = fixture("mailgun", f"{name}.json")["event-data"]
        data |= {
            "id": new_id("mg"),
            "timestamp": now_unix() - AGE_SECONDS,
            "recipient": email.recipient,
            "user-variables": {"delivery_id": email.delivery_id},
        }
        # Mailgun keeps the Message-ID it was given over SMTP and reports it bare.
        data["message"]["headers"]["message-id"] = email.message_id.strip("<>")
        return data

    def delivered(self, email: Email) -> bytes:
        return _dumps(self._data("delivered", email))

    def bounced(self, email: Email) -> bytes:
        return _dumps(self._data("failed-permanent", email))

    def malformed(self) -> dict[str, bytes]:
        no_id = self._data("delivered", Email(new_id("mg")))
        del no_id["id"]
        return {"event-data null": b"null", "event without an id": _dumps(no_id)}


# --- Postmark: HTTP Basic credentials, nothing signed (so no time either) ------------------------


@dataclass
class PostmarkDriver(Driver):
    user: str
    password: str
    name: ClassVar[str] = "postmark"
    forged_status: ClassVar[int] = 401  # wrong credentials: there is no signature to fail

    def env(self) -> dict[str, str]:
        return {"POSTMARK_WEBHOOK_USERNAME": self.user, "POSTMARK_WEBHOOK_PASSWORD": self.password}

    def sign(self, content: bytes) -> Signed:
        return Signed(content, basic_auth(self.user, self.password))

    def forge(self, content: bytes) -> Signed:
        return Signed(content, basic_auth(self.user, "wrong"))

    def strip(self, content: bytes) -> Signed:
        return Signed(content, {})

    # Postmark's payloads echo its own MessageID (the relay id), not the Message-ID header.
    def delivered(self, email: Email) -> bytes:
        return _dumps(self._delivery(email))

    def _delivery(self, email: Email) -> dict[str, Any]:
        body: dict[str, Any] = fixture("postmark", "delivery.json")
        body |= {
            "Metadata": {"delivery_id": email.delivery_id},
            "MessageID": new_id("pm"),
            "Recipient": email.recipient,
            "DeliveredAt": _ago().isoformat(),
        }
        return body

    def bounced(self, email: Email) -> bytes:
        body: dict[str, Any] = fixture("postmark", "bounce-hard.json")
        body |= {
            "Metadata": {"delivery_id": email.delivery_id},
            "MessageID": new_id("pm"),
            "ID": secrets.randbelow(2**62),
            "Email": email.recipient,
            "BouncedAt": _ago().isoformat(),
        }
        return _dumps(body)

    def malformed(self) -> dict[str, bytes]:
        no_time = self._delivery(Email(new_id("pm")))
        del no_time["DeliveredAt"]
        return {"no time": _dumps(no_time), "a list": _dumps([no_time]), "not json": b"<xml/>"}


# --- Resend: Svix's HMAC over id.timestamp.body ------------------------------------------------


@dataclass
class ResendDriver(Timestamped):
    secret: str
    other: str = field(default_factory=svix_secret)
    name: ClassVar[str] = "resend"

    def env(self) -> dict[str, str]:
        return {"RESEND_WEBHOOK_SECRET": self.secret}

    @staticmethod
    def _svix_id(content: bytes) -> str:
        """Svix keeps a message's id across its retries: one id per content."""
        return "msg_" + hashlib.sha256(content).hexdigest()[:24]

    def sign(self, content: bytes) -> Signed:
        return Signed(content, svix_headers(self.secret, content, self._svix_id(content)))

    def signed_at(self, content: bytes, unix_time: int) -> Signed:
        headers = svix_headers(self.secret, content, self._svix_id(content), unix_time)
        return Signed(content, headers)

    def forge(self, content: bytes) -> Signed:
        return Signed(content, svix_headers(self.other, content, self._svix_id(content)))

    def strip(self, content: bytes) -> Signed:
        headers = self.sign(content).headers
        return Signed(content, {k: v for k, v in headers.items() if k != "svix-signature"})

    # Resend's payloads name its own email_id (the relay id), not the Message-ID header.
    def _event(self, name: str, email: Email) -> bytes:
        body: dict[str, Any] = fixture("resend", f"{name}.json")
        body["created_at"] = _ago().isoformat()
        body["data"] |= {
            "email_id": str(uuid.uuid4()),
            "to": [email.recipient],
            "tags": [{"name": "delivery_id", "value": email.delivery_id}],
        }
        return _dumps(body)

    def delivered(self, email: Email) -> bytes:
        return self._event("email.delivered", email)

    def bounced(self, email: Email) -> bytes:
        return self._event("email.bounced", email)

    def malformed(self) -> dict[str, bytes]:
        no_data = {"type": "email.delivered", "created_at": _ago().isoformat()}
        return {"no data": _dumps(no_data), "a list": b'["x"]'}


# --- Amazon SES: the record is the Message of an SNS Notification, RSA-signed -------------------
# SNS keeps a message's Timestamp across retries for days: no freshness, so not `Timestamped`.


@dataclass
class SesDriver(Driver):
    sns: SnsTestServer
    name: ClassVar[str] = "ses"
    body_cap: ClassVar[int | None] = 832 * 1024
    impostor: SnsSigner = field(init=False)

    def __post_init__(self) -> None:
        # Another key, claiming the real certificate's URL.
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.impostor = SnsSigner(key, self.sns.signer.cert_url)

    def env(self) -> dict[str, str]:
        return self.sns.settings(SNS_TOPIC)

    @staticmethod
    def _envelope(content: bytes) -> dict[str, str]:
        return {
            "Type": "Notification",
            # SNS keeps a message's MessageId across its retries: one id per content.
            "MessageId": str(uuid.uuid5(uuid.NAMESPACE_OID, hashlib.sha256(content).hexdigest())),
            "TopicArn": SNS_TOPIC,
            "Message": content.decode(),
            "Timestamp": "2026-11-23T10:00:00.000Z",
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
        }

    @staticmethod
    def _request(envelope: Mapping[str, str]) -> Signed:
        headers = {"x-amz-sns-message-type": "Notification", "Content-Type": "text/plain"}
        return Signed(_dumps(envelope), headers)

    def sign(self, content: bytes) -> Signed:
        return self._request(self.sns.signer.sign(self._envelope(content)))

    def forge(self, content: bytes) -> Signed:
        return self._request(self.impostor.sign(self._envelope(content)))

    def strip(self, content: bytes) -> Signed:
        signed = self.sns.signer.sign(self._envelope(content))
        return self._request({k: v for k, v in signed.items() if k != "Signature"})

    @staticmethod
    def _record(name: str, email: Email) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((FIXTURES / "ses" / f"{name}.json").read_text())
        record.pop("_source")
        when = _ago().isoformat().replace("+00:00", "Z")
        mail = record["mail"]
        mail["tags"]["delivery_id"] = [email.delivery_id]
        mail["messageId"] = f"0100018c{uuid.uuid4().hex}-000000"  # SES's own id
        mail["commonHeaders"]["messageId"] = email.message_id
        mail["destination"] = [email.recipient]
        mail["timestamp"] = when
        return record

    def delivered(self, email: Email) -> bytes:
        record = self._record("event-delivery", email)
        record["delivery"] |= {"recipients": [email.recipient], "timestamp": _ago().isoformat()}
        return _dumps(record)

    def bounced(self, email: Email) -> bytes:
        record = self._record("event-bounce", email)  # bounceType Permanent
        record["bounce"]["bouncedRecipients"][0]["emailAddress"] = email.recipient
        record["bounce"]["timestamp"] = _ago().isoformat()
        return _dumps(record)

    def malformed(self) -> dict[str, bytes]:
        return {
            "Message not JSON": b"not json",
            "Message a list": b'["a list"]',
            "no eventType": b'{"mail": {}}',
        }


DRIVER_TYPES: Mapping[str, type[Driver]] = {
    driver.name: driver
    for driver in (SendGridDriver, MailgunDriver, PostmarkDriver, ResendDriver, SesDriver)
}


def make_drivers(keys: ProviderKeys, sns: SnsTestServer) -> dict[str, Driver]:
    """Every provider's driver, with the session's keys."""
    return {
        "sendgrid": SendGridDriver(keys.sendgrid),
        "mailgun": MailgunDriver(keys.mailgun_key),
        "postmark": PostmarkDriver(keys.postmark_user, keys.postmark_password),
        "resend": ResendDriver(keys.resend_secret),
        "ses": SesDriver(sns),
    }
