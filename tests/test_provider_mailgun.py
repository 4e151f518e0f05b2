"""Mailgun webhooks through functions-framework against PostgreSQL: what is particular to
Mailgun (its event types, its tokens used once, the signature part by part against the
adapter). What every provider does is held by tests/test_provider_contract.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests.harness.function import FunctionServer
from tests.harness.postgres import free_port
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
    webhook_server,
)
from tests.provider_signing import mailgun_signature
from worker.providers import mailgun
from worker.providers.model import Refused, WebhookRequest
from worker.providers.registry import build_adapters, setting_reader
from worker.providers.webhook import Webhook
from worker.store.tracking import Tracking, WebhookTokens


def payload(
    name: str,
    delivery_id: str,
    key: str,
    timestamp: int | None = None,
    recipient: str = "ada@example.com",  # seed_delivery's
) -> dict[str, Any]:
    body: dict[str, Any] = fixture("mailgun", f"{name}.json")
    body["event-data"] |= {
        "id": new_id("mg"),
        "timestamp": now_unix() - 30,
        "recipient": recipient,
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


@pytest.mark.parametrize(
    ("case", "status"),
    [("tampered token", 403), ("signature string only", 401), ("not json", 401)],
)
def test_an_unproven_request_is_refused_and_stores_nothing(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, case: str, status: int
) -> None:
    """Mailgun's own ways to fail (a signature that is not the object); no signature,
    another key and a stale timestamp: tests/test_provider_contract.py."""
    delivery_id = new_id("mg")
    seed_delivery(webhook_db, delivery_id)
    body = payload("delivered", delivery_id, provider_keys.mailgun_key)
    if case == "tampered token":
        body["signature"]["token"] = body["signature"]["token"][::-1]
    elif case == "signature string only":
        body["signature"] = body["signature"]["signature"]
    before = count_provider_events(webhook_db)

    raw = b"signature=abc" if case == "not json" else json.dumps(body).encode()
    response = post(webhook, "mailgun", raw, {})

    assert response.status == status
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, delivery_id)["provider_status"] is None


# --- replays: the signature covers the token, not the event ---------------------------------


def suppressed(url: str, address: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM email.suppressions WHERE address = %s", (address,)
        ).fetchone()
    return found == (1,)


def test_a_replayed_signature_with_another_event_is_refused_before_anything_is_stored(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    first, victim = new_id("mg"), new_id("mg")
    seed_delivery(webhook_db, first)
    seed_delivery(webhook_db, victim, recipient="victim@example.com")
    genuine = payload("delivered", first, provider_keys.mailgun_key)
    assert send(webhook, genuine).status == 200
    # The captured signature object, now carrying a permanent bounce for someone else.
    replay = payload(
        "failed-permanent", victim, provider_keys.mailgun_key, recipient="victim@example.com"
    )
    replay["signature"] = genuine["signature"]
    before = count_provider_events(webhook_db)

    response = send(webhook, replay)

    assert response.status == 403
    assert response.body == {"error": "signature token already used"}
    assert count_provider_events(webhook_db) == before
    assert delivery(webhook_db, victim)["provider_status"] is None
    assert not suppressed(webhook_db, "victim@example.com")
    # The same request again, byte for byte, is refused too (not a 200 "duplicate").
    assert send(webhook, genuine).status == 403


def test_another_instance_refuses_a_token_this_one_took(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, tmp_path: Path
) -> None:
    other = webhook_server(
        {"DATABASE_URL": webhook_db, "MAILGUN_WEBHOOK_SIGNING_KEY": provider_keys.mailgun_key},
        log_path=tmp_path / "other.log",
    )
    try:
        first, victim = new_id("mg"), new_id("mg")
        seed_delivery(webhook_db, first)
        seed_delivery(webhook_db, victim)
        genuine = payload("delivered", first, provider_keys.mailgun_key)
        replay = payload("failed-permanent", victim, provider_keys.mailgun_key)
        replay["signature"] = genuine["signature"]

        assert send(webhook, genuine).status == 200
        refused = send(other, replay)
    finally:
        other.stop()
    assert refused.status == 403
    assert delivery(webhook_db, victim)["provider_status"] is None


# --- the signature, part by part (the adapter alone) ------------------------------------------

KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
NOW = 1_900_000_000


def adapter(tokens: mailgun.TokenLedger | None = None) -> mailgun.MailgunAdapter:
    return mailgun.MailgunAdapter(
        KEY.encode(), clock=lambda: NOW, tokens=tokens or mailgun.ProcessTokens()
    )


def request(signature: dict[str, str]) -> WebhookRequest:
    body = json.dumps({"signature": signature, "event-data": {}}).encode()
    return WebhookRequest("mailgun", "https://hooks.example.com/mailgun", {}, body)


def other_hex(digit: str) -> str:
    return "0" if digit != "0" else "1"


@pytest.mark.parametrize("part", ["last hex digit", "first hex digit", "token", "timestamp", "key"])
def test_a_signature_wrong_in_any_one_part_is_refused(part: str) -> None:
    good = mailgun_signature(KEY, NOW - 10, token="t" * 50)
    adapter().authenticate(request(good))  # the control: the same, unaltered, holds
    bad = dict(mailgun_signature(KEY, NOW - 10, token="u" * 50))
    digest = bad["signature"]
    if part == "last hex digit":
        bad["signature"] = digest[:-1] + other_hex(digest[-1])
    elif part == "first hex digit":
        bad["signature"] = other_hex(digest[0]) + digest[1:]
    elif part == "token":
        bad["token"] = "v" * 50
    elif part == "timestamp":
        bad["timestamp"] = str(NOW - 11)  # still fresh: only the HMAC can tell
    else:
        bad = mailgun_signature("key-someone-else", NOW - 10, token="u" * 50)

    with pytest.raises(Refused) as refused:
        adapter().authenticate(request(bad))
    assert (refused.value.status, refused.value.reason) == (403, "signature does not verify")


def test_each_token_is_accepted_once_and_a_forgery_does_not_use_it_up() -> None:
    tokens = mailgun.ProcessTokens()
    good = mailgun_signature(KEY, NOW - 10)
    forged = {**good, "signature": "0" * 64}
    with pytest.raises(Refused):
        adapter(tokens).authenticate(request(forged))

    adapter(tokens).authenticate(request(good))
    with pytest.raises(Refused) as refused:
        adapter(tokens).authenticate(request(good))
    assert (refused.value.status, refused.value.reason) == (403, "signature token already used")
    # Another token of the same second is another request.
    adapter(tokens).authenticate(request(mailgun_signature(KEY, NOW - 10)))


def test_a_process_forgets_a_token_only_after_the_window() -> None:
    now = [0.0]
    tokens = mailgun.ProcessTokens(clock=lambda: now[0])
    assert tokens.first_use("mailgun", "t", mailgun.REMEMBER_SECONDS)
    now[0] = mailgun.REMEMBER_SECONDS - 1
    assert not tokens.first_use("mailgun", "t", mailgun.REMEMBER_SECONDS)
    now[0] = mailgun.REMEMBER_SECONDS + 1
    assert tokens.first_use("mailgun", "t", mailgun.REMEMBER_SECONDS)
    assert mailgun.REMEMBER_SECONDS >= 2 * 300  # a fresh token stays fresh for 10 minutes


def test_the_instance_hands_mailgun_alone_the_token_ledger(provider_keys: ProviderKeys) -> None:
    """Mailgun's adapter gets the shared ledger; no other provider pays a round trip for it."""
    ledger = mailgun.ProcessTokens()
    adapters = build_adapters(setting_reader(provider_keys.env()), tokens=ledger)
    assert sorted(adapters) == ["mailgun", "postmark", "resend", "sendgrid"]
    holders = [name for name, a in adapters.items() if getattr(a, "tokens", None) is ledger]
    assert holders == ["mailgun"]


def test_an_unreachable_token_ledger_is_503_for_mailgun_to_retry() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with ConnectionPool(url, min_size=0, max_size=1, timeout=1, open=True) as pool:
        hook = Webhook(
            {"mailgun": mailgun.MailgunAdapter(KEY.encode(), tokens=WebhookTokens(lambda: pool))},
            Tracking(pool),
        )
        body = {"signature": mailgun_signature(KEY), "event-data": {}}
        answer = hook.handle(
            "POST", WebhookRequest("mailgun", "https://h/mailgun", {}, json.dumps(body).encode())
        )
    assert answer.status == 503
