"""Amazon SES events carried by Amazon SNS (docs/webhooks.md, route `…/ses`).

Both SES formats arrive as the `Message` of an SNS Notification:
- event publishing through a configuration set (`eventType`), documented at
  https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-contents.html
  (examples: …/event-publishing-retrieving-sns-examples.html);
- identity feedback notifications (`notificationType`: Bounce, Complaint, Delivery),
  https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html
  (examples: …/notification-examples.html). These carry no tags, and headers only when
  "include original headers" is on.

One SES record may name several recipients ("you might receive one Amazon SNS notification
for multiple recipients", notification-contents.html): each becomes its own event, with an
id made of the SNS MessageId (kept by SNS across retries) and a digest of the address.

Never kept: clicked links and link tags (a click on a reset link carries its token), bodies,
the envelope, IP addresses, full user agents. `detail` holds what support needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.providers import common
from worker.providers.common import iso_time
from worker.providers.model import Batch, Malformed, WebhookRequest
from worker.providers.sns import MAX_ENVELOPE_BYTES, MessageType, SnsMessage, SnsVerifier
from worker.store.tracking import EventType, ProviderEvent

PROVIDER = "ses"
DELIVERY_ID_TAG = "delivery_id"  # the worker sends `X-SES-MESSAGE-TAGS: delivery_id=<id>`

# RFC 5322's line length; no NUL and no lone surrogate (PostgreSQL stores neither).
_MESSAGE_ID = re.compile(r"<?([^<>\s\x00\ud800-\udfff]{1,994})>?")


class SesAdapter:
    """The `Adapter` for `…/ses`: SNS authenticity, then SES records to `ProviderEvent`s."""

    provider = PROVIDER
    # The envelope is parsed before its signature can be checked: no larger than SNS sends.
    max_body_bytes = MAX_ENVELOPE_BYTES

    def __init__(self, verifier: SnsVerifier) -> None:
        self._verifier = verifier

    def authenticate(self, request: WebhookRequest) -> None:
        self._verifier.verify(request.body)

    def events(self, request: WebhookRequest) -> Batch:
        # Verified again (the certificate is cached, an RSA check costs microseconds) so
        # that this method never trusts a body on its caller's word.
        message = self._verifier.verify(request.body)
        if message.type is MessageType.SUBSCRIPTION_CONFIRMATION:
            self._verifier.confirm_subscription(message)
            return Batch(())
        if message.type is MessageType.UNSUBSCRIBE_CONFIRMATION:
            return Batch(())
        return Batch(tuple(parse_notification(message)))


def from_env(setting: Callable[[str], str | None]) -> SesAdapter | None:
    """None when `SNS_TOPIC_ARNS` is absent (the route answers 404); `SnsSettingsError` (a
    `SettingsError` and a `ValueError`) with one line naming the setting when one is malformed."""
    topic_arns = setting("SNS_TOPIC_ARNS")
    if topic_arns is None or not topic_arns.strip():
        return None
    verifier = SnsVerifier.from_settings(
        topic_arns, setting("SNS_CERT_HOSTS"), setting("SNS_CA_FILE")
    )
    return SesAdapter(verifier)


# --- SES records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mail:
    """The matching keys of the `mail` object shared by every SES record."""

    ses_message_id: str
    delivery_id: str | None
    message_id: str | None
    destination: tuple[str, ...]
    timestamp: datetime | None


@dataclass(frozen=True)
class _Recipient:
    address: str | None
    detail: Mapping[str, Any]


def parse_notification(message: SnsMessage) -> Iterator[ProviderEvent]:
    """The events of one verified SNS Notification whose Message is an SES record."""
    try:
        record = json.loads(message.message)
    except (ValueError, RecursionError):  # also a huge integer, or nesting past the stack
        raise Malformed("Message", "not JSON") from None
    if not isinstance(record, dict):
        raise Malformed("Message", "not a JSON object")
    kind = record.get("eventType", record.get("notificationType"))
    if not isinstance(kind, str):
        raise Malformed("Message.eventType", "required (eventType or notificationType)")
    handler = _HANDLERS.get(kind)
    if handler is None:
        # Send, Rendering Failure, Subscription, Received (inbound) and types SES adds later
        # are not one of the six provider events: acknowledged, nothing recorded.
        return
    mail = _mail(_object(record, "mail", "mail"))
    event_type, section, recipients, bounce_type = handler(record, mail)
    occurred_at = (
        _timestamp(section.get("timestamp"), f"{_key(kind)}.timestamp")
        or mail.timestamp
        or _timestamp(message.timestamp, "Timestamp")
        or datetime.now(UTC)
    )
    common = {"event": kind, "provider_message_id": mail.ses_message_id}
    for recipient in recipients:
        yield ProviderEvent(
            provider=PROVIDER,
            provider_event_id=_event_id(message.message_id, recipient.address),
            event_type=event_type,
            occurred_at=occurred_at,
            recipient=recipient.address,
            delivery_id=mail.delivery_id,
            message_id=mail.message_id,
            relay_message_id=mail.ses_message_id,
            bounce_type=bounce_type,
            detail={**common, **recipient.detail},
        )


_Handled = tuple[EventType, Mapping[str, Any], list[_Recipient], str | None]


def _delivery(record: Mapping[str, Any], mail: _Mail) -> _Handled:
    section = _object(record, "delivery", "delivery")
    addresses = _addresses(section.get("recipients"), "delivery.recipients")
    return EventType.DELIVERED, section, [_Recipient(a, {}) for a in addresses], None


def _bounce(record: Mapping[str, Any], mail: _Mail) -> _Handled:
    """Only `Permanent` is a hard bounce. For `Transient` and `Undetermined` SES has given up
    on this email (soft bounces are published "only … when SES fails to deliver the email
    after retrying", https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_EventDestination.html),
    but the address may work later (bounce types, notification-contents.html#bounce-types):
    `deferred` with bounce_type "soft", recorded without suppressing the address."""
    section = _object(record, "bounce", "bounce")
    kind = section.get("bounceType")
    if kind not in ("Permanent", "Transient", "Undetermined"):
        raise Malformed("bounce.bounceType", "Permanent, Transient or Undetermined")
    event_type = EventType.BOUNCED if kind == "Permanent" else EventType.DEFERRED
    common = _texts(section, {"type": "bounceType", "sub_type": "bounceSubType"})
    common |= _texts(section, {"feedback_id": "feedbackId"})
    recipients = [
        _Recipient(
            address,
            common | _texts(entry, {"status": "status", "diagnostic": "diagnosticCode"}),
        )
        for entry, address in _entries(section.get("bouncedRecipients"), "bounce.bouncedRecipients")
    ]
    return event_type, section, recipients, "hard" if kind == "Permanent" else "soft"


def _complaint(record: Mapping[str, Any], mail: _Mail) -> _Handled:
    section = _object(record, "complaint", "complaint")
    common = _texts(
        section,
        {
            "feedback_type": "complaintFeedbackType",
            "sub_type": "complaintSubType",
            "feedback_id": "feedbackId",
        },
    )
    entries = _entries(section.get("complainedRecipients"), "complaint.complainedRecipients")
    return EventType.COMPLAINED, section, [_Recipient(a, common) for _, a in entries], None


def _delivery_delay(record: Mapping[str, Any], mail: _Mail) -> _Handled:
    section = _object(record, "deliveryDelay", "deliveryDelay")
    common = _texts(section, {"type": "delayType"})
    recipients = [
        _Recipient(
            address,
            common | _texts(entry, {"status": "status", "diagnostic": "diagnosticCode"}),
        )
        for entry, address in _entries(
            section.get("delayedRecipients"), "deliveryDelay.delayedRecipients"
        )
    ]
    return EventType.DEFERRED, section, recipients, None


def _reject(record: Mapping[str, Any], mail: _Mail) -> _Handled:
    """SES refused to send (it found a virus): the provider dropped the email, which the
    service counts as `bounced` (docs/webhooks.md). The record has no timestamp of its own."""
    section = _object(record, "reject", "reject")
    detail = _texts(section, {"diagnostic": "reason"})
    if not mail.destination:
        raise Malformed("mail.destination", "non-empty list of addresses")
    return EventType.BOUNCED, {}, [_Recipient(a, detail) for a in mail.destination], "hard"


def _open(record: Mapping[str, Any], mail: _Mail) -> _Handled:
    section = _object(record, "open", "open")
    return EventType.OPENED, section, [_engaged(section, mail)], None


def _click(record: Mapping[str, Any], mail: _Mail) -> _Handled:
    # `click.link` and `click.linkTags` are never read: the link may be a reset link.
    section = _object(record, "click", "click")
    return (
        EventType.CLICKED,
        {"timestamp": section.get("timestamp")},
        [_engaged(section, mail)],
        None,
    )


def _engaged(section: Mapping[str, Any], mail: _Mail) -> _Recipient:
    """Opens and clicks do not say which recipient acted: the sole recipient, if one."""
    address = mail.destination[0] if len(mail.destination) == 1 else None
    agent = section.get("userAgent")
    detail = {"user_agent_class": common.user_agent_class(agent)} if isinstance(agent, str) else {}
    return _Recipient(address, detail)


_HANDLERS: Mapping[str, Callable[[Mapping[str, Any], _Mail], _Handled]] = {
    "Delivery": _delivery,
    "Bounce": _bounce,
    "Complaint": _complaint,
    "DeliveryDelay": _delivery_delay,
    "Reject": _reject,
    "Open": _open,
    "Click": _click,
}


# --- the mail object and its matching keys -------------------------------------------------


def _mail(mail: Mapping[str, Any]) -> _Mail:
    ses_message_id = common.optional_str(mail, "messageId", "mail.messageId", common.MAX_RELAY_ID)
    if ses_message_id is None:
        raise Malformed("mail.messageId", "required")
    destination = mail.get("destination", [])
    if not isinstance(destination, list):
        raise Malformed("mail.destination", "list of addresses")
    addresses = [common.recipient(a, "mail.destination") for a in destination]
    headers = _headers(mail.get("headers"))
    common_headers = mail.get("commonHeaders")
    common_id = common_headers.get("messageId") if isinstance(common_headers, dict) else None
    return _Mail(
        ses_message_id=ses_message_id,
        delivery_id=_delivery_id(mail.get("tags"), headers),
        message_id=_message_id(
            common_id if isinstance(common_id, str) else headers.get("message-id")
        ),
        destination=tuple(address for address in addresses if address is not None),
        timestamp=_timestamp(mail.get("timestamp"), "mail.timestamp"),
    )


def _headers(value: object) -> dict[str, str]:
    """`mail.headers` as lower-cased name -> first value (present only when SES was asked
    to include the original headers)."""
    headers: dict[str, str] = {}
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                name, text = item.get("name"), item.get("value")
                if isinstance(name, str) and isinstance(text, str):
                    headers.setdefault(name.lower(), text)
    return headers


def _delivery_id(tags: object, headers: Mapping[str, str]) -> str | None:
    """Event publishing copies message tags into `mail.tags` ({name: [value]}); identity
    notifications publish no tags, so fall back to the original X-SES-MESSAGE-TAGS header
    ("name1=value1, name2=value2",
    https://docs.aws.amazon.com/ses/latest/dg/event-publishing-send-email.html)."""
    candidate: object = None
    if isinstance(tags, dict):
        values = tags.get(DELIVERY_ID_TAG)
        if isinstance(values, list) and values:
            candidate = values[0]
    if candidate is None:
        for pair in headers.get("x-ses-message-tags", "").split(","):
            name, equals, value = pair.partition("=")
            if equals and name.strip() == DELIVERY_ID_TAG:
                candidate = value.strip()
                break
    return common.delivery_id(candidate)


def _message_id(value: str | None) -> str | None:
    """The email's Message-ID in the worker's form, `<local@domain>` (SES reports the
    original header, with or without the angle brackets)."""
    if value is None:
        return None
    match = _MESSAGE_ID.fullmatch(value.strip())
    return f"<{match.group(1)}>" if match else None


# --- small readers: shapes are checked, values never echoed in errors --------------------------


def _key(kind: str) -> str:
    return {"DeliveryDelay": "deliveryDelay"}.get(kind, kind.lower())


def _object(record: Mapping[str, Any], name: str, field: str) -> Mapping[str, Any]:
    value = record.get(name)
    if not isinstance(value, dict):
        raise Malformed(field, "required object")
    return value


def _addresses(value: object, field: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise Malformed(field, "non-empty list of addresses")
    if not all(isinstance(item, str) and "@" in item for item in value):
        raise Malformed(field, "addresses")
    return [common.checked(item.strip(), field, common.MAX_RECIPIENT) for item in value]


def _entries(value: object, field: str) -> list[tuple[Mapping[str, Any], str]]:
    """`[{"emailAddress": ...}, ...]` as (entry, address) pairs."""
    if not isinstance(value, list) or not value:
        raise Malformed(field, "non-empty list of recipients")
    pairs: list[tuple[Mapping[str, Any], str]] = []
    for entry in value:
        address = entry.get("emailAddress") if isinstance(entry, dict) else None
        if not isinstance(address, str) or "@" not in address:
            raise Malformed(f"{field}[].emailAddress", "required address")
        pairs.append((entry, common.checked(address.strip(), field, common.MAX_RECIPIENT)))
    return pairs


def _texts(section: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, str]:
    """Selected string fields, sanitised (no URLs, masked addresses) and short."""
    out: dict[str, str] = {}
    for key, name in names.items():
        value = section.get(name)
        text = common.diagnostic(value) if isinstance(value, str) else None
        if text:
            out[key] = text
    return out


def _timestamp(value: object, field: str) -> datetime | None:
    return None if value is None else iso_time(value, field)


def _event_id(sns_message_id: str, address: str | None) -> str:
    """Stable across SNS retries (same MessageId) and unique per recipient of one record."""
    # The suffix is at most 17 characters; the MessageId must leave room for it.
    common.checked(sns_message_id, "MessageId", common.MAX_EVENT_ID - 17)
    if address is None:
        return f"{sns_message_id}:-"
    digest = hashlib.sha256(address.lower().encode("utf-8")).hexdigest()[:16]
    return f"{sns_message_id}:{digest}"
