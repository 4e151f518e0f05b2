"""Resend (Svix-signed) webhooks through functions-framework against PostgreSQL: what is
particular to Resend and Svix (its event types, Svix's headers, rotated secrets). What every
provider does is held by tests/test_provider_contract.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
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
from tests.provider_signing import svix_headers, svix_secret


def payload(name: str, delivery_id: str) -> dict[str, Any]:
    body: dict[str, Any] = fixture("resend", f"{name}.json")
    body["created_at"] = datetime.now(UTC).isoformat()
    body["data"] |= {
        "email_id": new_id("re"),
        "tags": [{"name": "delivery_id", "value": delivery_id}],
        "to": ["ada@example.com"],  # the seeded delivery's recipient
    }
    return body


def send(server: FunctionServer, secret: str, body: Any, **kwargs: Any) -> Any:
    raw = json.dumps(body).encode()
    return post(server, "resend", raw, svix_headers(secret, raw, **kwargs))


@pytest.mark.parametrize(
    ("name", "event_type", "status", "bounce_type"),
    [
        ("email.delivered", "delivered", "delivered", None),
        ("email.opened", "opened", "opened", None),
        ("email.clicked", "clicked", "clicked", None),
        ("email.bounced", "bounced", "bounced", "hard"),
        ("email.delivery_delayed", "deferred", None, None),
        ("email.complained", "complained", "complained", None),
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
    delivery_id, svix_id = new_id("re"), new_id("msg")
    seed_delivery(webhook_db, delivery_id)
    body = payload(name, delivery_id)

    response = send(webhook, provider_keys.resend_secret, body, msg_id=svix_id)

    assert response.status == 200, response.body
    [row] = provider_events(webhook_db, "resend", provider_event_id=svix_id)
    assert row["delivery_id"] == delivery_id and row["event_type"] == event_type
    assert delivery(webhook_db, delivery_id)["provider_status"] == status
    assert delivery(webhook_db, delivery_id)["bounce_type"] == bounce_type


def test_matched_by_resends_email_id_as_the_relay_id(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("re")
    body = payload("email.delivered", delivery_id)
    body["data"]["tags"] = [{"name": "category", "value": "confirm_email"}]
    seed_delivery(webhook_db, delivery_id, relay_message_id=body["data"]["email_id"])

    assert send(webhook, provider_keys.resend_secret, body).status == 200
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no headers", 401),
        ("no id", 401),
        ("no timestamp", 401),
        ("another id", 403),
        ("timestamp not a number", 403),
        ("v2 only", 403),
    ],
)
def test_an_unproven_request_is_refused_and_stores_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, case: str, status: int
) -> None:
    """Svix's own ways to fail; no signature, another secret and a time outside the window:
    tests/test_provider_contract.py."""
    delivery_id = new_id("re")
    seed_delivery(webhook_db, delivery_id)
    raw = json.dumps(payload("email.delivered", delivery_id)).encode()
    secret = provider_keys.resend_secret
    headers = {
        "no headers": {},
        "no id": {k: v for k, v in svix_headers(secret, raw).items() if k != "svix-id"},
        "no timestamp": {
            k: v for k, v in svix_headers(secret, raw).items() if k != "svix-timestamp"
        },
        "another id": {**svix_headers(secret, raw), "svix-id": "msg_forged"},
        "timestamp not a number": {**svix_headers(secret, raw), "svix-timestamp": "soon"},
        "v2 only": {
            **svix_headers(secret, raw),
            "svix-signature": svix_headers(secret, raw)["svix-signature"].replace("v1,", "v2,"),
        },
    }[case]
    before = count_provider_events(webhook_db)

    response = post(webhook, "resend", raw, headers)

    assert response.status == status
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None


def test_a_rotated_secret_still_verifies_among_several_signatures(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("re")
    seed_delivery(webhook_db, delivery_id)
    raw = json.dumps(payload("email.delivered", delivery_id)).encode()
    headers = svix_headers(provider_keys.resend_secret, raw)
    old = svix_headers(svix_secret(), raw, msg_id=headers["svix-id"])
    headers["svix-signature"] = f"{old['svix-signature']} {headers['svix-signature']}"

    assert post(webhook, "resend", raw, headers).status == 200
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


# --- values the ledger cannot store (addresses: tests/test_provider_contract.py) ---------------


@pytest.mark.parametrize(
    ("change", "svix_id"),
    [
        ({"email_id": "e" * 501}, None),
        ({"bounce": {"type": "Permanent\x00"}}, None),
        ({}, "msg_" + "m" * 600),
    ],
    ids=[
        "email id of 501",
        "NUL in bounce type",
        "svix-id of 604",
    ],
)
def test_an_event_the_ledger_cannot_store_is_400_and_stores_nothing(
    webhook: FunctionServer,
    webhook_db: str,
    provider_keys: ProviderKeys,
    change: dict[str, Any],
    svix_id: str | None,
) -> None:
    delivery_id = new_id("re")
    seed_delivery(webhook_db, delivery_id)
    body = payload("email.bounced", delivery_id)
    body["data"] |= change
    before = count_provider_events(webhook_db)

    response = send(webhook, provider_keys.resend_secret, body, msg_id=svix_id)

    assert response.status == 400, response.body
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None
