"""International addresses (docs/reference.md): IDN domains through every relay, non-ASCII
local parts only through a relay that advertises SMTPUTF8, one stored form for both spellings
of a domain. Real aiosmtpd servers (with and without `enable_SMTPUTF8`), PostgreSQL and the
Pub/Sub emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests import factories
from tests.harness.console import Console, seed
from tests.harness.pubsub import PubSubNamespace
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import MakeWorker
from worker.console import views
from worker.core.redact import mask_addresses, mask_email, sanitise
from worker.core.rules import address_key, envelope_address, normalise_address
from worker.core.settings import RateLimit
from worker.delivery import smtp
from worker.delivery.events import InvalidEvent, decode
from worker.delivery.pipeline import Worker, handle
from worker.ops import cli
from worker.store.ledger import Ledger, Status
from worker.store.suppressions import InvalidAddress, Suppressions, normalise
from worker.store.tracking import EventType, ProviderEvent, Tracking

ROOT = Path(__file__).resolve().parent.parent
MakeServer = Callable[..., SmtpTestServer]

U_LABEL = "bücher.example"
A_LABEL = "xn--bcher-kva.example"


@pytest.fixture(params=[False, True], ids=["plain", "pipelining"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def worker_for(make_worker: MakeWorker, server: SmtpTestServer) -> Worker:
    return make_worker(smtp=server.settings())


def deliver(worker: Worker, recipient: str, workflow: str = "verification-code") -> str:
    body = factories.payload(workflow, recipient=recipient)
    handle(factories.cloud_event(body), worker)
    return str(body["delivery_id"])


def row_of(ledger: Ledger, delivery_id: str) -> Any:
    row = ledger.get(delivery_id)
    assert row is not None
    return row


# --- the stored form ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_address", "stored"),
    [
        ("Ada@Example.COM", "Ada@Example.COM"),  # plain ASCII: as given, as before
        ("ada@localhost", "ada@localhost"),  # still allowed for ASCII addresses
        (f"Ada@{U_LABEL}", f"Ada@{U_LABEL}"),
        (f"Ada@{A_LABEL}", f"Ada@{U_LABEL}"),  # an A-label domain is stored decoded
        ("Ada@XN--BCHER-KVA.Example", f"Ada@{U_LABEL}"),
        ("Ada@BÜCHER.example", f"Ada@{U_LABEL}"),
        ("Ñoño@BÜCHER.example", f"ñoño@{U_LABEL}"),  # a non-ASCII local part: lower-cased
        ("n\u0303o@example.com", "\u00f1o@example.com"),  # NFC
        ("用户@例子.广告", "用户@例子.广告"),
    ],
)
def test_the_stored_form(given_address: str, stored: str) -> None:
    assert normalise_address(given_address) == stored
    assert normalise_address(stored) == stored


@pytest.mark.parametrize(
    "refused",
    [
        "x@xn--zz.example",  # not a valid A-label
        "ü@localhost",  # a special-use name: only plain ASCII addresses may use localhost
        "ü@bücher",  # no dot
        "ü b@bücher.example",
        '"ü"@bücher.example',
        "ü@[127.0.0.1]",
        "ü.@bücher.example",
        "ü@bücher.example\r\nBcc: x@example.com",
        "ü" * 65 + "@bücher.example",
        "a@" + "ü" * 64 + ".example",
    ],
)
def test_what_is_refused(refused: str) -> None:
    assert normalise_address(refused) is None


def test_an_event_carries_the_stored_form_and_a_bad_one_is_invalid() -> None:
    event = decode(factories.cloud_event(factories.payload(recipient=f"Ada@{A_LABEL}")))
    assert event.recipient == f"Ada@{U_LABEL}"
    with pytest.raises(InvalidEvent) as refused:
        decode(factories.cloud_event(factories.payload(recipient="ü@xn--zz.example")))
    assert refused.value.field == "recipient" and "zz" not in str(refused.value)


def test_suppression_keys_are_one_for_both_spellings() -> None:
    keys = {normalise(a) for a in (f"Ada@{U_LABEL}", f"ada@{A_LABEL}", "ADA@BÜCHER.EXAMPLE")}
    assert keys == {f"ada@{U_LABEL}"}
    assert normalise("ÑOÑO@BÜCHER.example") == normalise(f"ñoño@{A_LABEL}") == f"ñoño@{U_LABEL}"
    with pytest.raises(InvalidAddress):
        normalise("ü@xn--zz.example")


# --- sending --------------------------------------------------------------------------------


@pytest.mark.parametrize("server_smtputf8", [False, True], ids=["ascii-relay", "smtputf8-relay"])
def test_an_idn_domain_goes_out_as_a_labels_through_any_relay(
    make_worker: MakeWorker,
    make_smtp_server: MakeServer,
    ledger: Ledger,
    pipelining: bool,
    server_smtputf8: bool,
) -> None:
    server = make_smtp_server(pipelining=pipelining, smtputf8=server_smtputf8)
    delivery_id = deliver(worker_for(make_worker, server), f"Ada@{U_LABEL}")

    [received] = server.messages
    assert received.rcpt_tos == (f"Ada@{A_LABEL}",)
    assert received.message["To"] == f"Ada@{A_LABEL}"
    assert "SMTPUTF8" not in received.mail_options
    received.raw.decode("ascii")  # a pure ASCII message: every relay takes it
    row = row_of(ledger, delivery_id)
    assert (row.status, row.recipient) == (Status.SENT, f"Ada@{U_LABEL}")


def test_a_non_ascii_local_part_goes_out_with_smtputf8(
    make_worker: MakeWorker, make_smtp_server: MakeServer, ledger: Ledger, pipelining: bool
) -> None:
    server = make_smtp_server(pipelining=pipelining, smtputf8=True)
    delivery_id = deliver(worker_for(make_worker, server), f"Ñoño@{A_LABEL}")

    [received] = server.messages
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == (f"ñoño@{A_LABEL}",)
    assert f"To: ñoño@{U_LABEL}\r\n".encode() in received.raw  # a UTF-8 header
    assert received.message["To"] == f"ñoño@{U_LABEL}"
    row = row_of(ledger, delivery_id)
    assert (row.status, row.recipient, row.attempts) == (Status.SENT, f"ñoño@{U_LABEL}", 1)


def test_a_non_ascii_local_part_without_smtputf8_fails_once_and_is_dead_lettered(
    make_worker: MakeWorker,
    make_smtp_server: MakeServer,
    ledger: Ledger,
    pubsub: PubSubNamespace,
    pipelining: bool,
) -> None:
    server = make_smtp_server(pipelining=pipelining, smtputf8=False)
    worker = worker_for(make_worker, server)
    delivery_id = deliver(worker, "用户@例子.广告")

    assert server.messages == [] and server.transactions == 0  # not even a MAIL FROM
    row = row_of(ledger, delivery_id)
    assert (row.status, row.last_error_code, row.attempts) == (
        Status.FAILED,
        "SMTPUTF8_UNSUPPORTED",
        1,
    )
    assert row.status_reason == "permanent_failure"
    [letter] = pubsub.dead_letters()
    attributes = dict(letter.message.attributes)
    assert (attributes["reason"], attributes["error_code"], attributes["attempts"]) == (
        "permanent_failure",
        "SMTPUTF8_UNSUPPORTED",
        "1",
    )
    # The connection was clean: the next (ASCII) email goes out over it.
    deliver(worker, "ada@example.com")
    assert [m.rcpt_tos for m in server.messages] == [("ada@example.com",)]
    assert server.connections == 1


def test_the_relay_is_asked_on_each_connection(make_smtp_server: MakeServer) -> None:
    """What the fallback relay will use: each relay answers for itself from its EHLO."""
    for offers in (False, True):
        server = make_smtp_server(smtputf8=offers)
        sender = smtp.SmtpSender(server.settings())
        message = smtp.build_message(
            server.settings(),
            delivery_id="d-1",
            recipient=f"ñoño@{U_LABEL}",
            subject="s",
            text="t",
            html="<p>h</p>",
        )
        assert message.smtputf8
        try:
            sender.send(message)
            assert offers and len(server.messages) == 1
        except smtp.SmtpUtf8Unsupported as error:
            assert not offers and (error.code, error.transient) == ("SMTPUTF8_UNSUPPORTED", False)
        finally:
            sender.close()


# --- suppressions and rate limits across spellings ------------------------------------------


def test_a_suppressed_a_label_spelling_suppresses_the_u_label_one(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    worker = make_worker()
    assert cli.main(["suppressions", "add", f"user@{A_LABEL}"]) == 0
    assert cli.main(["suppressions", "add", f"ÑOÑO@{A_LABEL}"]) == 0
    skipped = [deliver(worker, f"user@{U_LABEL}"), deliver(worker, f"Ñoño@{U_LABEL}")]
    for delivery_id in skipped:
        row = row_of(ledger, delivery_id)
        assert (row.status, row.last_error_code) == (Status.SKIPPED, "SUPPRESSED")
    assert smtp_server.messages == []

    # Lifted by the other spelling: sent again.
    assert cli.main(["suppressions", "remove", f"USER@{U_LABEL.upper()}"]) == 0
    assert row_of(ledger, deliver(worker, f"User@{A_LABEL}")).status is Status.SENT


def test_a_bounce_reported_in_a_labels_matches_and_suppresses_the_stored_address(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    """Relays report the recipient as the envelope carried it: with the A-label domain."""
    worker = make_worker()
    sent = deliver(worker, f"Ada@{U_LABEL}", "invite")
    assert row_of(ledger, sent).status is Status.SENT
    applied = Tracking(ledger.pool).apply(
        ProviderEvent(
            provider="postmark",
            provider_event_id="idn-bounce-1",
            event_type=EventType.BOUNCED,
            occurred_at=datetime.now(UTC),
            recipient=f"Ada <ada@{A_LABEL.upper()}>",
            delivery_id=sent,
            message_id=None,
            relay_message_id=None,
            bounce_type="HardBounce",
        )
    )
    assert applied
    entry = Suppressions(ledger.pool).get(f"ada@{U_LABEL}")
    assert entry is not None and entry.address == f"ada@{U_LABEL}"
    skipped = deliver(worker, f"ADA@{A_LABEL}")
    assert (row_of(ledger, skipped).status, row_of(ledger, skipped).last_error_code) == (
        Status.SKIPPED,
        "SUPPRESSED",
    )


@pytest.mark.parametrize(
    "spellings",
    [
        [f"user@{U_LABEL}", f"user@{A_LABEL}", f"USER@{A_LABEL.upper()}"],
        [f"ñoño@{U_LABEL}", f"Ñoño@{A_LABEL}", f"ÑOÑO@{U_LABEL.upper()}"],
    ],
    ids=["ascii-local", "non-ascii-local"],
)
def test_the_rate_limit_counts_every_spelling_together(
    make_worker: MakeWorker, make_smtp_server: MakeServer, ledger: Ledger, spellings: list[str]
) -> None:
    server = make_smtp_server(smtputf8=True)
    worker = worker_for(make_worker, server)
    limits = {"verification-code": RateLimit(2, 3600, "2/1h")}
    worker = replace(worker, settings=replace(worker.settings, rate_limits=limits))
    ids = [deliver(worker, address) for address in spellings]
    assert [row_of(ledger, i).status for i in ids] == [Status.SENT, Status.SENT, Status.SKIPPED]
    assert row_of(ledger, ids[2]).last_error_code == "RATE_LIMITED"
    assert len(server.messages) == 2


# --- round trips ----------------------------------------------------------------------------

_LOCAL_CHARS = st.sampled_from(list("adaXYZ09.+-_") + list("ñÑüÜßçÇİıéÉøØ用户ä\u0308\u0303"))
_DOMAINS = st.sampled_from(
    [U_LABEL, A_LABEL, "BÜCHER.EXAMPLE", "例子.广告", "xn--fsqu00a.xn--4rr70v", "example.com"]
)


@pytest.fixture
def utf8_server(make_smtp_server: MakeServer) -> SmtpTestServer:
    return make_smtp_server(smtputf8=True, pipelining=True)


@pytest.fixture
def utf8_sender(utf8_server: SmtpTestServer) -> Iterator[smtp.SmtpSender]:
    sender = smtp.SmtpSender(utf8_server.settings())
    yield sender
    sender.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(local=st.text(_LOCAL_CHARS, min_size=1, max_size=12), domain=_DOMAINS)
def test_every_accepted_address_survives_the_ledger_and_the_envelope(
    ledger: Ledger,
    utf8_server: SmtpTestServer,
    utf8_sender: smtp.SmtpSender,
    local: str,
    domain: str,
) -> None:
    stored = normalise_address(f"{local}@{domain}")
    assume(stored is not None)
    assert stored is not None
    assert normalise_address(stored) == stored  # idempotent
    assert address_key(stored) == address_key(f"{local}@{domain}") == stored.lower()

    # The ledger: stored, read back equal.
    delivery_id = f"rt-{abs(hash((local, domain)))}"
    claim = ledger.claim(
        delivery_id=delivery_id,
        workflow="invite",
        recipient=stored,
        locale="en",
        metadata=None,
        source_message_id="m-rt",
        lease_seconds=60,
    )
    assert claim is not None
    assert row_of(ledger, delivery_id).recipient == stored

    # The envelope: what the server received reads back as the same address.
    message = smtp.build_message(
        utf8_server.settings(),
        delivery_id=delivery_id,
        recipient=stored,
        subject="s",
        text="t",
        html="<p>h</p>",
    )
    utf8_sender.send(message)
    received = utf8_server.messages[-1]
    assert received.rcpt_tos == message.recipients == (envelope_address(stored)[0],)
    assert normalise_address(received.rcpt_tos[0]) == stored
    assert normalise_address(str(received.message["To"])) == stored
    assert ("SMTPUTF8" in received.mail_options) == (not stored.split("@")[0].isascii())


# --- operators: the CLI and the console -----------------------------------------------------


def claimed(ledger: Ledger, recipient: str, delivery_id: str) -> None:
    assert ledger.claim(
        delivery_id=delivery_id,
        workflow="invite",
        recipient=normalise_address(recipient) or recipient,
        locale="en",
        metadata=None,
        source_message_id="m-1",
        lease_seconds=60,
    )


@pytest.mark.parametrize("asked", [f"ada@{U_LABEL}", f"ADA@{A_LABEL}", "ADA@BÜCHER.EXAMPLE"])
def test_history_finds_both_spellings(
    ledger: Ledger, capsys: pytest.CaptureFixture[str], asked: str
) -> None:
    claimed(ledger, f"Ada@{U_LABEL}", "idn-1")
    claimed(ledger, f"ada@{A_LABEL}", "idn-2")
    assert Suppressions(ledger.pool).add(f"ada@{A_LABEL}")[1]
    capsys.readouterr()
    assert cli.main(["history", "--recipient", asked, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(d["delivery_id"] for d in doc["deliveries"]) == ["idn-1", "idn-2"]
    assert doc["suppression"]["address"] == f"ada@{U_LABEL}"


def test_the_console_search_takes_either_spelling(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    delivery_id = seed(admin_conn, recipient=f"Ada@{U_LABEL}")
    for asked in (f"ada@{A_LABEL}", f"ADA@{U_LABEL}"):
        reply = console.get("/api/deliveries?" + urlencode({"recipient": asked}))
        assert reply.status == 200, reply.text
        [found] = reply.json()["deliveries"]
        assert found["delivery_id"] == delivery_id
        assert found["recipient"] == f"Ada@{U_LABEL}"  # searched for: shown in full
    assert views.address(f" Ada@{A_LABEL} ", "q") == f"Ada@{U_LABEL}"


# --- masking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("550 <किशोर@उदाहरण.भारत> unknown", "550 <क***@उदाहरण.भारत> unknown"),
        ("to ñoño@bücher.example failed", "to ñ***@bücher.example failed"),
        ("用户@例子.广告 said no", "用***@例子.广告 said no"),
        ("ada@example.com said no", "a***@example.com said no"),
    ],
)
def test_masking_shows_one_character_of_any_local_part(text: str, masked: str) -> None:
    assert mask_addresses(text) == masked
    assert sanitise(text) == masked


def test_mask_email_on_non_ascii() -> None:
    assert mask_email("किशोर@उदाहरण.भारत") == "क***@उदाहरण.भारत"
    assert mask_email(f"ñoño@{U_LABEL}") == f"ñ***@{U_LABEL}"


# --- cold start -----------------------------------------------------------------------------


def test_an_ascii_delivery_path_does_not_import_email_validator() -> None:
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
        "import sys, main\n"
        "from tests import factories\n"
        "from worker.delivery import events, smtp\n"
        "from worker.delivery.config import SmtpSettings\n"
        "from worker.store.suppressions import normalise\n"
        "body = factories.payload(recipient='Ada.Lovelace@example.com')\n"
        "event = events.decode(factories.cloud_event(body))\n"
        "settings = SmtpSettings(host='h', sender='a@example.com')\n"
        "smtp.build_message(settings, delivery_id='d', recipient=event.recipient,"
        " subject='s', text='t', html='h')\n"
        "normalise('ADA@example.com')\n"
        "print(sorted(m for m in ('email_validator', 'dns.resolver') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# --- migration 011: addresses stored before, re-stored ----------------------------------------

MIGRATED_DOMAINS = [
    "bücher.example",
    "例子.广告",
    "münchen.de",
    "ñandú.example.com",
    "россия.рф",
    "ελλάδα.gr",
    "日本語.jp",
    "faß.de",
    "xn--ab.example",  # not valid Punycode: left as it is
]


def _a_label(domain: str) -> str:
    import idna

    if domain.startswith("xn--"):
        return domain
    return idna.encode(domain, uts46=False).decode("ascii")


def _quiet(_line: str) -> None:
    pass


def test_migration_011_stores_a_label_domains_decoded_and_back(empty_database_url: str) -> None:
    from worker.store.migrations import discover, migrate_down, migrate_up

    url = empty_database_url
    through_011 = [m for m in discover() if m.version <= 11]
    migrate_up(url, [m for m in through_011 if m.version < 11], report=_quiet)
    a_labels = [_a_label(domain) for domain in MIGRATED_DOMAINS]
    with psycopg.connect(url, autocommit=True) as conn:
        for n, a_label in enumerate(a_labels):
            conn.execute(
                "INSERT INTO email.suppressions (address, reason) VALUES (%s, 'manual')",
                (f"user{n}@{a_label}",),
            )
            conn.execute(
                "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
                " VALUES (%s, 'invite', %s, 'queued')",
                (f"m-{n}", f"User{n}@{a_label.upper()}"),
            )
        # Both spellings suppressed already: merged into the decoded entry.
        conn.execute(
            "INSERT INTO email.suppressions (address, reason) VALUES (%s, 'complaint')",
            (f"user0@{U_LABEL}",),
        )
    assert [m.version for m in migrate_up(url, through_011, report=_quiet)] == [11]

    def state() -> tuple[dict[str, str], dict[str, str], int]:
        with psycopg.connect(url) as conn:
            entries: dict[str, str] = dict(
                conn.execute("SELECT address, reason FROM email.suppressions").fetchall()
            )
            recipients: dict[str, str] = dict(
                conn.execute("SELECT delivery_id, recipient FROM email.deliveries").fetchall()
            )
            (audit,) = conn.execute("SELECT count(*) FROM email.delivery_events").fetchone() or (0,)
        return entries, recipients, audit

    entries, recipients, audit = state()
    decoded = [d if not d.startswith("xn--") else d.upper() for d in MIGRATED_DOMAINS]
    assert entries == {
        f"user{n}@{d}": "complaint" if n == 0 else "manual" for n, d in enumerate(MIGRATED_DOMAINS)
    }
    assert recipients == {f"m-{n}": f"User{n}@{d}" for n, d in enumerate(decoded)}
    for n, domain in enumerate(MIGRATED_DOMAINS[:-1]):  # as the worker stores them now
        assert normalise_address(f"User{n}@{_a_label(domain)}") == recipients[f"m-{n}"]
    assert audit == len(MIGRATED_DOMAINS)  # the inserts' rows only: no transition

    assert [m.version for m in migrate_down(url, migrations=through_011, report=_quiet)] == [11]
    entries, recipients, _ = state()
    assert set(entries) == {f"user{n}@{a}" for n, a in enumerate(a_labels)}
    assert recipients == {
        f"m-{n}": f"User{n}@{a if n < len(a_labels) - 1 else a.upper()}"
        for n, a in enumerate(a_labels)
    }
