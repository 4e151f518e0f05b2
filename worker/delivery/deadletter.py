"""Dead-letter messages (docs/reference.md): the original bytes plus fixed attributes.

A dead-letter message carries the event's original `data` bytes unchanged and these string
attributes: `delivery_id` and `workflow` (only when known), `reason`, `error_code`,
`error_message` (sanitised, at most 500 characters), `attempts`, `source_message_id`.
`DeadLetterPublisher.publish` returns only once Pub/Sub has confirmed the message, so a
ledger row is marked `failed`/`dead_letter` only after that. The function's worker holds one
publisher (worker/delivery/pipeline.py), like its ledger and SMTP sender.
"""

from __future__ import annotations

from collections.abc import Mapping

from worker.core import pubsub
from worker.core.redact import MAX_ERROR_MESSAGE, sanitise
from worker.core.settings import PubSubSettings
from worker.store.ledger import DEAD_LETTER_REASONS, Reason

__all__ = [
    "MAX_ERROR_MESSAGE_LENGTH",
    "DeadLetterPublisher",
    "dead_letter_attributes",
]

MAX_ERROR_MESSAGE_LENGTH = MAX_ERROR_MESSAGE


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
    if reason not in DEAD_LETTER_REASONS:
        raise ValueError(f"{reason!r} is not a dead-letter reason")
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


class DeadLetterPublisher:
    """Publishes to `settings.dead_letter_topic` with its own client, made on first use."""

    def __init__(self, settings: PubSubSettings) -> None:
        self.settings = settings
        self._publisher = pubsub.Publisher()

    def publish(self, data: bytes, attributes: Mapping[str, str]) -> str:
        """Publish the original `data`; the confirmed message id.

        Raises `pubsub.PublishError` when the publish cannot be confirmed within
        `settings.publish_timeout_seconds`, or when no dead-letter topic is configured.
        """
        topic = self.settings.dead_letter_topic
        if topic is None:
            raise pubsub.PublishError("no dead-letter topic configured (DEAD_LETTER_TOPIC)")
        return self._publisher.publish(
            self.settings.topic_path(topic),
            data,
            attributes,
            timeout=self.settings.publish_timeout_seconds,
        )

    def close(self) -> None:
        self._publisher.close()
