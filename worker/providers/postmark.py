"""Postmark webhooks (docs/webhooks.md).

Authenticity: Postmark signs nothing; the webhook URL carries HTTP Basic credentials
  (https://postmarkapp.com/developer/webhooks/webhooks-overview, "Protecting your webhook").
Payloads, one object per request, told apart by `RecordType`:
  Delivery  https://postmarkapp.com/developer/webhooks/delivery-webhook
  Bounce    https://postmarkapp.com/developer/webhooks/bounce-webhook (`Type`: HardBounce,
            SoftBounce, Transient...; https://postmarkapp.com/developer/api/bounce-api#bounce-types)
  SpamComplaint https://postmarkapp.com/developer/webhooks/spam-complaint-webhook
  Open      https://postmarkapp.com/developer/webhooks/open-tracking-webhook
  Click     https://postmarkapp.com/developer/webhooks/click-webhook
  `MessageID` is Postmark's own id (the one its SMTP `250` reply names); `Metadata` holds
  the `X-PM-Metadata-delivery_id` header the worker sets
  (https://postmarkapp.com/developer/user-guide/send-email-with-smtp).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.core.settings import SettingsError
from worker.providers import common
from worker.providers.model import MAX_BODY_BYTES, Batch, Refused, WebhookRequest
from worker.store.tracking import EventType, ProviderEvent

PROVIDER = "postmark"
USERNAME_SETTING = "POSTMARK_WEBHOOK_USERNAME"
PASSWORD_SETTING = "POSTMARK_WEBHOOK_PASSWORD"

# Bounce `Type`s that end the delivery, and those Postmark retries or that say "later".
_HARD = frozenset(
    {"HardBounce", "BadEmailAddress", "ManuallyDeactivated", "Blocked", "DMARCPolicy"}
)
_SOFT = frozenset({"SoftBounce", "Transient", "DnsError"})


@dataclass(frozen=True)
class PostmarkAdapter:
    username: bytes = field(repr=False)
    password: bytes = field(repr=False)
    provider: str = PROVIDER
    max_body_bytes: int = MAX_BODY_BYTES

    def authenticate(self, request: WebhookRequest) -> None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise Refused(401, "no basic credentials")
        try:
            username, colon, password = base64.b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            raise Refused(401, "credentials are not base64") from None
        # Both compared, always, in constant time: no early exit tells which one was wrong.
        user_ok = hmac.compare_digest(username, self.username)
        password_ok = hmac.compare_digest(password, self.password)
        if not (colon and user_ok and password_ok):
            raise Refused(401, "credentials do not match")

    def events(self, request: WebhookRequest) -> Batch:
        payload = common.require_mapping(common.json_body(request.body), "body")
        event = normalise(payload)
        return Batch(events=(event,) if event is not None else ())


def normalise(payload: Mapping[str, Any]) -> ProviderEvent | None:
    record = common.require_str(payload, "RecordType")
    if record == "Delivery":
        return _event(payload, EventType.DELIVERED, "DeliveredAt", "Recipient")
    if record in ("Open", "Click"):
        engaged = EventType.OPENED if record == "Open" else EventType.CLICKED
        return _event(payload, engaged, "ReceivedAt", "Recipient")
    if record in ("Bounce", "SpamComplaint"):
        kind = _bounce_kind(record, common.bounce_kind(payload.get("Type"), "Type"))
        return None if kind is None else _event(payload, kind, "BouncedAt", "Email")
    return None  # SubscriptionChange, Inbound...: not a delivery outcome


def _bounce_kind(record: str, bounce_type: str | None) -> EventType | None:
    if record == "SpamComplaint" or bounce_type == "SpamComplaint":
        return EventType.COMPLAINED
    if bounce_type in _HARD:
        return EventType.BOUNCED
    if bounce_type in _SOFT:
        return EventType.DEFERRED
    return None  # AutoResponder, AddressChange, Unsubscribe...: no outcome


def _event(
    payload: Mapping[str, Any], event_type: EventType, time_key: str, recipient_key: str
) -> ProviderEvent:
    record = common.require_str(payload, "RecordType")
    postmark_id = common.require_str(payload, "MessageID", limit=common.MAX_RELAY_ID)
    occurred_at = common.iso_time(payload.get(time_key), time_key)
    recipient = common.recipient(payload.get(recipient_key), recipient_key)
    metadata = payload.get("Metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    bounce_id = payload.get("ID")
    if record in ("Bounce", "SpamComplaint") and isinstance(bounce_id, int | str):
        event_id = common.checked(f"{record}:{bounce_id}", "ID", common.MAX_EVENT_ID)
    else:
        # Deliveries, opens and clicks carry no id of their own: one digest of what tells
        # them apart (never the clicked link).
        event_id = common.digest_id(record, postmark_id, recipient, payload.get(time_key))
    bounce_type: str | None = None
    detail: dict[str, Any] = {"provider_message_id": postmark_id, "record_type": record}
    if event_type in (EventType.BOUNCED, EventType.DEFERRED):
        bounce_type = "hard" if event_type is EventType.BOUNCED else "soft"
        detail |= {
            "type": common.bounce_kind(payload.get("Type"), "Type"),
            "type_code": payload.get("TypeCode")
            if isinstance(payload.get("TypeCode"), int)
            else None,
            "diagnostic": common.diagnostic(payload.get("Details")),
        }
    elif event_type in (EventType.OPENED, EventType.CLICKED):
        platform = common.optional_str(payload, "Platform")
        detail["user_agent_class"] = platform.lower() if platform in _PLATFORMS else None
    return ProviderEvent(
        provider=PROVIDER,
        provider_event_id=event_id,
        event_type=event_type,
        occurred_at=occurred_at,
        recipient=recipient,
        delivery_id=common.delivery_id(metadata.get("delivery_id")),
        message_id=None,  # Postmark's payloads do not echo the Message-ID header
        relay_message_id=postmark_id,
        bounce_type=bounce_type,
        detail=common.compact(detail),
    )


_PLATFORMS = frozenset({"Desktop", "Mobile", "WebMail", "Unknown"})


def from_env(setting: common.Setting) -> PostmarkAdapter | None:
    username, password = setting(USERNAME_SETTING), setting(PASSWORD_SETTING)
    if username is None and password is None:
        return None
    if username is None or password is None:
        raise SettingsError(f"set both {USERNAME_SETTING} and {PASSWORD_SETTING}, or neither")
    if ":" in username:
        raise SettingsError(f"{USERNAME_SETTING} must not contain ':' (HTTP Basic)")
    return PostmarkAdapter(username=username.encode(), password=password.encode())
