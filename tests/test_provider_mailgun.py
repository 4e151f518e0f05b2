"""Mailgun webhooks through functions-framework against PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness.function import FunctionServer
from tests.harness.webhook import (
    ProviderKeys,
    count_provider_events,
    delivery,
    fixture,
    new_id,
    now_unix,
    post,
    provider_events,
    seed_delivery,
)
from tests.provider_signing import mailgun_signature


def payload(name: str, delivery_id: str, key: str, timestamp: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = fixture("mailgun", f"{name}.json")
    body["event-data"] |= {
        "id": new_id("mg"),
        "timestamp": now_unix() - 30,
        "user-variables": {"delivery_id": delivery_id},
    }
    body["signature"] = mailgun_signature(key, timestamp)
    return body


def send(server: FunctionServer, body: Any) -> Any:
    return post(server, "mailgun", json.dumps(body).encode(), {})


@pytest.mark.parametrize(
    ("name", "event_type", "status", "bounce_type"),
    [
        ("delivered", "delivered", "delivered", None),
        ("opened", "opened", "opened", None),
        ("clicked", "clicked", "clicked", None),
        ("failed-permanent", "bounced", "bounced", "hard"),
        ("failed-temporary", "deferred", None, None),
        ("complained", "complained", "complained", None),
    ],
)
def test_each_signed_event_type_is_stored_and_moves_the_status(
    webhook: FunctionServer,
    webhook_db: str,
    provider_keys: ProviderKeys,
    name: str,
    event_type: str,
    status: str | None,
    bounce_type: str | None,
) -> None:
    delivery_id = new_id("mg")
    seed_delivery(webhook_db, delivery_id)
    body = payload(name, delivery_id, provider_keys.mailgun_key)

    response = send(webhook, body)

    assert response.status == 200, response.body
    assert response.body["applied"] == 1
    [row] = provider_events(webhook_db, "mailgun", provider_event_id=body["event-data"]["id"])
    assert row["delivery_id"] == delivery_id and row["event_type"] == event_type
    assert delivery(webhook_db, delivery_id)["provider_status"] == status
    assert delivery(webhook_db, delivery_id)["bounce_type"] == bounce_type


def test_matched_by_message_id_when_no_variable_was_attached(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("mg")
    seed_delivery(webhook_db, delivery_id, message_id=f"<{delivery_id}@mail.example.com>")
    body = payload("delivered", delivery_id, provider_keys.mailgun_key)
    body["event-data"]["user-variables"] = {}
    body["event-data"]["message"]["headers"]["message-id"] = f"{delivery_id}@mail.example.com"

    assert send(webhook, body).status == 200
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


def test_an_authentic_malformed_body_is_400_and_stores_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    before = count_provider_events(webhook_db)
    no_data = {"signature": mailgun_signature(provider_keys.mailgun_key)}
    no_id = payload("delivered", new_id("mg"), provider_keys.mailgun_key)
    del no_id["event-data"]["id"]

    assert send(webhook, no_data).status == 400
    assert send(webhook, no_id).status == 400
    assert count_provider_events(webhook_db) == before


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no signature", 401),
        ("wrong key", 403),
        ("tampered token", 403),
        ("stale timestamp", 403),
        ("not json", 401),
    ],
)
def test_an_unproven_request_is_refused_and_stores_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, case: str, status: int
) -> None:
    delivery_id = new_id("mg")
    seed_delivery(webhook_db, delivery_id)
    body = payload("delivered", delivery_id, provider_keys.mailgun_key)
    if case == "no signature":
        del body["signature"]
    elif case == "wrong key":
        body["signature"] = mailgun_signature("key-someone-else")
    elif case == "tampered token":
        body["signature"]["token"] = body["signature"]["token"][::-1]
    elif case == "stale timestamp":
        body["signature"] = mailgun_signature(provider_keys.mailgun_key, now_unix() - 301)
    before = count_provider_events(webhook_db)

    raw = b"signature=abc" if case == "not json" else json.dumps(body).encode()
    response = post(webhook, "mailgun", raw, {})

    assert response.status == status
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None
