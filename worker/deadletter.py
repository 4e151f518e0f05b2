"""Dead-letter messages (contract section 2): the original bytes plus fixed attributes.

A dead-letter message carries the event's original `data` bytes unchanged and these string
attributes: `delivery_id` and `workflow` (only when known), `reason`, `error_code`,
`error_message` (sanitised, at most 500 characters), `attempts`, `source_message_id`.
`publish_dead_letter` returns only once Pub/Sub has confirmed the message, so a ledger row is
marked `dead_letter` only after that.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from worker import pubsub
from worker.redact import MAX_ERROR_MESSAGE, sanitise
from worker.settings import PubSubSettings

__all__ = [
    "MAX_ERROR_MESSAGE_LENGTH",
    "Reason",
    "dead_letter_attributes",
    "publish_dead_letter",
]

MAX_ERROR_MESSAGE_LENGTH = MAX_ERROR_MESSAGE


class Reason(StrEnum):
    retries_exhausted = "retries_exhausted"
    permanent_failure = "permanent_failure"
    invalid_event = "invalid_event"


def dead_letter_attributes(
    *,
    reason: Reason,
    error_code: str,
    error_message: str,
    attempts: int,
    source_message_id: str,
    delivery_id: str | None,
    workflow: str | None,
) -> dict[str, str]:
    """The attributes of one dead-letter message; `delivery_id`/`workflow` only when known."""
    attributes = {
        "reason": Reason(reason).value,
        "error_code": sanitise(error_code),
        "error_message": sanitise(error_message),
        "attempts": str(int(attempts)),
        "source_message_id": source_message_id,
    }
    if delivery_id is not None:
        attributes["delivery_id"] = delivery_id
    if workflow is not None:
        attributes["workflow"] = workflow
    return attributes


def publish_dead_letter(
    settings: PubSubSettings, data: bytes, attributes: Mapping[str, str]
) -> str:
    """Publish the original `data` to the dead-letter topic; the confirmed message id.

    Raises `pubsub.PublishError` when the publish cannot be confirmed within
    `settings.publish_timeout_seconds`, or when no dead-letter topic is configured.
    """
    if settings.dead_letter_topic is None:
        raise pubsub.PublishError("no dead-letter topic configured (DEAD_LETTER_TOPIC)")
    return pubsub.publish(
        settings.topic_path(settings.dead_letter_topic),
        data,
        attributes,
        timeout=settings.publish_timeout_seconds,
    )
