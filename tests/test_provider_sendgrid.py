"""SendGrid's Event Webhook through functions-framework against PostgreSQL: what is particular
to SendGrid (its event types, batches, the raw bytes it signs). What every provider does is
held by tests/test_provider_contract.py."""

from __future__ import annotations

import json
from collections.abc import Callable
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
from tests.provider_signing import SendGridKeys


def events_for(delivery_id: str, *kinds: tuple[str, str | None]) -> list[dict[str, Any]]:
    """Fixture events of the given (event, bounce type) kinds, fresh ids, for `delivery_id`."""
    chosen: list[dict[str, Any]] = []
    for event in fixture("sendgrid", "events.json"):
        if (event["event"], event.get("type")) in kinds:
            chosen.append(
                {
                    **event,
                    "delivery_id": delivery_id,
                    "email": "ada@example.com",  # the seeded delivery's recipient
                    "sg_event_id": new_id("sg"),
                    "timestamp": now_unix() - 60 + len(chosen),
                }
            )
    assert len(chosen) == len(kinds), kinds
    return chosen


def send(
    server: FunctionServer, keys: SendGridKeys, events: Any, timestamp: int | None = None
) -> Any:
    body = json.dumps(events).encode()
    return post(server, "sendgrid", body, keys.headers(body, timestamp))


