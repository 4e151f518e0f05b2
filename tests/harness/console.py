"""The support console served by functions-framework as an `email_reader` login, over a
ledger seeded with deliveries that went through legal transitions (the database's own
triggers write their audit trail).

One database and one console process per test module (`console_db`, `console`): the tests
only read, and each seeds rows under its own recipient or workflow so they do not meet.
"""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from tests.harness.function import FunctionServer
from tests.harness.postgres import Databases

_ids = (f"c{n:04d}" for n in itertools.count(1))
# The test console's cursor key (CONSOLE_CURSOR_KEY): tests sign with it, or with another key,
# to show which cursors the console takes.
CURSOR_KEY = b"console-tests-cursor-key-6f1d0c2a9b84e7f3"


@dataclass(frozen=True)
class ConsoleDb:
    admin_url: str
    reader_url: str  # a LOGIN role granted email_reader and nothing else


@pytest.fixture(scope="module")
def console_db(databases: Databases) -> Iterator[ConsoleDb]:
    name = databases.create()
    admin_url = databases.url(name)
    role = f"console_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE email_reader")
    try:
        yield ConsoleDb(admin_url, conninfo.make_conninfo(admin_url, user=role))
    finally:
        databases.drop(name)
        with psycopg.connect(databases.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(scope="module")
def admin_conn(console_db: ConsoleDb) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(console_db.admin_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def console(console_db: ConsoleDb) -> Iterator[Console]:
    env = {
        "CONSOLE_DATABASE_URL": console_db.reader_url,
        "CONSOLE_CURSOR_KEY": CURSOR_KEY.decode(),
        "CONSOLE_CURSOR_KEY_SECRET": "",
        # The console needs no worker setting: blank them so none leaks in from the test env.
        "DATABASE_URL": "",
        "SMTP_HOST": "",
        "EMAIL_FROM": "",
        "GOOGLE_CLOUD_PROJECT": "",
        "DEAD_LETTER_TOPIC": "",
    }
    server = FunctionServer(env, target="delivery_console", signature_type="http").start()
    try:
        yield Console(server)
    finally:
        server.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Console:
    def __init__(self, server: FunctionServer) -> None:
        self.server = server
        self.url = server.url
        self._opener = urllib.request.build_opener(_NoRedirect)

    def get(self, path: str, method: str = "GET") -> Reply:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with self._opener.open(request, timeout=30) as response:
                return Reply(response.status, _lower(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return Reply(error.code, _lower(error.headers), error.read())


def _lower(headers: Any) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


# --- seeding ------------------------------------------------------------------------------------


def seed(
    conn: psycopg.Connection[Any],
    *,
    workflow: str = "invite",
    recipient: str = "ada@example.com",
    outcome: str = "sent",
    delivery_id: str | None = None,
    created_ago: float = 3600.0,
    send_seconds: float = 2.0,
    transient_errors: int = 0,
    error: tuple[str, str] = ("SMTP_550", "550 5.1.1 mailbox unavailable"),
) -> str:
    """A delivery created `created_ago` seconds ago that reached `outcome` (sent, failed,
    dead_letter, skipped, retrying, in_progress or queued) through the transitions the worker makes,
    with `transient_errors` retried 4xx attempts first."""
    delivery_id = delivery_id or next(_ids)
    params: dict[str, Any] = {
        "id": delivery_id,
        "workflow": workflow,
        "recipient": recipient,
        "ago": created_ago,
    }
    start = "queued" if outcome == "queued" else "in_progress"
    conn.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, attempts,"
        " created_at, queued_at, last_attempted_at, claim_token, lease_expires_at)"
        " VALUES (%(id)s, %(workflow)s, %(recipient)s, %(start)s, %(attempts)s,"
        " now() - %(ago)s * interval '1 second', now() - %(ago)s * interval '1 second',"
        " CASE WHEN %(claimed)s THEN now() END,"
        " CASE WHEN %(claimed)s THEN gen_random_uuid() END,"
        " CASE WHEN %(claimed)s THEN now() + interval '5 minutes' END)",
        {
            **params,
            "start": start,
            "attempts": int(start != "queued"),
            "claimed": start != "queued",
        },
    )
    for attempt in range(1, transient_errors + 1):
        _update(conn, delivery_id, status="retrying", error=("SMTP_421", "421 4.7.0 try later"))
        _update(conn, delivery_id, status="in_progress", claim=True, attempts=attempt + 1)
    if outcome == "sent":
        conn.execute(
            "UPDATE email.deliveries SET status = 'sent', sent_at = queued_at"
            " + %(send)s * interval '1 second', provider_message_id = '<' || delivery_id"
            " || '@example.com>', last_error_code = NULL, last_error_message = NULL,"
            " claim_token = NULL, lease_expires_at = NULL WHERE delivery_id = %(id)s",
            {"id": delivery_id, "send": send_seconds},
        )
    elif outcome in ("failed", "dead_letter", "retrying", "skipped"):
        _update(conn, delivery_id, status=outcome, error=error)
    # The audit rows were written just now; spread them over the delivery's own (past) life,
    # from its creation to `send_seconds` later, so a timeline reads as it would have.
    conn.execute(
        "UPDATE email.delivery_events e SET created_at = d.created_at"
        " + (e.id - first.id) * %(step)s * interval '1 second'"
        " FROM email.deliveries d, (SELECT min(id) AS id, count(*) AS n FROM email.delivery_events"
        " WHERE delivery_id = %(id)s) first"
        " WHERE e.delivery_id = %(id)s AND d.delivery_id = e.delivery_id",
        {"id": delivery_id, "step": send_seconds / max(1, 2 * transient_errors + 1)},
    )
    return delivery_id


def _update(
    conn: psycopg.Connection[Any],
    delivery_id: str,
    *,
    status: str,
    error: tuple[str, str] | None = None,
    claim: bool = False,
    attempts: int | None = None,
) -> None:
    conn.execute(
        "UPDATE email.deliveries SET status = %(status)s::email.delivery_status,"
        " last_error_code = %(code)s,"
        " last_error_message = %(message)s, attempts = coalesce(%(attempts)s, attempts),"
        " status_reason = CASE WHEN %(status)s::text = 'dead_letter' THEN 'retries_exhausted' END,"
        " claim_token = CASE WHEN %(claim)s THEN gen_random_uuid() END,"
        " lease_expires_at = CASE WHEN %(claim)s THEN now() + interval '5 minutes' END"
        " WHERE delivery_id = %(id)s",
        {
            "id": delivery_id,
            "status": status,
            "code": error[0] if error else None,
            "message": error[1] if error else None,
            "claim": claim,
            "attempts": attempts,
        },
    )


def provider_event(
    conn: psycopg.Connection[Any],
    delivery_id: str,
    event_type: str,
    *,
    occurred_ago: float,
    provider: str = "ses",
    bounce_type: str | None = None,
    detail: dict[str, Any] | None = None,
) -> str:
    """A provider's report applied the way the webhook applies it (migration 002's function):
    the order rules, the first-seen times and the suppression entry are the database's."""
    row = conn.execute(
        "SELECT email.apply_provider_event(provider => %(provider)s,"
        " provider_event_id => %(event_id)s, event_type => %(event_type)s,"
        " occurred_at => now() - %(ago)s * interval '1 second', delivery_id => %(delivery_id)s,"
        " bounce_type => %(bounce_type)s, detail => %(detail)s::jsonb)",
        {
            "provider": provider,
            "event_id": uuid.uuid4().hex,
            "event_type": event_type,
            "ago": occurred_ago,
            "delivery_id": delivery_id,
            "bounce_type": bounce_type,
            "detail": json.dumps(detail or {}),
        },
    ).fetchone()
    assert row is not None
    return str(row[0])


def suppress(
    conn: psycopg.Connection[Any],
    address: str,
    reason: str = "manual",
    *,
    created_ago: float = 60.0,
    expires_in: float | None = None,
) -> None:
    conn.execute(
        "INSERT INTO email.suppressions (address, reason, created_at, expires_at)"
        " VALUES (lower(%(address)s), %(reason)s, now() - %(ago)s * interval '1 second',"
        " now() + %(expires)s * interval '1 second')",
        {"address": address, "reason": reason, "ago": created_ago, "expires": expires_in},
    )
