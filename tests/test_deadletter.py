"""Dead-letter messages against the real Pub/Sub emulator (docs/reference.md)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.pubsub import DeadPubSub, PubSubNamespace
from worker.core import pubsub as worker_pubsub
from worker.core.settings import PubSubSettings
from worker.delivery.deadletter import (
    MAX_ERROR_MESSAGE_LENGTH,
    DeadLetterPublisher,
    dead_letter_attributes,
)
from worker.store.ledger import DEAD_LETTER_REASONS, Reason

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {
    "delivery_id",
    "workflow",
    "reason",
    "error_code",
    "error_message",
    "attempts",
    "source_message_id",
}


def _attributes(**overrides: object) -> dict[str, str]:
    arguments: dict[str, object] = {
        "reason": Reason.RETRIES_EXHAUSTED,
        "error_code": "SMTP_421",
        "error_message": "421 4.7.0 Try again later",
        "attempts": 5,
        "source_message_id": "1234567890",
        "delivery_id": "inv_2f6c9d1e",
        "workflow": "invite",
    }
    arguments.update(overrides)
    return dead_letter_attributes(**arguments)  # type: ignore[arg-type]


# --- attributes --------------------------------------------------------------------------


def publish_dead_letter(settings: PubSubSettings, data: bytes, attributes: dict[str, str]) -> str:
    """One publish with a publisher of its own, closed afterwards."""
    publisher = DeadLetterPublisher(settings)
    try:
        return publisher.publish(data, attributes)
    finally:
        publisher.close()


def test_dead_letter_reasons_are_the_contract_strings() -> None:
    assert sorted(DEAD_LETTER_REASONS) == [
        "invalid_event",
        "permanent_failure",
        "retries_exhausted",
    ]
    for reason in set(Reason) - DEAD_LETTER_REASONS:  # e.g. transient_failure, replay
        with pytest.raises(ValueError, match="not a dead-letter reason"):
            _attributes(reason=reason)


def test_attributes_are_exactly_the_contract_keys_as_strings() -> None:
    attributes = _attributes()
    assert attributes == {
        "delivery_id": "inv_2f6c9d1e",
        "workflow": "invite",
        "reason": "retries_exhausted",
        "error_code": "SMTP_421",
        "error_message": "421 4.7.0 Try again later",
        "attempts": "5",
        "source_message_id": "1234567890",
    }
    assert all(type(value) is str for value in attributes.values())


def test_delivery_id_and_workflow_only_when_known() -> None:
    attributes = _attributes(delivery_id=None, workflow=None, reason=Reason.INVALID_EVENT)
    assert set(attributes) == CONTRACT_KEYS - {"delivery_id", "workflow"}
    assert attributes["reason"] == "invalid_event"


def test_error_message_is_one_line_without_control_characters_and_at_most_500() -> None:
    message = "550 5.1.1 user unknown\r\n" + "\tx\x00\x1b[31m\u2028" + "y" * 2000
    attributes = _attributes(reason=Reason.PERMANENT_FAILURE, error_message=message)
    text = attributes["error_message"]
    assert len(text) == MAX_ERROR_MESSAGE_LENGTH == 500
    assert text.startswith("550 5.1.1 user unknown x ")
    assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in text)
    assert "\u2028" not in text
    assert _attributes(error_message="short")["error_message"] == "short"


# --- publishing to the emulator ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"delivery_id": "inv_1", "workflow": "invite"}',
        b"\xff\xfe\x00not utf-8 \x80\x81\r\n\x00",
        b"",
    ],
    ids=["json", "not-utf8", "empty"],
)
def test_dead_letter_arrives_with_original_bytes_and_contract_attributes(
    pubsub: PubSubNamespace, data: bytes
) -> None:
    attributes = _attributes(error_message="line one\nline two")
    message_id = publish_dead_letter(pubsub.settings, data, attributes)
    assert message_id

    received = pubsub.dead_letters()
    assert len(received) == 1
    message = received[0].message
    assert message.message_id == message_id
    assert bytes(message.data) == data
    assert dict(message.attributes) == attributes
    assert set(message.attributes) == CONTRACT_KEYS
    assert message.attributes["error_message"] == "line one line two"
    # Nothing went to the delivery topic.
    assert pubsub.deliveries(timeout=0.5) == []


def test_dead_letter_topic_may_be_a_full_name(pubsub: PubSubNamespace) -> None:
    settings = PubSubSettings(
        project="some-other-project",
        delivery_topic=None,
        dead_letter_topic=pubsub.dead_letter_topic_path,
        publish_timeout_seconds=10,
    )
    publish_dead_letter(settings, b"x", _attributes())
    assert [bytes(m.message.data) for m in pubsub.dead_letters()] == [b"x"]


def test_missing_topic_raises_publish_error_naming_it(pubsub: PubSubNamespace) -> None:
    settings = PubSubSettings(
        project=pubsub.project,
        delivery_topic=None,
        dead_letter_topic="no-such-topic",
        publish_timeout_seconds=10,
    )
    started = time.monotonic()
    with pytest.raises(worker_pubsub.PublishError) as caught:
        publish_dead_letter(settings, b"x", _attributes())
    assert time.monotonic() - started < 10
    text = str(caught.value)
    assert f"projects/{pubsub.project}/topics/no-such-topic" in text
    assert "\n" not in text


def test_unconfigured_dead_letter_topic_raises_publish_error() -> None:
    settings = PubSubSettings(project="test-project", delivery_topic=None, dead_letter_topic=None)
    with pytest.raises(worker_pubsub.PublishError, match="DEAD_LETTER_TOPIC"):
        publish_dead_letter(settings, b"x", _attributes())


def test_nothing_listening_raises_publish_error_within_the_timeout(
    dead_pubsub: DeadPubSub,
) -> None:
    timeout = dead_pubsub.settings.publish_timeout_seconds
    started = time.monotonic()
    with pytest.raises(worker_pubsub.PublishError) as caught:
        publish_dead_letter(dead_pubsub.settings, b"\xff original", _attributes())
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 10, elapsed
    topic = dead_pubsub.settings.dead_letter_topic
    assert topic is not None
    text = str(caught.value)
    assert dead_pubsub.settings.topic_path(topic) in text
    assert "\n" not in text


@pytest.fixture
def silent_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A port that accepts TCP connections but never says a word (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)
        worker_pubsub.reset_client()
        try:
            yield host
        finally:
            worker_pubsub.reset_client()


def test_a_server_that_never_answers_fails_within_the_timeout(silent_port: str) -> None:
    started = time.monotonic()
    with pytest.raises(worker_pubsub.PublishError):
        worker_pubsub.publish(
            "projects/test-project/topics/email-dead-letter", b"x", {}, timeout=2.0
        )
    assert time.monotonic() - started < 2.0 + 10


def test_publisher_is_reused_and_reset_drops_it(pubsub: PubSubNamespace) -> None:
    topic = pubsub.dead_letter_topic_path
    worker_pubsub.publish(topic, b"1", {}, timeout=10)
    first = worker_pubsub._client()
    worker_pubsub.publish(topic, b"2", {}, timeout=10)
    assert worker_pubsub._client() is first
    worker_pubsub.reset_client()
    worker_pubsub.publish(topic, b"3", {}, timeout=10)
    assert worker_pubsub._client() is not first
    assert sorted(bytes(m.message.data) for m in pubsub.dead_letters()) == [b"1", b"2", b"3"]


def test_a_dead_letter_publisher_holds_its_own_client(pubsub: PubSubNamespace) -> None:
    """Not the module's shared client: a worker's publisher lives and dies with the worker."""
    first, second = DeadLetterPublisher(pubsub.settings), DeadLetterPublisher(pubsub.settings)
    try:
        first.publish(b"1", _attributes())
        second.publish(b"2", _attributes())
        assert first._publisher.client() is not second._publisher.client()
        assert first._publisher.client() is not worker_pubsub._client()
        first.close()
        first.publish(b"3", _attributes())  # a new client after close
    finally:
        first.close()
        second.close()
    assert sorted(bytes(m.message.data) for m in pubsub.dead_letters()) == [b"1", b"2", b"3"]


def test_pubsub_dead_letter_policy_forwards_to_the_same_topic(pubsub: PubSubNamespace) -> None:
    """The emulator's own dead-letter policy (the documented `CloudPubSubDeadLetter*` case)."""
    emulator = pubsub.emulator
    source = emulator.create_pull_subscription(
        pubsub.delivery_topic,
        f"{pubsub.delivery_topic}-dlp",
        dead_letter_topic=pubsub.dead_letter_topic,
        max_delivery_attempts=5,
        minimum_backoff=0,
        maximum_backoff=1,
    )
    emulator.publish(pubsub.delivery_topic, b"\x00raw", attempt="x")
    forwarded: list[Any] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ack_ids = [m.ack_id for m in emulator.pull_once(source)]
        if ack_ids:
            emulator.nack(source, ack_ids)
        forwarded = emulator.pull(pubsub.dead_letter_subscription, timeout=0.1)
        if forwarded:
            break
    assert len(forwarded) == 1
    message = forwarded[0].message
    assert bytes(message.data) == b"\x00raw"
    assert message.attributes["attempt"] == "x"
    assert message.attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"


def test_importing_worker_pubsub_does_not_import_the_client_library() -> None:
    code = (
        "import sys\n"
        "import worker.core.pubsub, worker.delivery.deadletter\n"
        "prefixes = ('google.cloud.pubsub', 'google.pubsub', 'google.api_core', 'grpc')\n"
        "loaded = [m for m in sys.modules if m.startswith(prefixes)]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
