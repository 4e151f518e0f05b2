"""The production path: the Pub/Sub emulator pushes into a functions-framework server running
`main.py`, which reads its SMTP password from a (local) Secret Manager, claims in PostgreSQL
and sends to an SMTP server that asks for AUTH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests import factories
from tests.harness.function import ROOT, FunctionServer
from tests.harness.postgres import wait_until
from tests.harness.pubsub import PubSubNamespace
from tests.harness.secretmanager import LocalSecretManager
from tests.harness.smtp import SmtpTestServer
from worker.store.ledger import Ledger, Status

PASSWORD = "smtp-pass-do-not-log-9f8e"
SECRET = "projects/test-project/secrets/smtp-password/versions/latest"


@pytest.fixture
def smtp_with_auth(make_smtp_server: Callable[..., SmtpTestServer]) -> SmtpTestServer:
    return make_smtp_server(username="mailer", password=PASSWORD)


@pytest.fixture
def function(
    database_url: str,
    smtp_with_auth: SmtpTestServer,
    pubsub: PubSubNamespace,
    secret_manager: LocalSecretManager,
) -> Iterator[FunctionServer]:
    secret_manager.secrets[SECRET] = PASSWORD + "\n"
    server = FunctionServer(
        {
            "DATABASE_URL": database_url,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_with_auth.port),
            "SMTP_SECURITY": "none",
            "SMTP_USERNAME": "mailer",
            "SMTP_PASSWORD_SECRET": SECRET,
            "SECRET_MANAGER_ENDPOINT": secret_manager.endpoint,
            "EMAIL_FROM": "Example <noreply@example.com>",
            "GOOGLE_CLOUD_PROJECT": pubsub.project,
            "DELIVERY_TOPIC": pubsub.delivery_topic,
            "DEAD_LETTER_TOPIC": pubsub.dead_letter_topic,
            "PUBSUB_EMULATOR_HOST": pubsub.emulator.host,
            "MAX_ATTEMPTS": "4",
            "SEND_TRIES_PER_INVOCATION": "1",
            "RETRY_BACKOFF_SECONDS": "0.05",
            "LEASE_SECONDS": "30",
        }
    ).start()
    pubsub.emulator.create_push_subscription(
        pubsub.delivery_topic,
        f"push-{pubsub.delivery_topic}",
        server.push_endpoint(pubsub.project, pubsub.delivery_topic),
        minimum_backoff=1,
        maximum_backoff=2,
    )
    yield server
    server.stop()


def status_of(ledger: Ledger, delivery_id: str) -> Status | None:
    row = ledger.get(delivery_id)
    return row.status if row else None


def test_push_into_functions_framework_end_to_end(
    function: FunctionServer,
    pubsub: PubSubNamespace,
    smtp_with_auth: SmtpTestServer,
    ledger: Ledger,
    secret_manager: LocalSecretManager,
) -> None:
    emulator = pubsub.emulator
    sent = [factories.payload(w) for w in factories.DATA]
    flaky = factories.payload("invite")
    refused = factories.payload(recipient="gone@example.com")
    smtp_with_auth.fail_recipient("gone@example.com", 550, "5.1.1 no such user")
    smtp_with_auth.fail_next(1, 451, "4.3.0 greylisted")  # the first send of all fails once

    emulator.publish(pubsub.delivery_topic, factories.encode(flaky))
    wait_until(lambda: status_of(ledger, flaky["delivery_id"]) is Status.SENT, timeout=60)
    for body in [*sent, sent[0], refused]:  # sent[0] twice: a duplicate
        emulator.publish(pubsub.delivery_topic, factories.encode(body))
    emulator.publish(pubsub.delivery_topic, b"definitely not json")

    for body in sent:
        wait_until(lambda b=body: status_of(ledger, b["delivery_id"]) is Status.SENT, timeout=60)
    wait_until(lambda: status_of(ledger, refused["delivery_id"]) is Status.FAILED, timeout=60)

    letters = pubsub.dead_letters(timeout=20)
    assert sorted(m.message.attributes["reason"] for m in letters) == [
        "invalid_event",
        "permanent_failure",
    ]
    # Four deliveries sent, each exactly once, the flaky one after a redelivery.
    recipients = sorted(m.message["Message-ID"] for m in smtp_with_auth.messages)
    assert len(recipients) == 4 and len(set(recipients)) == 4
    flaky_row = ledger.get(flaky["delivery_id"])
    assert flaky_row is not None and flaky_row.attempts == 2
    # One row per status change, and one per failed send attempt (attempt_failed).
    assert [
        e.status for e in ledger.events(flaky["delivery_id"]) if not e.payload.get("attempt_failed")
    ] == [
        Status.IN_PROGRESS,
        Status.RETRYING,
        Status.IN_PROGRESS,
        Status.SENT,
    ]
    assert secret_manager.calls == 1  # read once per instance

    logs = function.logs()
    for secret in (
        PASSWORD,
        factories.CODE,
        factories.INVITE_URL,
        factories.RESET_URL,
        "ada@example.com",
    ):
        assert secret not in logs
    structured = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert sum(1 for line in structured if line["message"] == "delivery sent") == 4


def test_missing_setting_stops_the_function_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SMTP_HOST",)}
    env.update(
        {
            "DATABASE_URL": "postgresql://x@127.0.0.1/x",
            "EMAIL_FROM": "a@example.com",
            "GOOGLE_CLOUD_PROJECT": "test-project",
            "DEAD_LETTER_TOPIC": "dlq",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == "email-worker: configuration error: SMTP_HOST is required but not set\n"


def test_importing_main_opens_nothing_and_skips_the_pubsub_client() -> None:
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": "1",
        "EMAIL_FROM": "a@example.com",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "DEAD_LETTER_TOPIC": "dlq",
    }
    code = (
        "import sys, main; "
        "heavy = [m for m in ('google.cloud.pubsub_v1', 'google.cloud.secretmanager', 'grpc') "
        "if m in sys.modules]; "
        "from worker.delivery import pipeline; "
        "print(heavy, pipeline.INSTANCE.built)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] None"
