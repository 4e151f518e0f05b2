"""Enqueue one delivery on the delivery topic: `python -m worker publish`.

The event is checked with the worker's own parser first, so a bad one is refused here with
the field and the rule, instead of being dead-lettered later.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.core import pubsub as worker_pubsub
from worker.core.settings import PubSubSettings, SettingsError
from worker.delivery import events


@dataclass(frozen=True)
class Enqueued:
    delivery_id: str
    message_id: str
    topic: str


def new_delivery_id() -> str:
    return f"cli_{uuid.uuid4().hex}"


def check_delivery(body: Mapping[str, Any]) -> events.DeliveryEvent:
    """The event as the worker will read it, or `events.InvalidEvent` (field and rule)."""
    try:
        data = json.dumps(dict(body), ensure_ascii=False, separators=(",", ":")).encode()
    except RecursionError:  # nested deeper than the encoder's stack; the rule is far lower
        rule = f"must not nest deeper than {events.MAX_DEPTH} levels"
        raise events.InvalidEvent("message.data", rule) from None
    return events.parse_delivery(events.PubSubMessage(data=data, attributes={}, message_id=""))


def enqueue(settings: PubSubSettings, event: events.DeliveryEvent) -> Enqueued:
    """Publish a checked event to the delivery topic; returns once Pub/Sub confirmed it."""
    if settings.delivery_topic is None:
        raise SettingsError("DELIVERY_TOPIC is required but not set")
    topic = settings.topic_path(settings.delivery_topic)
    message_id = worker_pubsub.publish(
        topic, event.message.data, {}, timeout=settings.publish_timeout_seconds
    )
    return Enqueued(event.delivery_id, message_id, topic)
