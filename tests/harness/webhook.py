"""The provider webhook served by a real functions-framework process (`handle_provider_event`,
`--signature-type http`) against a real PostgreSQL, with keys made for the test session.

One server and one database per test module (starting functions-framework costs about a
second); tests keep apart by using their own delivery ids.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.harness.function import FunctionServer
from tests.harness.postgres import Databases
from tests.provider_signing import SendGridKeys, svix_secret

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"


@dataclass
class ProviderKeys:
    """Every provider's webhook credentials, made fresh for the session."""

    sendgrid: SendGridKeys = field(default_factory=SendGridKeys)
    mailgun_key: str = field(default_factory=lambda: "key-" + secrets.token_hex(16))
    postmark_user: str = "postmark-hook"
    postmark_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    resend_secret: str = field(default_factory=svix_secret)

    def env(self) -> dict[str, str]:
        return {
            "SENDGRID_WEBHOOK_PUBLIC_KEY": self.sendgrid.public_key_b64,
            "MAILGUN_WEBHOOK_SIGNING_KEY": self.mailgun_key,
            "POSTMARK_WEBHOOK_USERNAME": self.postmark_user,
            "POSTMARK_WEBHOOK_PASSWORD": self.postmark_password,
            "RESEND_WEBHOOK_SECRET": self.resend_secret,
        }


def webhook_server(env: Mapping[str, str], log_path: Path | None = None) -> FunctionServer:
    """A started webhook function with exactly `env` as its settings (no delivery settings:
    the webhook must not need them)."""
    clean = {
        name: ""
        for name in ("SMTP_HOST", "EMAIL_FROM", "DEAD_LETTER_TOPIC", "GOOGLE_CLOUD_PROJECT")
    }
    return FunctionServer(
        {**clean, **env},
        target="handle_provider_event",
        signature_type="http",
        log_path=log_path,
    ).start()


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]


def post(
    server: FunctionServer, provider: str, body: bytes, headers: Mapping[str, str]
) -> Response:
    request = urllib.request.Request(
        f"{server.url}/webhooks/{provider}",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Response(response.status, json.loads(response.read() or b"{}"))
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            parsed = {"raw": raw.decode(errors="replace")}
        return Response(error.code, parsed)


def fixture(provider: str, name: str) -> Any:
    return json.loads((FIXTURES / provider / name).read_text())


def new_id(prefix: str = "wh") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


# A database URL, or a connection to reuse (autocommit): a suite of many short tests saves
# a connection per look.
Database = str | psycopg.Connection[Any]


@contextmanager
def connected(db: Database) -> Iterator[psycopg.Connection[Any]]:
    """A connection to `db`: the one given, or a new one closed after use."""
    if not isinstance(db, str):
        yield db
        return
    with psycopg.connect(db, autocommit=True) as conn:
        yield conn


def seed_delivery(
    db: Database,
    delivery_id: str,
    *,
    recipient: str = "ada@example.com",
    message_id: str | None = None,
    relay_message_id: str | None = None,
) -> None:
    """A delivery the worker sent (status `sent`), as the pipeline leaves it."""
    with connected(db) as conn:
        conn.execute(
            """INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, attempts,
                   claim_token, lease_expires_at, last_attempted_at)
               VALUES (%s, 'password-reset', %s, 'in_progress', 1, gen_random_uuid(),
                   now() + interval '5 minutes', now())""",
            (delivery_id, recipient),
        )
        conn.execute(
            """UPDATE email.deliveries SET status = 'sent', sent_at = now(), claim_token = NULL,
                   lease_expires_at = NULL, provider_message_id = %s, relay_message_id = %s
               WHERE delivery_id = %s""",
            (message_id or f"<{delivery_id}@example.com>", relay_message_id, delivery_id),
        )


def delivery(db: Database, delivery_id: str) -> dict[str, Any]:
    with connected(db) as conn, conn.cursor(row_factory=dict_row) as cursor:
        row = cursor.execute(
            "SELECT * FROM email.deliveries WHERE delivery_id = %s", (delivery_id,)
        ).fetchone()
    assert row is not None, delivery_id
    return row


def provider_events(db: Database, provider: str, **where: Any) -> list[dict[str, Any]]:
    clauses = "".join(f" AND {column} = %({column})s" for column in where)
    with connected(db) as conn, conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            f"SELECT * FROM email.provider_events WHERE provider = %(provider)s{clauses} "
            "ORDER BY id",
            {"provider": provider, **where},
        ).fetchall()


def count_provider_events(db: Database) -> int:
    with connected(db) as conn:
        row = conn.execute("SELECT count(*) FROM email.provider_events").fetchone()
    assert row is not None
    return int(row[0])


def dump_email_schema(url: str) -> str:
    """Every row of every table in schema `email`, as text."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'email' ORDER BY tablename"
            )
        ]
        lines = []
        for table in tables:
            for (text,) in conn.execute(f'SELECT t::text FROM email."{table}" t'):
                lines.append(f"{table}: {text}")
    return "\n".join(lines)


def now_unix() -> int:
    return int(datetime.now(UTC).timestamp())


@pytest.fixture(scope="session")
def provider_keys() -> ProviderKeys:
    return ProviderKeys()


@pytest.fixture(scope="module")
def webhook_db(databases: Databases) -> Iterator[str]:
    name = databases.create()
    yield databases.url(name)
    databases.drop(name)


@pytest.fixture(scope="module")
def webhook(
    webhook_db: str, provider_keys: ProviderKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FunctionServer]:
    """All four providers enabled, the module's database behind them."""
    server = webhook_server(
        {"DATABASE_URL": webhook_db, **provider_keys.env()},
        log_path=tmp_path_factory.mktemp("webhook") / "function.log",
    )
    try:
        yield server
    finally:
        server.stop()
