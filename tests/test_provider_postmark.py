"""Postmark webhooks through functions-framework against PostgreSQL: what is particular to
Postmark (its record types, the parts of its Basic credentials). What every provider does is
held by tests/test_provider_contract.py."""

from __future__ import annotations

import base64
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
from worker.providers.model import Refused, WebhookRequest
from worker.providers.postmark import PostmarkAdapter

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
    for key in ("Email", "Recipient"):
        if key in body:
            body[key] = "ada@example.com"  # the seeded delivery's recipient
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


def _credentials(keys: ProviderKeys, case: str) -> dict[str, str]:
    """Authorization headers that are right in every part but the one `case` names. None at
    all, and a wrong password: tests/test_provider_contract.py."""
    user, password = keys.postmark_user, keys.postmark_password

    def basic(text: str, scheme: str = "Basic") -> dict[str, str]:
        return {"Authorization": f"{scheme} {base64.b64encode(text.encode()).decode()}"}

    return {
        "wrong user, right password": basic_auth("someone", password),
        "both wrong": basic_auth("someone", "wrong"),
        "user in other case": basic_auth(user.upper(), password),
        "user with a character more": basic_auth(user + "x", password),
        "user a character short": basic_auth(user[:-1], password),
        "empty user": basic_auth("", password),
        "password with a character more": basic_auth(user, password + "x"),
        "password a character short": basic_auth(user, password[:-1]),
        "empty password": basic_auth(user, ""),
        "user and password swapped": basic_auth(password, user),
        "no colon": basic(user + password),
        "password alone": basic(password),
        "right credentials, bearer scheme": basic(f"{user}:{password}", "Bearer"),
        "right credentials, no scheme": {
            "Authorization": base64.b64encode(f"{user}:{password}".encode()).decode()
        },
        "not base64": {"Authorization": "Basic !!!"},
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "wrong user, right password",
        "both wrong",
        "user in other case",
        "user with a character more",
        "user a character short",
        "empty user",
        "password with a character more",
        "password a character short",
        "empty password",
        "user and password swapped",
        "no colon",
        "password alone",
        "right credentials, bearer scheme",
        "right credentials, no scheme",
        "not base64",
    ],
)
def test_wrong_or_missing_credentials_are_401_and_store_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, case: str
) -> None:
    delivery_id = new_id("pm")
    seed_delivery(webhook_db, delivery_id)
    before = count_provider_events(webhook_db)

    response = post(
        webhook,
        "postmark",
        json.dumps(payload("delivery", delivery_id)).encode(),
        _credentials(provider_keys, case),
    )

    assert response.status == 401
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None


def test_the_scheme_is_read_in_any_case(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("pm")
    seed_delivery(webhook_db, delivery_id)
    auth = basic_auth(provider_keys.postmark_user, provider_keys.postmark_password)
    auth["Authorization"] = auth["Authorization"].replace("Basic ", "basic ")

    response = post(
        webhook, "postmark", json.dumps(payload("delivery", delivery_id)).encode(), auth
    )

    assert response.status == 200, response.body
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


def test_the_colon_is_required_even_where_the_password_is_empty() -> None:
    """Without the colon, "hook" would pass as user "hook" with an empty password."""
    adapter = PostmarkAdapter(username=b"hook", password=b"")

    def request(credentials: bytes) -> WebhookRequest:
        header = "Basic " + base64.b64encode(credentials).decode()
        return WebhookRequest("postmark", "https://x/postmark", {"authorization": header}, b"{}")

    adapter.authenticate(request(b"hook:"))
    with pytest.raises(Refused) as refused:
        adapter.authenticate(request(b"hook"))
    assert refused.value.status == 401


# --- values the ledger cannot store (addresses: tests/test_provider_contract.py) ---------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ID", "9" * 600),
        ("MessageID", "m" * 501),
        ("Type", "HardBounce\x00"),
        ("RecordType", "Bounce\x00"),
    ],
    ids=[
        "id of 600",
        "message id of 501",
        "NUL in type",
        "NUL in record type",
    ],
)
def test_an_event_the_ledger_cannot_store_is_400_and_stores_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, key: str, value: str
) -> None:
    delivery_id = new_id("pm")
    seed_delivery(webhook_db, delivery_id)
    body = {**payload("bounce-hard", delivery_id), key: value}
    before = count_provider_events(webhook_db)

    response = send(webhook, provider_keys, body)

    assert response.status == 400, response.body
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None
