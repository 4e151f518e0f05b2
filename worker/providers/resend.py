"""Resend webhooks, delivered through Svix (docs/webhooks.md).

Signature: https://resend.com/docs/dashboard/webhooks/verify-webhooks-requests and
  https://docs.svix.com/receiving/verifying-payloads/how-manual: headers `svix-id`,
  `svix-timestamp`, `svix-signature` (space-separated `v1,<base64>` entries, any of which
  may match during a secret rotation); the signed content is `id.timestamp.body`, keyed with
  the base64 bytes after `whsec_`.
Events: https://resend.com/docs/dashboard/webhooks/event-types and
  https://resend.com/docs/dashboard/webhooks/body-parameters: `type` (email.delivered,
  email.opened, email.clicked, email.bounced, email.complained, email.delivery_delayed,
  email.failed, email.suppressed...), `created_at`, `data` with `email_id` (Resend's id),
  `to`, `tags`, `bounce` and `click` (whose `link` is never read).
Resend's SMTP service documents custom headers but no header that becomes a tag
  (https://resend.com/docs/send-with-smtp), so over SMTP an event is matched by Resend's
  `email_id` (the relay id); a `delivery_id` tag is used when present (API sends).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.core.settings import SettingsError
from worker.providers import common
from worker.providers.model import MAX_BODY_BYTES, Batch, Refused, WebhookRequest
from worker.store.tracking import EventType, ProviderEvent

PROVIDER = "resend"
SECRET_SETTING = "RESEND_WEBHOOK_SECRET"
SECRET_PREFIX = "whsec_"

_TYPES = {
    "email.delivered": EventType.DELIVERED,
    "email.opened": EventType.OPENED,
    "email.clicked": EventType.CLICKED,
    "email.bounced": EventType.BOUNCED,
    "email.failed": EventType.BOUNCED,  # Resend could not send it
    "email.suppressed": EventType.BOUNCED,  # on Resend's suppression list: never sent
    "email.complained": EventType.COMPLAINED,
    "email.delivery_delayed": EventType.DEFERRED,
}


def load_secret(text: str) -> bytes:
    encoded = text.removeprefix(SECRET_PREFIX)
    try:
        secret = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(f"{SECRET_SETTING} must be whsec_ followed by base64") from None
    if not secret:
        raise SettingsError(f"{SECRET_SETTING} is empty after whsec_")
    return secret


@dataclass(frozen=True)
class ResendAdapter:
    secret: bytes = field(repr=False)
    clock: common.Clock = time.time
    provider: str = PROVIDER
    max_body_bytes: int = MAX_BODY_BYTES

    def authenticate(self, request: WebhookRequest) -> None:
        msg_id = request.headers.get("svix-id")
        timestamp = request.headers.get("svix-timestamp")
        signatures = request.headers.get("svix-signature")
        if not msg_id or not timestamp or not signatures:
            raise Refused(401, "svix headers missing")
        common.check_fresh(timestamp, self.clock)
        signed = msg_id.encode() + b"." + timestamp.encode() + b"." + request.body
        expected = base64.b64encode(hmac.new(self.secret, signed, hashlib.sha256).digest())
        for entry in signatures.split():
            version, _, value = entry.partition(",")
            if version == "v1" and hmac.compare_digest(value.encode(), expected):
                return
        raise Refused(403, "signature does not verify")

    def events(self, request: WebhookRequest) -> Batch:
        payload = common.require_mapping(common.json_body(request.body), "body")
        # svix-id is the message's id, the same on each of Svix's retries: the event id.
        event_id = common.checked(request.headers["svix-id"], "svix-id", common.MAX_EVENT_ID)
        event = normalise(payload, event_id)
        return Batch(events=(event,) if event is not None else ())


def normalise(payload: Mapping[str, Any], event_id: str) -> ProviderEvent | None:
    name = common.require_str(payload, "type")
    event_type = _TYPES.get(name)
    if event_type is None:
        return None  # email.sent, email.scheduled, contact.*, domain.*: not outcomes
    occurred_at = common.iso_time(payload.get("created_at"), "created_at")
    data = common.require_mapping(payload.get("data"), "data")
    email_id = common.require_str(data, "email_id", "data.email_id", common.MAX_RELAY_ID)
    to = data.get("to")
    recipient = common.recipient(to[0], "data.to") if isinstance(to, list) and to else None
    bounce_type, detail = _outcome(event_type, name, data)
    return ProviderEvent(
        provider=PROVIDER,
        provider_event_id=event_id,
        event_type=event_type,
        occurred_at=occurred_at,
        recipient=recipient,
        delivery_id=common.delivery_id(_tag(data.get("tags"), "delivery_id")),
        message_id=None,  # Resend's payloads do not carry the Message-ID header
        relay_message_id=email_id,
        bounce_type=bounce_type,
        detail=common.compact({"provider_message_id": email_id, "event": name, **detail}),
    )


def _tag(tags: Any, name: str) -> Any:
    """Tags arrive as a list of {name, value} (body-parameters page) or as an object
    (the examples on the event-type pages); both are read."""
    if isinstance(tags, Mapping):
        return tags.get(name)
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, Mapping) and tag.get("name") == name:
                return tag.get("value")
    return None


def _outcome(
    event_type: EventType, name: str, data: Mapping[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    if event_type is EventType.BOUNCED:
        bounce = data.get("bounce")
        bounce = bounce if isinstance(bounce, Mapping) else {}
        return ("hard" if name == "email.bounced" else name.removeprefix("email.")), {
            "type": common.optional_str(bounce, "type", "data.bounce.type"),
            "sub_type": common.optional_str(bounce, "subType", "data.bounce.subType"),
            "diagnostic": common.diagnostic(
                bounce.get("diagnosticCode") or bounce.get("message") or _failed_reason(data)
            ),
        }
    if event_type is EventType.DEFERRED:
        return "soft", {}
    if event_type in (EventType.OPENED, EventType.CLICKED):
        # data.click.link is a reset or invite link: never read. The user agent: a class.
        inner = data.get("click") if event_type is EventType.CLICKED else data.get("open")
        agent = inner.get("userAgent") if isinstance(inner, Mapping) else None
        return None, {"user_agent_class": common.user_agent_class(agent)}
    return None, {}


def _failed_reason(data: Mapping[str, Any]) -> Any:
    failed = data.get("failed")
    return failed.get("reason") if isinstance(failed, Mapping) else None


def from_env(setting: common.Setting) -> ResendAdapter | None:
    secret = setting(SECRET_SETTING)
    if secret is None:
        return None
    return ResendAdapter(secret=load_secret(secret))
