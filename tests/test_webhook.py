"""`handle_provider_event` as a whole: per-target configuration, routes, outages, secrecy.
What each provider's adapter must do behind it (signatures, bodies, repeats, matching):
tests/test_provider_contract.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from tests.harness.function import ROOT, FunctionServer
from tests.harness.postgres import PostgresServer
from tests.harness.secretmanager import LocalSecretManager
from tests.harness.webhook import (
    ProviderKeys,
    count_provider_events,
    delivery,
    dump_email_schema,
    fixture,
    new_id,
    now_unix,
    post,
    provider_events,
    seed_delivery,
    webhook_server,
)
from tests.provider_signing import basic_auth, mailgun_signature, svix_headers
from worker.providers.model import Batch, WebhookRequest
from worker.providers.webhook import Webhook
from worker.store.migrations import migrate_up
from worker.store.tracking import EventType, ProviderEvent, Tracking

ADAPTER_MODULES = (
    "worker.providers.registry",
    "worker.providers.webhook",
    "worker.providers.sendgrid",
    "worker.providers.mailgun",
    "worker.providers.postmark",
    "worker.providers.resend",
    "worker.providers.ses",
    "worker.providers.sns",
)


def run_import(env: dict[str, str], code: str = "import main") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_SECRET"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- configuration per target -----------------------------------------------------------


def test_the_delivery_target_never_loads_webhook_crypto_or_adapters(
    provider_keys: ProviderKeys,
) -> None:
    env = {
        "DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "SMTP_HOST": "127.0.0.1",
        "EMAIL_FROM": "a@example.com",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "DEAD_LETTER_TOPIC": "dlq",
        **provider_keys.env(),  # present, yet not the served target's business
    }
    code = (
        "import json, sys, main; "
        "print(json.dumps([m for m in sys.modules "
        "if m.split('.')[0] == 'cryptography' or m.startswith('worker.providers.')]))"
    )
    proc = run_import(env, code)

    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert not [m for m in loaded if m.startswith("cryptography")], loaded
    assert not [m for m in loaded if m in ADAPTER_MODULES], loaded


def test_the_webhook_target_needs_none_of_the_delivery_settings(
    provider_keys: ProviderKeys,
) -> None:
    env = {
        "FUNCTION_TARGET": "handle_provider_event",
        "DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "RESEND_WEBHOOK_SECRET": provider_keys.resend_secret,
    }
    code = (
        "import main; from worker.providers import webhook; "
        "print(sorted(webhook.INSTANCE.configure().adapters), webhook.INSTANCE.built)"
    )
    proc = run_import(env, code)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['resend'] None"  # nothing connected at import


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"SENDGRID_WEBHOOK_PUBLIC_KEY": "not-a-key"},
            "SENDGRID_WEBHOOK_PUBLIC_KEY is not a base64 DER public key",
        ),
        (
            {"RESEND_WEBHOOK_SECRET": "whsec_***"},
            "RESEND_WEBHOOK_SECRET must be whsec_ followed by base64",
        ),
        (
            {"POSTMARK_WEBHOOK_USERNAME": "hook"},
            "set both POSTMARK_WEBHOOK_USERNAME and POSTMARK_WEBHOOK_PASSWORD, or neither",
        ),
        (
            {"MAILGUN_WEBHOOK_SIGNING_KEY": "k", "MAILGUN_WEBHOOK_SIGNING_KEY_SECRET": "x"},
            "set MAILGUN_WEBHOOK_SIGNING_KEY or MAILGUN_WEBHOOK_SIGNING_KEY_SECRET, not both",
        ),
        ({"DATABASE_URL": ""}, "DATABASE_URL or DATABASE_URL_SECRET is required but not set"),
    ],
    ids=["sendgrid key", "resend secret", "postmark half", "both forms", "no database"],
)
def test_a_bad_webhook_setting_stops_the_instance_with_one_line(
    env: dict[str, str], line: str
) -> None:
    base = {"FUNCTION_TARGET": "handle_provider_event", "DATABASE_URL": "postgresql://x@h/x"}

    proc = run_import({**base, **env})

    assert proc.returncode == 1
    assert proc.stderr == f"email-worker: configuration error: {line}\n"


def test_a_signing_key_may_come_from_secret_manager(
    secret_manager: LocalSecretManager, webhook_db: str, tmp_path: Path
) -> None:
    name = "projects/p/secrets/mailgun-signing-key/versions/latest"
    secret_manager.secrets[name] = "key-from-secret-manager\n"
    server = webhook_server(
        {
            "DATABASE_URL": webhook_db,
            "MAILGUN_WEBHOOK_SIGNING_KEY_SECRET": name,
            "SECRET_MANAGER_ENDPOINT": os.environ["SECRET_MANAGER_ENDPOINT"],
        },
        log_path=tmp_path / "function.log",
    )
    try:
        delivery_id = new_id("sm")
        seed_delivery(webhook_db, delivery_id)
        body = fixture("mailgun", "delivered.json")
        body["event-data"] |= {
            "id": new_id(),
            "recipient": "ada@example.com",  # seed_delivery's: events must name the recipient
            "user-variables": {"delivery_id": delivery_id},
        }
        body["signature"] = mailgun_signature("key-from-secret-manager")

        response = post(server, "mailgun", json.dumps(body).encode(), {})
    finally:
        server.stop()
    assert response.status == 200, response.body
    assert delivery(webhook_db, delivery_id)["provider_status"] == "delivered"
    assert secret_manager.calls == 1


# --- routes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sendgrid_only(
    webhook_db: str, provider_keys: ProviderKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FunctionServer]:
    server = webhook_server(
        {
            "DATABASE_URL": webhook_db,
            "SENDGRID_WEBHOOK_PUBLIC_KEY": provider_keys.sendgrid.public_key_b64,
        },
        log_path=tmp_path_factory.mktemp("sendgrid-only") / "function.log",
    )
    yield server
    server.stop()


@pytest.mark.parametrize("provider", ["mailgun", "postmark", "resend", "ses", "nope", ""])
def test_a_provider_without_settings_is_404(
    sendgrid_only: FunctionServer, webhook_db: str, provider_keys: ProviderKeys, provider: str
) -> None:
    body = json.dumps(fixture("postmark", "delivery.json")).encode()
    headers = basic_auth(provider_keys.postmark_user, provider_keys.postmark_password)
    before = count_provider_events(webhook_db)

    response = post(sendgrid_only, provider, body, headers)

    assert response.status == 404
    assert count_provider_events(webhook_db) == before


def test_only_post_is_served(webhook: FunctionServer) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{webhook.url}/webhooks/sendgrid", timeout=10)
    assert error.value.code == 405


# --- what is never kept ------------------------------------------------------------------


RESET_TOKEN = "rst-Zq8v3TOPSECRETpP0"
RESET_LINK = f"https://app.example.com/reset?token={RESET_TOKEN}"


def clicks(keys: ProviderKeys, delivery_id: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    """A click on the reset link, as each provider reports it, signed."""
    sendgrid_event = {
        **fixture("sendgrid", "events.json")[4],
        "delivery_id": delivery_id,
        "sg_event_id": new_id(),
        "timestamp": now_unix(),
        "url": RESET_LINK,
        "email": "ada@example.com",  # seed_delivery's: events must name the recipient
    }
    sendgrid_body = json.dumps([sendgrid_event]).encode()
    mailgun_body = fixture("mailgun", "clicked.json")
    mailgun_body["event-data"] |= {
        "id": new_id(),
        "url": RESET_LINK,
        "recipient": "ada@example.com",
        "user-variables": {"delivery_id": delivery_id},
    }
    mailgun_body["signature"] = mailgun_signature(keys.mailgun_key)
    postmark_body = {
        **fixture("postmark", "click.json"),
        "OriginalLink": RESET_LINK,
        "Metadata": {"delivery_id": delivery_id},
        "MessageID": new_id(),
        "Recipient": "ada@example.com",
    }
    resend_body = fixture("resend", "email.clicked.json")
    resend_body["data"] |= {
        "tags": {"delivery_id": delivery_id},
        "email_id": new_id(),
        "to": ["ada@example.com"],
    }
    resend_body["data"]["click"]["link"] = RESET_LINK
    resend_raw = json.dumps(resend_body).encode()
    postmark_raw = json.dumps(postmark_body).encode()
    return {
        "sendgrid": (sendgrid_body, keys.sendgrid.headers(sendgrid_body)),
        "mailgun": (json.dumps(mailgun_body).encode(), {}),
        "postmark": (postmark_raw, basic_auth(keys.postmark_user, keys.postmark_password)),
        "resend": (resend_raw, svix_headers(keys.resend_secret, resend_raw)),
    }


def test_a_clicked_reset_link_is_stored_nowhere_and_logged_nowhere(
    webhook: FunctionServer, webhook_db: str, provider_keys: ProviderKeys
) -> None:
    for provider in ("sendgrid", "mailgun", "postmark", "resend"):
        delivery_id = new_id(provider)
        seed_delivery(webhook_db, delivery_id)
        body, headers = clicks(provider_keys, delivery_id)[provider]

        response = post(webhook, provider, body, headers)

        assert response.status == 200, (provider, response.body)
        assert delivery(webhook_db, delivery_id)["provider_status"] == "clicked", provider
    dump, logs = dump_email_schema(webhook_db), webhook.logs()
    assert "clicked" in dump and "provider event" in logs  # the dump and the logs are real
    for text in (dump, logs):
        assert RESET_TOKEN not in text
        assert "app.example.com/reset" not in text


def test_secrets_and_bodies_never_reach_the_logs(
    webhook: FunctionServer, provider_keys: ProviderKeys
) -> None:
    bad = basic_auth(provider_keys.postmark_user, provider_keys.postmark_password + "x")
    post(webhook, "postmark", b'{"RecordType": "Delivery", "Recipient": "eve@example.com"}', bad)
    logs = webhook.logs()
    for secret in (
        provider_keys.mailgun_key,
        provider_keys.postmark_password,
        provider_keys.resend_secret,
        provider_keys.sendgrid.public_key_b64,
        "eve@example.com",
    ):
        assert secret not in logs
    assert "credentials do not match" in logs


# --- the database away ----------------------------------------------------------------


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.init()
    server.start()
    migrate_up(server.admin_url, report=lambda _line: None)
    yield server
    server.destroy()


def test_database_down_is_503_and_the_providers_retry_is_applied_exactly_once(
    own_postgres: PostgresServer, provider_keys: ProviderKeys, tmp_path: Path
) -> None:
    url = own_postgres.admin_url
    server = webhook_server(
        {"DATABASE_URL": url, "DB_TIMEOUT_SECONDS": "2", **provider_keys.env()},
        log_path=tmp_path / "function.log",
    )
    try:
        delivery_id = new_id("down")
        seed_delivery(url, delivery_id)
        resend_body = fixture("resend", "email.delivered.json")
        resend_body["data"] |= {
            "tags": {"delivery_id": delivery_id},
            "email_id": new_id(),
            "to": ["ada@example.com"],  # seed_delivery's: events must name the recipient
        }
        raw = json.dumps(resend_body).encode()
        headers = svix_headers(provider_keys.resend_secret, raw)
        own_postgres.stop()

        down = post(server, "resend", raw, headers)

        own_postgres.start()
        retried = until(lambda: post(server, "resend", raw, headers), lambda r: r.status == 200)
        again = post(server, "resend", raw, headers)
    finally:
        server.stop()
    assert down.status == 503
    assert retried.body["applied"] == 1
    assert again.body["duplicate"] == 1
    assert len(provider_events(url, "resend", delivery_id=delivery_id)) == 1
    assert delivery(url, delivery_id)["provider_status"] == "delivered"


def until(call: Callable[[], Any], done: Callable[[Any], bool], tries: int = 10) -> Any:
    """The provider's retries: a stale pooled connection may fail once after a restart."""
    for _ in range(tries):
        result = call()
        if done(result):
            return result
        assert result.status == 503, result
    raise AssertionError(f"no success in {tries} retries: {result}")


