"""The local stack's provider-webhook part (docs/webhooks.md), called by local_stack.py.

Serves `handle_provider_event` under functions-framework with keys made for this run (as
each provider would hold them), posts signed events for the sample deliveries the worker
just sent, the way each provider reports them, plus a forged request and a repeat, and prints
what the ledger made of them. Clicked links are the samples' own invite and reset links: the
run checks they reached neither the database nor the logs.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric import rsa
from psycopg.rows import dict_row

from tests.harness.function import FunctionServer
from tests.harness.https import HttpsTestServer, SnsSigner, TestCa, pem
from tests.harness.webhook import FIXTURES, ProviderKeys, Response, fixture, post
from tests.provider_signing import basic_auth, mailgun_signature, svix_headers
from worker.core.redact import mask_email

# What each sample delivery should end as, and the links its email carried.
EXPECTED_STATUS = {
    "verify-demo-1": "opened",  # SendGrid: delivered, open
    "invite-demo-1": "clicked",  # Mailgun: delivered, clicked
    "reset-demo-1": "complained",  # Resend: clicked, delivered; Postmark: spam complaint
}
LINKS = ("https://app.example.com/invite/7Hq2xLm9", "https://app.example.com/reset/Qw8rT2zP")
SES_TOPIC = "arn:aws:sns:us-east-1:123456789012:email-events"
# Each sample's events happen in this many steps between its send and now (see `Requests.at`).
STEPS = 3
TIMES = ("delivered_at", "opened_at", "clicked_at", "complained_at")


@dataclass(frozen=True)
class Posted:
    label: str
    provider: str
    delivery_id: str
    response: Response
    expected_status: int


def _event_id() -> str:
    return secrets.token_hex(8)


class Requests:
    """Signed requests, one method per provider, shaped after tests/fixtures/providers/."""

    def __init__(
        self,
        keys: ProviderKeys,
        message_ids: Mapping[str, str],
        relay_ids: Mapping[str, str],
        sent_at: Mapping[str, datetime],
        sns: SnsSigner,
    ) -> None:
        self.keys = keys
        self.sns = sns
        self.message_ids = message_ids  # delivery_id -> Message-ID the worker wrote
        self.relay_ids = relay_ids  # delivery_id -> the id in the relay's 250 reply
        self.sent_at = sent_at  # delivery_id -> when the worker sent it

    def at(self, delivery_id: str, step: int) -> datetime:
        """When a provider says the `step`-th thing (1..STEPS) happened to a delivery: after
        the worker sent it and before now, in the order of the story, as a real provider's
        times would be."""
        sent = self.sent_at[delivery_id]
        since = max(datetime.now(UTC) - sent, timedelta(0))
        return sent + since * step / (STEPS + 1)

    def sendgrid(self, delivery_id: str, kinds: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
        # Matched by Message-ID (`smtp-id`), as when no unique argument was attached.
        template = {e["event"]: e for e in fixture("sendgrid", "events.json")}
        events = [
            {k: v for k, v in template[kind].items() if k != "delivery_id"}
            | {
                "smtp-id": self.message_ids[delivery_id],
                "email": "ada@example.com",
                "sg_event_id": _event_id(),
                # Whole seconds, rounded up: never before the send.
                "timestamp": math.ceil(self.at(delivery_id, 1 + n).timestamp()),
            }
            for n, kind in enumerate(kinds)
        ]
        body = json.dumps(events).encode()
        return body, self.keys.sendgrid.headers(body)

    def mailgun(self, delivery_id: str, kind: str, step: int, url: str | None = None) -> bytes:
        body = fixture("mailgun", f"{kind}.json")
        body["event-data"] |= {
            "id": _event_id(),
            "timestamp": self.at(delivery_id, step).timestamp(),
            "recipient": "grace@example.com",
            "user-variables": {"delivery_id": delivery_id},
        }
        if url is not None:
            body["event-data"]["url"] = url
        body["signature"] = mailgun_signature(self.keys.mailgun_key)
        return json.dumps(body).encode()

    def postmark(self, delivery_id: str, name: str, step: int) -> tuple[bytes, dict[str, str]]:
        body = fixture("postmark", f"{name}.json")
        body |= {
            "Metadata": {"delivery_id": delivery_id},
            "MessageID": _event_id(),
            "BouncedAt": self.at(delivery_id, step).isoformat(),
            "Email": "kim@example.com",
        }
        auth = basic_auth(self.keys.postmark_user, self.keys.postmark_password)
        return json.dumps(body).encode(), auth

    def resend(
        self,
        delivery_id: str,
        name: str,
        step: int,
        link: str | None = None,
        msg_id: str | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        body = fixture("resend", f"{name}.json")
        body["created_at"] = self.at(delivery_id, step).isoformat()
        # Resend has no SMTP tag header: its events name its own id, the one its 250 reply
        # gave the worker (relay_message_id).
        body["data"] |= {
            "email_id": self.relay_ids[delivery_id],
            "to": ["kim@example.com"],
            "tags": [],
        }
        if link is not None:
            body["data"]["click"]["link"] = link
        raw = json.dumps(body).encode()
        return raw, svix_headers(self.keys.resend_secret, raw, msg_id=msg_id)

    def ses(
        self, delivery_id: str, name: str, step: int, recipient: str
    ) -> tuple[bytes, dict[str, str]]:
        """An SES event record in an SNS notification signed with the local certificate."""
        record = json.loads((FIXTURES / "ses" / f"{name}.json").read_text())
        record.pop("_source", None)
        record["mail"]["tags"] = {**record["mail"].get("tags", {}), "delivery_id": [delivery_id]}
        # Events are matched on the recipient too: the sample's own, not the fixture's.
        record["mail"]["destination"] = [recipient]
        if isinstance(record.get("delivery"), dict):
            record["delivery"]["recipients"] = [recipient]
        # `mail.timestamp` is when the email was sent; the event's own, when it happened.
        record["mail"]["timestamp"] = _ses_time(self.sent_at[delivery_id])
        if isinstance(record.get("delivery"), dict):
            record["delivery"]["timestamp"] = _ses_time(self.at(delivery_id, step))
        envelope = {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": SES_TOPIC,
            "Message": json.dumps(record),
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
        }
        body = json.dumps(self.sns.sign(envelope)).encode()
        return body, {"x-amz-sns-message-type": "Notification"}


def _ses_time(when: datetime) -> str:
    # Milliseconds, rounded up: never before the send.
    rounded = when + timedelta(microseconds=-when.microsecond % 1000)
    return rounded.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def post_events(server: FunctionServer, requests: Requests) -> list[Posted]:
    posted: list[Posted] = []

    def send(
        label: str, provider: str, delivery_id: str, body: bytes, headers: dict[str, str], want: int
    ) -> None:
        posted.append(
            Posted(label, provider, delivery_id, post(server, provider, body, headers), want)
        )

    body, headers = requests.sendgrid("verify-demo-1", ("delivered", "open"))
    send("delivered + open (one batch)", "sendgrid", "verify-demo-1", body, headers, 200)
    send("the same batch again", "sendgrid", "verify-demo-1", body, headers, 200)
    send(
        "forged (signed by someone else)",
        "sendgrid",
        "verify-demo-1",
        body,
        ProviderKeys().sendgrid.headers(body),
        403,
    )
    for step, (kind, url) in enumerate((("delivered", None), ("clicked", LINKS[0])), start=1):
        body = requests.mailgun("invite-demo-1", kind, step, url)
        send(kind, "mailgun", "invite-demo-1", body, {}, 200)
    # Out of order: the click arrives before the delivery report.
    body, headers = requests.resend("reset-demo-1", "email.clicked", 2, LINKS[1])
    send("clicked (before delivered)", "resend", "reset-demo-1", body, headers, 200)
    body, headers = requests.resend("reset-demo-1", "email.delivered", 1)
    send("delivered (late)", "resend", "reset-demo-1", body, headers, 200)
    body, headers = requests.postmark("reset-demo-1", "spam-complaint", 3)
    send("spam complaint", "postmark", "reset-demo-1", body, headers, 200)
    # Through SNS, after the open: stored, its time kept, the status not moved back.
    body, headers = requests.ses("verify-demo-1", "event-delivery", 3, "ada@example.com")
    send("delivered (after the open)", "ses", "verify-demo-1", body, headers, 200)
    return posted


def start_sns(
    register_stop: Callable[[str, Callable[[], None]], None],
) -> tuple[SnsSigner, dict[str, str]]:
    """What SNS would be: a signing key whose certificate an HTTPS server hands out."""
    directory = Path(tempfile.mkdtemp(prefix="local-sns-"))
    register_stop("the SNS files", lambda: shutil.rmtree(directory, ignore_errors=True))
    server = HttpsTestServer(TestCa(directory))
    register_stop("the SNS certificate server", server.close)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = server.ca.issue("sns.amazonaws.com", key)
    signer = SnsSigner(key, server.serve("/SimpleNotificationService-10ca1.pem", pem(certificate)))
    settings = {
        "SNS_TOPIC_ARNS": SES_TOPIC,
        "SNS_CERT_HOSTS": server.host_pattern,
        "SNS_CA_FILE": server.ca.ca_file,
    }
    return signer, settings


def read_provider_statuses(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT d.delivery_id, d.provider_status::text AS provider_status, d.sent_at,"
            " d.delivered_at, d.opened_at, d.clicked_at, d.complained_at,"
            " (SELECT count(*) FROM email.provider_events e"
            "   WHERE e.delivery_id = d.delivery_id) AS events"
            " FROM email.deliveries d WHERE d.status = 'sent' ORDER BY d.delivery_id"
        ).fetchall()


def read_relay_ids(database_url: str) -> dict[str, str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT delivery_id, relay_message_id FROM email.deliveries"
            " WHERE relay_message_id IS NOT NULL"
        ).fetchall()
    return {str(delivery_id): str(relay_id) for delivery_id, relay_id in rows}


def read_sent_at(database_url: str) -> dict[str, datetime]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT delivery_id, sent_at FROM email.deliveries WHERE sent_at IS NOT NULL"
        ).fetchall()
    return {str(delivery_id): sent_at for delivery_id, sent_at in rows}


def read_suppressions(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT address, reason, delivery_id FROM email.suppressions ORDER BY address"
        ).fetchall()


def dump_text(database_url: str) -> str:
    with psycopg.connect(database_url) as conn:
        tables = [
            r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'email'")
        ]
        return "\n".join(
            str(row[0])
            for table in tables
            for row in conn.execute(f'SELECT t::text FROM email."{table}" t')
        )


@dataclass(frozen=True)
class Outcome:
    posted: list[Posted]
    statuses: list[dict[str, Any]]
    suppressions: list[dict[str, Any]]
    problems: list[str]

    def requests(self) -> list[dict[str, Any]]:
        return [
            {
                "provider": p.provider,
                "delivery_id": p.delivery_id,
                "request": p.label,
                "status": p.response.status,
            }
            for p in self.posted
        ]

    def summary(self) -> str:
        applied = sum(p.response.body.get("applied", 0) for p in self.posted)
        duplicates = sum(p.response.body.get("duplicate", 0) for p in self.posted)
        refused = sum(1 for p in self.posted if p.response.status in (401, 403))
        return f"{applied} provider events applied, {duplicates} duplicate, {refused} refused"


def demonstrate(
    database_url: str,
    rows: list[dict[str, Any]],
    log_path: Path,
    say: Callable[[str], None],
    register_stop: Callable[[str, Callable[[], None]], None],
) -> Outcome:
    keys = ProviderKeys()
    sns, sns_settings = start_sns(register_stop)
    server = FunctionServer(
        {
            "DATABASE_URL": database_url,
            **keys.env(),
            **sns_settings,
            "SMTP_HOST": "",
            "EMAIL_FROM": "",
        },
        log_path=log_path,
        target="handle_provider_event",
        signature_type="http",
    )
    register_stop("the webhook function", server.stop)
    server.start(timeout=60)
    say(f"  webhook   {server.url}/<provider> (target handle_provider_event, http)")
    say("  keys      made for this run: SendGrid ECDSA P-256, Mailgun and Svix HMAC,")
    say("            Postmark Basic, an SNS certificate served over HTTPS by a local CA")
    message_ids = {row["delivery_id"]: str(row["provider_message_id"]) for row in rows}
    requests = Requests(
        keys, message_ids, read_relay_ids(database_url), read_sent_at(database_url), sns
    )
    posted = post_events(server, requests)
    statuses = read_provider_statuses(database_url)
    outcome = Outcome(
        posted,
        statuses,
        read_suppressions(database_url),
        _problems(posted, statuses, dump_text(database_url), server.logs()),
    )
    server.stop()
    return outcome


def _problems(
    posted: list[Posted], statuses: list[dict[str, Any]], dump: str, logs: str
) -> list[str]:
    found = [
        f"{p.provider} {p.label}: answered {p.response.status}, expected {p.expected_status}"
        for p in posted
        if p.response.status != p.expected_status
    ]
    by_id = {row["delivery_id"]: row["provider_status"] for row in statuses}
    for delivery_id, want in EXPECTED_STATUS.items():
        if by_id.get(delivery_id) != want:
            found.append(
                f"{delivery_id} provider status should be {want}, is {by_id.get(delivery_id)}"
            )
    for row in statuses:
        for key in TIMES:
            if row[key] is not None and row[key] < row["sent_at"]:
                found.append(f"{row['delivery_id']} {key} is before it was sent")
    for link in LINKS:
        if link in dump or link in logs:
            found.append(f"a clicked link reached the {'database' if link in dump else 'logs'}")
    return found


def report(
    outcome: Outcome,
    say: Callable[[str], None],
    table: Callable[[Sequence[str], Sequence[Sequence[str]]], list[str]],
) -> None:
    rows = [
        (
            p.provider,
            p.delivery_id,
            p.label,
            str(p.response.status),
            ", ".join(f"{k} {v}" for k, v in p.response.body.items() if v) or "-",
        )
        for p in outcome.posted
    ]
    for line in table(("provider", "delivery_id", "request", "answer", "counts"), rows):
        say(line)
    say("")
    say("  Provider status (email.deliveries)")
    status_rows = [
        (
            str(row["delivery_id"]),
            str(row["provider_status"] or "-"),
            *(row[key].strftime("%H:%M:%S") if row[key] else "-" for key in TIMES),
            str(row["events"]),
        )
        for row in outcome.statuses
    ]
    headers = ("delivery_id", "provider_status", "delivered", "opened", "clicked", "complained")
    for line in table((*headers, "events"), status_rows):
        say(line)
    say("")
    say("  Suppressions (email.suppressions)")
    for row in outcome.suppressions:
        say(f"    {mask_email(row['address'])}  {row['reason']}  (from {row['delivery_id']})")
    if not outcome.suppressions:
        say("    (none)")
