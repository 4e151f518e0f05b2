"""Amazon SES through SNS, end to end: `handle_provider_event` under functions-framework,
SNS signatures checked against a certificate served over HTTPS by the test CA
(tests/harness/https.py). What is particular to SNS: topics, the subscription handshake,
certificate URLs. A signed event applied, a forged or unsigned one refused, and what every
provider does: tests/test_provider_contract.py."""

from __future__ import annotations

import base64
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
    delivery,
    new_id,
    post,
    seed_delivery,
    webhook_server,
)

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
RECIPIENT = "recipient@example.com"  # the SES fixtures' recipient


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


def test_another_topic_is_refused(
    ses_webhook: FunctionServer, webhook_db: str, sns_https: SnsTestServer, tmp_path: Path
) -> None:
    delivery_id = new_id("ses")
    seed_delivery(webhook_db, delivery_id, recipient=RECIPIENT)
    foreign = {**envelope(record("event-delivery", delivery_id)), "TopicArn": TOPIC + "-other"}

    response = send(ses_webhook, sns_https.signer.sign(foreign))

    assert response.status in (401, 403)
    assert delivery(webhook_db, delivery_id)["provider_status"] is None


def confirmation(sns_https: SnsTestServer, subscribe_url: str) -> dict[str, str]:
    return sns_https.signer.sign(
        {
            "Type": "SubscriptionConfirmation",
            "MessageId": str(uuid.uuid4()),
            "Token": uuid.uuid4().hex,
            "TopicArn": TOPIC,
            "Message": f"You have chosen to subscribe to the topic {TOPIC}.",
            "SubscribeURL": subscribe_url,
            "Timestamp": "2026-11-23T10:00:00.000Z",
        }
    )


@pytest.mark.parametrize("status", [404, 403, 500])
def test_a_subscribe_url_that_refuses_is_503_so_sns_resends_the_confirmation(
    ses_webhook: FunctionServer, sns_https: SnsTestServer, status: int
) -> None:
    path = f"/?Action=ConfirmSubscription&Token={uuid.uuid4().hex}"
    sns_https.server.serve(path, b"<Error/>", status=status)

    response = send(ses_webhook, confirmation(sns_https, sns_https.server.url(path)))

    assert response.status == 503, response.body
    assert sns_https.server.hits(path) == [path]
    assert "Traceback" not in ses_webhook.logs()


def test_a_subscription_confirmation_is_confirmed_and_answered_200(
    ses_webhook: FunctionServer, sns_https: SnsTestServer
) -> None:
    path = f"/?Action=ConfirmSubscription&Token={uuid.uuid4().hex}"
    sns_https.server.serve(path, b"<ConfirmSubscriptionResponse/>")

    response = send(ses_webhook, confirmation(sns_https, sns_https.server.url(path)))

    assert response.status == 200, response.body
    assert sns_https.server.hits(path) == [path]


def test_a_forged_message_naming_another_certificate_url_fetches_nothing(
    ses_webhook: FunctionServer, webhook_db: str, sns_https: SnsTestServer
) -> None:
    signer = sns_https.new_signer()
    sns_https.server.serve_prefix(signer.cert_path, sns_https.server.served(signer.cert_path))
    before = len(sns_https.server.hits())
    for bust in range(3):
        forged = signer.sign(envelope(record("event-delivery", new_id("ses"))))
        forged["Signature"] = base64.b64encode(b"\x01" * 256).decode()  # read, does not hold
        forged["SigningCertURL"] = f"{signer.cert_url}?bust={bust}"

        assert send(ses_webhook, forged).status == 403

    assert len(sns_https.server.hits()) == before