# --- values the database refuses (an address no adapter lets through: the contract suite) ---

VICTIM = "victim" + "x" * 282 + "@example.com"  # 300 characters: longer than any address


@dataclass(frozen=True)
class FixedEvents:
    """An adapter that hands over events as given: values no provider adapter lets through,
    to reach the database's own refusal."""

    events_given: tuple[ProviderEvent, ...]
    provider: str = "fixed"
    max_body_bytes: int = 1024

    def authenticate(self, request: WebhookRequest) -> None:
        return None

    def events(self, request: WebhookRequest) -> Batch:
        return Batch(self.events_given)


def an_event(**changes: Any) -> ProviderEvent:
    fields: dict[str, Any] = {
        "provider": "fixed",
        "provider_event_id": new_id("fx"),
        "event_type": EventType.DELIVERED,
        "occurred_at": datetime.now(UTC),
        "recipient": "ada@example.com",
        "delivery_id": None,
        "message_id": None,
        "relay_message_id": None,
    }
    return ProviderEvent(**{**fields, **changes})


def test_an_event_the_database_refuses_is_rejected_alone_and_its_row_never_logged(
    webhook_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = [
        an_event(provider_event_id="e" * 600),
        an_event(recipient=VICTIM),
        an_event(recipient="victim\x00@example.com"),
        an_event(recipient="victim\ud800@example.com"),
        an_event(bounce_type="t" * 200, event_type=EventType.BOUNCED),
        an_event(detail={"note": "victim\x00"}),
    ]
    good = [an_event(), an_event()]
    adapter = FixedEvents((good[0], *bad, good[1]))
    with ConnectionPool(webhook_db, min_size=1, max_size=1, open=True) as pool:
        webhook = Webhook({"fixed": adapter}, Tracking(pool))
        capsys.readouterr()

        answer = webhook.handle("POST", WebhookRequest("fixed", "https://x/fixed", {}, b"{}"))

    logged = capsys.readouterr().out
    assert answer.status == 200, answer
    assert (answer.body["unmatched"], answer.body["rejected"]) == (2, len(bad))
    assert logged.count("provider event rejected by the database") == len(bad)
    for kind in ("CheckViolation", "DataError", "UnicodeEncodeError"):
        assert kind in logged
    assert "victim" not in logged and "Failing row" not in logged
    assert "e" * 101 not in logged