@pytest.mark.parametrize(
    ("kind", "event_type", "status", "bounce_type"),
    [
        (("delivered", None), "delivered", "delivered", None),
        (("open", None), "opened", "opened", None),
        (("click", None), "clicked", "clicked", None),
        (("bounce", "bounce"), "bounced", "bounced", "hard"),
        (("bounce", "blocked"), "bounced", "bounced", "blocked"),
        (("dropped", None), "bounced", "bounced", "dropped"),
        (("deferred", None), "deferred", None, None),
        (("spamreport", None), "complained", "complained", None),
    ],
)
def test_each_signed_event_type_is_stored_and_moves_the_status(
    webhook: FunctionServer,
    webhook_db: str,
    provider_keys: ProviderKeys,
    kind: tuple[str, str | None],
    event_type: str,
    status: str | None,
    bounce_type: str | None,
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    [event] = events_for(delivery_id, kind)

    response = send(webhook, provider_keys.sendgrid, [event])

    assert response.status == 200, response.body
    assert response.body["applied"] == 1
    [row] = provider_events(webhook_db, "sendgrid", provider_event_id=event["sg_event_id"])
    assert row["delivery_id"] == delivery_id
    assert row["event_type"] == event_type
    assert row["detail"]["provider_message_id"] == event["sg_message_id"]
    assert delivery(webhook_db, delivery_id)["provider_status"] == status
    if bounce_type is not None:
        assert delivery(webhook_db, delivery_id)["bounce_type"] == bounce_type


def test_a_batch_is_applied_event_by_event_and_a_repeat_is_stored_once(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    events = events_for(delivery_id, ("processed", None), ("delivered", None), ("open", None))

    first = send(webhook, provider_keys.sendgrid, events)
    again = send(webhook, provider_keys.sendgrid, events)

    assert first.status == again.status == 200
    assert first.body["applied"] == 2  # `processed` is not an outcome: not stored
    assert again.body["duplicate"] == 2 and again.body["applied"] == 0
    assert len(provider_events(webhook_db, "sendgrid", delivery_id=delivery_id)) == 2
    assert delivery(webhook_db, delivery_id)["provider_status"] == "opened"


def test_matched_by_message_id_without_the_unique_argument(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id, message_id=f"<{delivery_id}@mail.example.com>")
    [event] = events_for(delivery_id, ("delivered", None))
    del event["delivery_id"]
    event["smtp-id"] = f"<{delivery_id}@mail.example.com>"

    assert send(webhook, provider_keys.sendgrid, [event]).status == 200

    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


def test_one_malformed_event_in_a_batch_loses_none_of_the_others(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    good = events_for(delivery_id, ("delivered", None), ("click", None))
    broken = {**good[0], "sg_event_id": new_id("sg"), "timestamp": "yesterday"}

    response = send(webhook, provider_keys.sendgrid, [good[0], broken, good[1]])

    assert response.status == 200, response.body
    assert response.body["applied"] == 2 and response.body["rejected"] == 1
    stored = provider_events(webhook_db, "sendgrid", delivery_id=delivery_id)
    assert {row["provider_event_id"] for row in stored} == {e["sg_event_id"] for e in good}


def refusals(keys: ProviderKeys, body: bytes) -> dict[str, tuple[dict[str, str], int]]:
    """SendGrid's own ways to fail; a missing signature, another key and a time outside the
    window: tests/test_provider_contract.py."""
    good = keys.sendgrid.headers(body)
    signature = "X-Twilio-Email-Event-Webhook-Signature"
    return {
        "no headers": ({}, 401),
        "missing timestamp": ({signature: good[signature]}, 401),
        "another body's signature": (
            {**good, signature: keys.sendgrid.headers(body + b" ")[signature]},
            403,
        ),
        "signature not base64": ({**good, signature: "!!!"}, 403),
    }


@pytest.mark.parametrize(
    "case",
    ["no headers", "missing timestamp", "another body's signature", "signature not base64"],
)
def test_an_unproven_request_is_refused_and_stores_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, case: str
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    body = json.dumps(events_for(delivery_id, ("delivered", None))).encode()
    headers, status = refusals(provider_keys, body)[case]
    before = count_provider_events(webhook_db)

    response = post(webhook, "sendgrid", body, headers)

    assert response.status == status
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None


# --- values the ledger cannot store: the event is rejected on its own ------------------------

VICTIM = "victim" + "x" * 282 + "@example.com"  # 300 characters: longer than any address


def _bad(event: dict[str, Any], variant: str) -> dict[str, Any]:
    """`event` (a hard bounce) with one value the ledger cannot store."""
    changes: dict[str, Any] = {
        "event id of 600 characters": {"sg_event_id": "e" * 600},
        "address of 300 characters": {"email": VICTIM},
        "bounce type of 200 characters": {"type": "t" * 200},
        "NUL in the event id": {"sg_event_id": new_id("sg") + "\x00"},
        "NUL in the address": {"email": "victim\x00@example.com"},
        "NUL in the event name": {"event": "bounce\x00"},
        "NUL in SendGrid's message id": {"sg_message_id": "14c5d75ce93\x00.filter0001"},
        "NUL in the bounce type": {"type": "blocked\x00"},
        "NUL in the status": {"status": "5.0.0\x00"},
        "NUL in the classification": {"bounce_classification": "Invalid\x00"},
        "lone surrogate in the address": {"email": "victim\ud800@example.com"},
    }[variant]
    return {**event, **changes}


@pytest.mark.parametrize(
    "variant",
    [
        "event id of 600 characters",
        "address of 300 characters",
        "bounce type of 200 characters",
        "NUL in the event id",
        "NUL in the address",
        "NUL in the event name",
        "NUL in SendGrid's message id",
        "NUL in the bounce type",
        "NUL in the status",
        "NUL in the classification",
        "lone surrogate in the address",
    ],
)
def test_an_event_the_ledger_cannot_store_is_rejected_and_the_batch_answered_200(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, variant: str
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    good, bounce = events_for(delivery_id, ("delivered", None), ("bounce", "bounce"))
    bad = _bad(bounce, variant)

    response = send(webhook, provider_keys.sendgrid, [good, bad])

    # 200 with the bad event counted: SendGrid retries anything else, forever.
    assert response.status == 200, response.body
    assert (response.body["applied"], response.body["rejected"]) == (1, 1)
    stored = provider_events(webhook_db, "sendgrid", delivery_id=delivery_id)
    assert [row["provider_event_id"] for row in stored] == [good["sg_event_id"]]
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"
    logs = webhook.logs()
    assert "provider event rejected" in logs
    for text in ("victim", "Failing row", "Traceback"):
        assert text not in logs


def test_a_message_id_with_a_nul_is_no_message_id_and_the_event_still_matches(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    [event] = events_for(delivery_id, ("delivered", None))
    event["smtp-id"] = f"<{delivery_id}\x00@example.com>"

    response = send(webhook, provider_keys.sendgrid, [event])

    assert response.status == 200, response.body
    [row] = provider_events(webhook_db, "sendgrid", delivery_id=delivery_id)
    assert row["message_id"] is None
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


# --- the signature is over the bytes as sent --------------------------------------------------


def _as_sendgrid_might_write(events: list[dict[str, Any]]) -> bytes:
    """The events with other spacing and key order than `json.dumps` gives."""
    items = [
        "{ " + ",\n    ".join(f"{json.dumps(k)} : {json.dumps(v)}" for k, v in reversed(e.items()))
        for e in events
    ]
    raw = ("[\n  " + " },\n  ".join(items) + " }\n]").encode()
    assert json.loads(raw) == events
    assert raw != json.dumps(json.loads(raw)).encode()
    return raw


def test_a_body_in_sendgrids_own_spacing_and_key_order_verifies(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    [event] = events_for(delivery_id, ("delivered", None))
    raw = _as_sendgrid_might_write([event])

    response = post(webhook, "sendgrid", raw, provider_keys.sendgrid.headers(raw))

    assert response.status == 200, response.body
    assert response.body["applied"] == 1
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"


@pytest.mark.parametrize(
    "reserialise",
    [lambda events: json.dumps(events, indent=2).encode(), _as_sendgrid_might_write],
    ids=["indented", "other spacing and key order"],
)
def test_a_body_reserialised_after_signing_is_refused(
    webhook: FunctionServer,
    webhook_db: str,
    provider_keys: ProviderKeys,
    reserialise: Callable[[list[dict[str, Any]]], bytes],
) -> None:
    """The same events in other bytes than were signed: a verifier that re-serialises what
    it parsed (and so ignores the bytes' spacing and order) would take them."""
    delivery_id = new_id("sg")
    seed_delivery(webhook_db, delivery_id)
    events = events_for(delivery_id, ("delivered", None))
    signed = json.dumps(events).encode()
    changed = reserialise(events)
    assert changed != signed and json.loads(changed) == json.loads(signed)
    before = count_provider_events(webhook_db)

    response = post(webhook, "sendgrid", changed, provider_keys.sendgrid.headers(signed))

    assert response.status == 403
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None
