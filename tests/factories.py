"""Delivery events as upstream services publish them, wrapped as the function receives them."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from cloudevents.http import CloudEvent

CODE = "739154"
INVITE_URL = "https://app.example.com/i/secret-invite-token-123"
RESET_URL = "https://app.example.com/reset/secret-reset-token-456"

DATA: dict[str, dict[str, Any]] = {
    "verification-code": {"code": CODE, "expires_in_minutes": 10},
    "invite": {"organization_name": "Acme", "inviter_name": "Grace", "invite_url": INVITE_URL},
    "password-reset": {"reset_url": RESET_URL, "expires_in_minutes": 30},
}


def payload(workflow: str = "verification-code", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "delivery_id": f"d_{uuid.uuid4().hex[:12]}",
        "workflow": workflow,
        "recipient": "ada@example.com",
        "data": dict(DATA[workflow]),
        "metadata": {"tenant": "acme"},
        "locale": "en",
    }
    body.update(overrides)
    return body


def encode(body: dict[str, Any] | bytes) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def cloud_event(
    body: dict[str, Any] | bytes,
    *,
    message_id: str | None = None,
    attributes: dict[str, str] | None = None,
    traceparent: str | None = None,
    published: datetime | str | None = None,
) -> CloudEvent:
    """The Eventarc shape of a Pub/Sub `messagePublished` event, published `published` (by
    default now: a code's validity runs from its publish time)."""
    message_id = message_id or str(uuid.uuid4().int)[:16]
    headers = {
        "type": "google.cloud.pubsub.topic.v1.messagePublished",
        "source": "//pubsub.googleapis.com/projects/test-project/topics/deliveries",
        "id": message_id,
    }
    if traceparent:
        headers["traceparent"] = traceparent
    data = {
        "message": {
            "data": base64.b64encode(encode(body)).decode(),
            "attributes": attributes or {},
            "messageId": message_id,
            "publishTime": publish_time(published),
        },
        "subscription": "projects/test-project/subscriptions/eventarc-sub",
    }
    return CloudEvent(headers, data)


def publish_time(published: datetime | str | None = None) -> str:
    """Pub/Sub's `publishTime` form (RFC 3339, UTC, `Z`), of `published` or now."""
    if isinstance(published, str):
        return published
    moment = (published or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
