"""Postmark webhooks through functions-framework against PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.harness.function import FunctionServer
from tests.harness.webhook import (
    ProviderKeys,
    count_provider_events,
    delivery,
    fixture,
    new_id,
    post,
    provider_events,
    seed_delivery,
)
from tests.provider_signing import basic_auth

TIME_KEYS = ("DeliveredAt", "BouncedAt", "ReceivedAt")


def payload(name: str, delivery_id: str) -> dict[str, Any]:
    body: dict[str, Any] = fixture("postmark", f"{name}.json")
    body["Metadata"] = {"delivery_id": delivery_id}
    body["MessageID"] = new_id("pm")
    when = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    for key in TIME_KEYS:
        if key in body:
            body[key] = when
    if "ID" in body:
        body["ID"] = int.from_bytes(new_id("").encode()[-6:], "big")
    return body


def send(server: FunctionServer, keys: ProviderKeys, body: Any) -> Any:
    auth = basic_auth(keys.postmark_user, keys.postmark_password)
    return post(server, "postmark", json.dumps(body).encode(), auth)


@pytest.mark.parametrize(
    ("name", "event_type", "status", "bounce_type"),
    [
        ("delivery", "delivered", "delivered", None),
        ("open", "opened", "opened", None),
        ("click", "clicked", "clicked", None),
        ("bounce-hard", "bounced", "bounced", "hard"),
        ("bounce-soft", "deferred", None, None),
        ("spam-complaint", "complained", "complained", None),
    ],
)
def test_each_event_type_with_the_credentials_is_stored_and_moves_the_status(
    webhook: FunctionServer,
    webhook_db: str,
    provider_keys: ProviderKeys,
    name: str,
    event_type: str,
    status: str | None,
    bounce_type: str | None,
) -> None:
    delivery_id = new_id("pm")
    seed_delivery(webhook_db, delivery_id)
    body = payload(name, delivery_id)

    response = send(webhook, provider_keys, body)
    again = send(webhook, provider_keys, body)  # Postmark retries: no id of its own for some

    assert response.status == 200, response.body
    assert response.body["applied"] == 1 and again.body["duplicate"] == 1
    [row] = provider_events(webhook_db, "postmark", delivery_id=delivery_id)
    assert row["event_type"] == event_type
    assert row["detail"]["provider_message_id"] == body["MessageID"]
    assert delivery(webhook_db, delivery_id)["provider_status"] == status
    assert delivery(webhook_db, delivery_id)["bounce_type"] == bounce_type


def test_matched_by_postmarks_message_id_as_the_relay_id(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id, postmark_id = new_id("pm"), new_id("pmid")
    seed_delivery(webhook_db, delivery_id, relay_message_id=postmark_id)
    body = payload("delivery", delivery_id)
    body["Metadata"], body["MessageID"] = {}, postmark_id

    assert send(webhook, provider_keys, body).status == 200
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


def test_an_authentic_malformed_body_is_400_and_stores_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    before = count_provider_events(webhook_db)
    no_time = payload("delivery", new_id("pm"))
    del no_time["DeliveredAt"]
    auth = basic_auth(provider_keys.postmark_user, provider_keys.postmark_password)

    assert send(webhook, provider_keys, no_time).status == 400
    assert send(webhook, provider_keys, [no_time]).status == 400
    assert post(webhook, "postmark", b"<xml/>", auth).status == 400
    assert count_provider_events(webhook_db) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic_auth("postmark-hook", "wrong"),
        basic_auth("someone", "x"),
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!"},
    ],
    ids=["none", "wrong password", "wrong user", "bearer", "not base64"],
)
def test_wrong_or_missing_credentials_are_401_and_store_nothing(
    webhook: FunctionServer, webhook_db: str, headers: dict[str, str]
) -> None:
    delivery_id = new_id("pm")
    seed_delivery(webhook_db, delivery_id)
    before = count_provider_events(webhook_db)

    response = post(
        webhook, "postmark", json.dumps(payload("delivery", delivery_id)).encode(), headers
    )

    assert response.status == 401
    assert count_provider_events(webhook_db) == before
