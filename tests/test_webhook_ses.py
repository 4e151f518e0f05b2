"""Amazon SES through SNS, end to end: `handle_provider_event` under functions-framework,
SNS signatures checked against a certificate served over HTTPS by the test CA (h4's harness)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.function import FunctionServer
from tests.harness.https import SnsTestServer
from tests.harness.webhook import (
    FIXTURES,
    count_provider_events,
    delivery,
    new_id,
    post,
    seed_delivery,
    webhook_server,
)

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"


def record(name: str, delivery_id: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / "ses" / f"{name}.json").read_text())
    body.pop("_source", None)
    body["mail"]["tags"] = {**body["mail"].get("tags", {}), "delivery_id": [delivery_id]}
    return body


def envelope(body: dict[str, Any]) -> dict[str, str]:
    return {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": TOPIC,
        "Message": json.dumps(body),
        "Timestamp": "2026-11-23T10:00:00.000Z",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }


@pytest.fixture(scope="module")
def ses_webhook(
    webhook_db: str, sns_https: SnsTestServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FunctionServer]:
    server = webhook_server(
        {"DATABASE_URL": webhook_db, **sns_https.settings(TOPIC)},
        log_path=tmp_path_factory.mktemp("ses") / "function.log",
    )
    yield server
    server.stop()


def send(server: FunctionServer, signed: dict[str, str]) -> Any:
    headers = {"x-amz-sns-message-type": signed["Type"], "Content-Type": "text/plain"}
    return post(server, "ses", json.dumps(signed).encode(), headers)


@pytest.mark.parametrize(
    ("name", "status"),
    [("event-delivery", "delivered"), ("event-open", "opened"), ("event-click", "clicked")],
)
def test_a_signed_ses_event_moves_its_delivery(
    ses_webhook: FunctionServer, webhook_db: str, sns_https: SnsTestServer, name: str, status: str
) -> None:
    delivery_id = new_id("ses")
    seed_delivery(webhook_db, delivery_id)

    response = send(ses_webhook, sns_https.signer.sign(envelope(record(name, delivery_id))))

    assert response.status == 200, response.body
    assert delivery(webhook_db, delivery_id)["provider_status"] == status


def test_a_tampered_ses_message_is_refused_and_stores_nothing(
    ses_webhook: FunctionServer, webhook_db: str, sns_https: SnsTestServer
) -> None:
    delivery_id = new_id("ses")
    seed_delivery(webhook_db, delivery_id)
    signed = sns_https.signer.sign(envelope(record("event-delivery", delivery_id)))
    signed["Message"] = signed["Message"].replace("Delivery", "Bounce", 1)
    before = count_provider_events(webhook_db)

    response = send(ses_webhook, signed)

    assert response.status in (401, 403)
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None


def test_another_topic_is_refused(
    ses_webhook: FunctionServer, webhook_db: str, sns_https: SnsTestServer, tmp_path: Path
) -> None:
    delivery_id = new_id("ses")
    seed_delivery(webhook_db, delivery_id)
    foreign = {**envelope(record("event-delivery", delivery_id)), "TopicArn": TOPIC + "-other"}

    response = send(ses_webhook, sns_https.signer.sign(foreign))

    assert response.status in (401, 403)
    assert delivery(webhook_db, delivery_id)["provider_status"] is None
