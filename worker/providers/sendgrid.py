"""SendGrid's Event Webhook (docs/webhooks.md).

Signature: https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features
  ECDSA P-256 with SHA-256 over `timestamp + raw body`, base64 in
  `X-Twilio-Email-Event-Webhook-Signature`, the timestamp in `...-Timestamp`; the public key
  is shown by SendGrid as base64 DER (SubjectPublicKeyInfo).
Events: https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event
  A JSON array; each event has `event`, `email`, `timestamp`, `sg_event_id`,
  `sg_message_id`, `smtp-id`, and the unique arguments (custom args) of its email as
  top-level keys: the worker attaches `delivery_id` through X-SMTPAPI `unique_args`
  (https://www.twilio.com/docs/sendgrid/for-developers/sending-email/building-an-x-smtpapi-header).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from worker.core.settings import SettingsError
from worker.providers import common
from worker.providers.model import MAX_BODY_BYTES, Batch, Malformed, Refused, WebhookRequest
from worker.store.tracking import EventType, ProviderEvent

PROVIDER = "sendgrid"
KEY_SETTING = "SENDGRID_WEBHOOK_PUBLIC_KEY"
SIGNATURE_HEADER = "x-twilio-email-event-webhook-signature"
TIMESTAMP_HEADER = "x-twilio-email-event-webhook-timestamp"

# SendGrid's event names -> ours. processed, unsubscribe, group_* are not delivery outcomes.
_TYPES = {
    "delivered": EventType.DELIVERED,
    "open": EventType.OPENED,
    "click": EventType.CLICKED,
    "bounce": EventType.BOUNCED,  # `type` is "bounce" (hard) or "blocked" (refused by the server)
    "dropped": EventType.BOUNCED,  # SendGrid never sent it (suppressed, invalid...)
    "deferred": EventType.DEFERRED,
    "spamreport": EventType.COMPLAINED,
}


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The key as SendGrid shows it (base64 DER); a PEM block is accepted too."""
    try:
        if "BEGIN PUBLIC KEY" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise SettingsError(f"{KEY_SETTING} is not a base64 DER public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SettingsError(f"{KEY_SETTING} must be an ECDSA P-256 public key")
    return key


@dataclass(frozen=True)
class SendGridAdapter:
    public_key: ec.EllipticCurvePublicKey
    clock: common.Clock = time.time
    provider: str = PROVIDER
    max_body_bytes: int = MAX_BODY_BYTES

    def authenticate(self, request: WebhookRequest) -> None:
        signature = request.headers.get(SIGNATURE_HEADER)
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        if not signature or not timestamp:
            raise Refused(401, "signature headers missing")
        common.check_fresh(timestamp, self.clock)
        try:
            decoded = base64.b64decode(signature, validate=True)
            self.public_key.verify(
                decoded, timestamp.encode() + request.body, ec.ECDSA(hashes.SHA256())
            )
        except (binascii.Error, ValueError, InvalidSignature):
            raise Refused(403, "signature does not verify") from None

    def events(self, request: WebhookRequest) -> Batch:
        payload = common.json_body(request.body)
        if not isinstance(payload, list):
            raise Malformed("body", "must be a JSON array of events")
        events: list[ProviderEvent] = []
        rejected: list[Malformed] = []
        for index, item in enumerate(payload):
            try:
                event = normalise(item, index)
            except Malformed as malformed:
                rejected.append(malformed)
                continue
            if event is not None:
                events.append(event)
        return Batch(events=tuple(events), rejected=tuple(rejected))


def normalise(item: Any, index: int) -> ProviderEvent | None:
    """One SendGrid event, or None for a kind we do not track (processed, unsubscribe...)."""
    where = f"[{index}]"
    event = common.require_mapping(item, where)
    name = common.require_str(event, "event", f"{where}.event")
    event_type = _TYPES.get(name)
    if event_type is None:
        return None
    event_id = common.event_id(event, "sg_event_id", f"{where}.sg_event_id")
    occurred_at = common.unix_time(event.get("timestamp"), f"{where}.timestamp")
    sg_message_id = common.relay_message_id(event, "sg_message_id", f"{where}.sg_message_id")
    bounce_type, detail = _outcome(name, event, where)
    return ProviderEvent(
        provider=PROVIDER,
        provider_event_id=event_id,
        event_type=event_type,
        occurred_at=occurred_at,
        recipient=common.recipient(event.get("email"), f"{where}.email"),
        delivery_id=common.delivery_id(event.get("delivery_id")),
        message_id=common.message_id(event.get("smtp-id")),
        relay_message_id=relay_id(sg_message_id),
        bounce_type=bounce_type,
        detail=common.compact({"provider_message_id": sg_message_id, "event": name, **detail}),
    )


def relay_id(sg_message_id: str | None) -> str | None:
    """`sg_message_id` is the X-Message-ID SendGrid answered with (`250 Ok: queued as <id>`)
    plus a `.filterNNNN...` suffix of its own; the part before it is what the relay named."""
    if sg_message_id is None:
        return None
    return sg_message_id.split(".filter", 1)[0] or None


def _outcome(name: str, event: Mapping[str, Any], where: str) -> tuple[str | None, dict[str, Any]]:
    if name == "bounce":
        kind = common.bounce_kind(event.get("type"), f"{where}.type") or "bounce"
        return ("hard" if kind == "bounce" else kind), {
            "type": kind,
            "classification": common.optional_str(
                event, "bounce_classification", f"{where}.bounce_classification"
            ),
            "status": common.optional_str(event, "status", f"{where}.status"),
            "diagnostic": common.diagnostic(event.get("reason")),
        }
    if name == "dropped":
        return "dropped", {"diagnostic": common.diagnostic(event.get("reason"))}
    if name == "deferred":
        return "soft", {
            "diagnostic": common.diagnostic(event.get("response")),
            "attempt": common.optional_str(event, "attempt", f"{where}.attempt"),
        }
    if name in ("open", "click"):
        # The clicked `url` and the raw user agent are never kept: a class at most.
        return None, {
            "user_agent_class": common.user_agent_class(event.get("useragent")),
            "machine_open": event.get("sg_machine_open") is True or None,
        }
    return None, {}


def from_env(setting: common.Setting) -> SendGridAdapter | None:
    key = setting(KEY_SETTING)
    if key is None:
        return None
    return SendGridAdapter(public_key=load_public_key(key))
