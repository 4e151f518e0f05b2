"""The whole service on one machine, end to end: `bash scripts/local-stack.sh [--keep-running]`.

Starts a throwaway PostgreSQL (migrated with `python -m worker migrate`), the Pub/Sub emulator,
an SMTP server that saves each email as a `.eml` file (scripts/eml_sink.py) and `main.py` under
functions-framework, fed by a push subscription as Cloud Functions would be, and the support
console (`delivery_console`, as an `email_reader` login), whose URL it prints. Then publishes one
delivery per workflow, a duplicate, one to an address the SMTP server refuses and one that is
not JSON; waits until each is finished; prints the ledger, the dead letters, the emails and the
logs. Then shows deliveries skipped on purpose: a provider's hard bounce for one sample
recipient and a second delivery to it (skipped, SUPPRESSED), and a burst of codes to one address
(RATE_LIMITS: the limit is sent, the rest skipped). Stops everything it started (also on an
error, Ctrl-C or SIGTERM).

Exit 0 when every outcome is the expected one, 1 otherwise. Outputs go to the run directory
(`--run-dir`, or `LOCAL_STACK_DIR`, default `run/`): `emails/`, `logs/`, `summary.json`.
Run through scripts/local-stack.sh, which prepares the venv and sets PYTHONPATH to the checkout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from eml_sink import EmlSink
from local_webhooks import demonstrate, report
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from tests.harness.function import ROOT, FunctionServer
from tests.harness.postgres import PostgresServer
from tests.harness.pubsub import Emulator, EmulatorProcess
from worker.core import pubsub as worker_pubsub
from worker.core.redact import mask_email
from worker.store.tracking import EventType, ProviderEvent, Tracking

PROJECT = "local-project"
# The names deploy/config.sh gives the real resources, so the README's commands work as
# written against this stack (tests/test_local_stack.py checks that they agree).
DELIVERY_TOPIC = "email-deliveries"
DEAD_LETTER_TOPIC = "email-deliveries-dead-letter"
PUSH_SUBSCRIPTION = "email-deliveries-push"  # in the cloud: Eventarc's trigger subscription
REPLAY_SUBSCRIPTION = "email-deliveries-dead-letter-replay"
DATABASE = "email_local"
EMAIL_FROM = "Example App <noreply@example.com>"
REFUSED = {"bounce@example.com": "550 5.1.1 no such user"}
DEFAULT_TIMEOUT_SECONDS = 45.0
# The support console's own login: it may only read (granted email_reader, nothing else).
CONSOLE_ROLE = "local_console"

# Settings from the caller's shell that would change what the function does here.
_FOREIGN_SETTINGS = (
    "DATABASE_URL_SECRET",
    "SMTP_USERNAME",
    "SMTP_PASSWORD",
    "SMTP_PASSWORD_SECRET",
    "SMTP_CA_FILE",
    "EMAIL_REPLY_TO",
    "MESSAGE_ID_DOMAIN",
    "SECRET_MANAGER_ENDPOINT",
)


# --- the sample deliveries ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    label: str
    body: bytes
    delivery_id: str | None
    recipient: str | None


def _event(delivery_id: str, workflow: str, recipient: str, data: dict[str, Any]) -> bytes:
    body = {
        "delivery_id": delivery_id,
        "workflow": workflow,
        "recipient": recipient,
        "data": data,
        "metadata": {"source": "local-stack"},
        "locale": "en",
    }
    return json.dumps(body).encode()


VERIFY = Sample(
    "verification-code",
    _event(
        "verify-demo-1",
        "verification-code",
        "ada@example.com",
        {"code": "482913", "expires_in_minutes": 10},
    ),
    "verify-demo-1",
    "ada@example.com",
)
INVITE = Sample(
    "invite",
    _event(
        "invite-demo-1",
        "invite",
        "grace@example.com",
        {
            "organization_name": "Acme",
            "inviter_name": "Ada",
            "invite_url": "https://app.example.com/invite/7Hq2xLm9",
            "expires_at": (date.today() + timedelta(days=7)).isoformat(),
        },
    ),
    "invite-demo-1",
    "grace@example.com",
)
RESET = Sample(
    "password-reset",
    _event(
        "reset-demo-1",
        "password-reset",
        "kim@example.com",
        {"reset_url": "https://app.example.com/reset/Qw8rT2zP", "expires_in_minutes": 30},
    ),
    "reset-demo-1",
    "kim@example.com",
)
SAMPLES = (
    VERIFY,
    INVITE,
    RESET,
    Sample("duplicate of verification-code", VERIFY.body, VERIFY.delivery_id, VERIFY.recipient),
    Sample(
        "refused recipient",
        _event("bounce-demo-1", "verification-code", "bounce@example.com", {"code": "771204"}),
        "bounce-demo-1",
        "bounce@example.com",
    ),
    Sample("invalid (not JSON)", b'{"delivery_id": "broken-demo-1", "workflow": ', None, None),
)
SENT_IDS = (VERIFY.delivery_id, INVITE.delivery_id, RESET.delivery_id)
FAILED_ID = "bounce-demo-1"

# Skipped on purpose (docs/operating.md), after the samples: a hard bounce for the invite's
# recipient, then a second invite to the same address in other letter case; and a burst of
# codes to one address, over the function's RATE_LIMITS.
CODES_PER_HOUR = 3
RATE_LIMITS = f"verification-code={CODES_PER_HOUR}/1h"
SUPPRESSED = Sample(
    "invite after a hard bounce",
    _event(
        "invite-demo-2",
        "invite",
        "Grace@Example.com",
        {"organization_name": "Acme", "invite_url": "https://app.example.com/invite/Zr4wKp1d"},
    ),
    "invite-demo-2",
    "Grace@Example.com",
)
BURST = tuple(
    Sample(
        f"code {n} of a burst",
        _event(f"burst-demo-{n}", "verification-code", "eve@example.com", {"code": f"90{n}417"}),
        f"burst-demo-{n}",
        "eve@example.com",
    )
    for n in range(1, 2 * CODES_PER_HOUR + 1)
)


# The fallback relay (docs/reliability.md): the primary goes down, the fallback takes over,
# the primary's circuit opens after RELAY_TRIP_AFTER failures and closes after one trial once
# it is back; and a code published with a validity end already passed is skipped.
RELAY_TRIP_AFTER = 2
RELAY_COOLDOWN_SECONDS = 2
OUTAGE = tuple(
    Sample(
        f"code {n} while the primary is down",
        _event(
            f"relay-demo-{n}", "verification-code", f"user{n}@example.com", {"code": f"71{n}903"}
        ),
        f"relay-demo-{n}",
        f"user{n}@example.com",
    )
    for n in range(1, RELAY_TRIP_AFTER + 3)
)
TRIAL = Sample(
    "code after the cool-down (the trial)",
    _event("relay-demo-trial", "verification-code", "trial@example.com", {"code": "552901"}),
    "relay-demo-trial",
    "trial@example.com",
)
EXPIRED = Sample(
    "code whose validity ended long ago (not_after)",
    json.dumps(
        {
            **json.loads(
                _event(
                    "expired-demo-1", "verification-code", "late@example.com", {"code": "118822"}
                )
            ),
            "not_after": "2000-01-01T00:00:00Z",
        }
    ).encode(),
    "expired-demo-1",
    "late@example.com",
)


# --- output ---------------------------------------------------------------------------------


def say(line: str = "") -> None:
    print(line, flush=True)


def section(title: str) -> None:
    say()
    say(f"== {title}")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = []
    for row in (headers, *rows):
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return [line.rstrip() for line in lines]


# --- signals --------------------------------------------------------------------------------


# Ctrl-C, `kill`, and the terminal closing: the emulator and the function run in sessions of
# their own (so Ctrl-C reaches only us), hence we must stop them on each of these.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: unwinds like KeyboardInterrupt, so every `finally` stops its part."""


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _catch_signals() -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _raise_interrupted)


def _ignore_signals() -> None:
    """While stopping: a second Ctrl-C must not leave half the stack running."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Observed:
    """What the poll saw: ledger rows, dead letters, the function's log, the emails."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: dict[str, dict[str, str]] = field(default_factory=dict)  # by message id
    log_messages: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicates_skipped: int = 0
    emails: list[Path] = field(default_factory=list)

    def finished(self) -> bool:
        statuses = {row["delivery_id"]: row["status"] for row in self.rows}
        expected = (*SENT_IDS, FAILED_ID)
        return (
            all(statuses.get(i) in ("sent", "failed", "dead_letter") for i in expected)
            and len(self.dead_letters) >= 2
            and self.duplicates_skipped >= 1
        )


@dataclass
class Stack:
    run_dir: Path
    emails_dir: Path
    logs_dir: Path
    postgres: PostgresServer | None = None
    database_url: str = ""
    emulator_process: EmulatorProcess | None = None
    emulator: Emulator | None = None
    sink: EmlSink | None = None
    fallback: EmlSink | None = None
    function: FunctionServer | None = None
    console: FunctionServer | None = None

    @property
    def function_log(self) -> Path:
        return self.logs_dir / "function.log"

    def env(self) -> dict[str, str]:
        """What an operator exports to use this stack from another shell."""
        assert self.emulator_process is not None
        return {
            "DATABASE_URL": self.database_url,
            "PUBSUB_EMULATOR_HOST": self.emulator_process.host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "DELIVERY_TOPIC": DELIVERY_TOPIC,
            "DEAD_LETTER_TOPIC": DEAD_LETTER_TOPIC,
        }

    def function_env(self) -> dict[str, str]:
        assert self.sink is not None and self.fallback is not None
        return {
            **self.env(),
            "SMTP_HOST": self.sink.host,
            "SMTP_PORT": str(self.sink.port),
            "SMTP_SECURITY": "none",
            "FALLBACK_SMTP_HOST": self.fallback.host,
            "FALLBACK_SMTP_PORT": str(self.fallback.port),
            "FALLBACK_SMTP_SECURITY": "none",
            "RELAY_TRIP_AFTER": str(RELAY_TRIP_AFTER),
            "RELAY_COOLDOWN_SECONDS": str(RELAY_COOLDOWN_SECONDS),
            "SMTP_TIMEOUT_SECONDS": "5",
            "EMAIL_FROM": EMAIL_FROM,
            "MAX_ATTEMPTS": "3",
            "SEND_TRIES_PER_INVOCATION": "2",
            "RETRY_BACKOFF_SECONDS": "0.2",
            "RETRY_BACKOFF_MAX_SECONDS": "1",
            "LEASE_SECONDS": "30",
            "PUBLISH_TIMEOUT_SECONDS": "10",
            "RATE_LIMITS": RATE_LIMITS,
        }

    def ports(self) -> dict[str, int]:
        found: dict[str, int] = {}
        if self.postgres is not None:
            found["postgres"] = self.postgres.port
        if self.emulator_process is not None:
            found["pubsub_emulator"] = self.emulator_process.port
        if self.sink is not None:
            found["smtp"] = self.sink.port
        if self.fallback is not None:
            found["smtp_fallback"] = self.fallback.port
        if self.function is not None:
            found["function"] = self.function.port
        if self.console is not None:
            found["console"] = self.console.port
        return found


class Stopper:
    """Stops what was started, newest first; one failure does not keep the rest running."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def callback(self, what: str, step: Callable[[], None]) -> None:
        self._steps.append((what, step))

    def stop_all(self) -> None:
        while self._steps:
            what, step = self._steps.pop()
            try:
                step()
            except Exception as error:
                say(f"  could not stop {what}: {_one_line(error)}")


def start_postgres(stack: Stack, stop: Stopper) -> None:
    section("PostgreSQL (the ledger)")
    server = PostgresServer()
    stack.postgres = server

    def stop_postgres() -> None:
        with contextlib.suppress(OSError):
            shutil.copyfile(server.log, stack.logs_dir / "postgres.log")
        server.destroy()

    stop.callback("PostgreSQL", stop_postgres)
    server.init()
    server.start()
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    stack.database_url = f"postgresql://postgres@127.0.0.1:{server.port}/{DATABASE}"
    say(f"  server    127.0.0.1:{server.port}, data in {server.data}")
    say(f"  database  {stack.database_url}")
    migrate = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": stack.database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    for line in (migrate.stdout + migrate.stderr).splitlines():
        say(f"  migrate   {line}")
    if migrate.returncode != 0:
        raise RuntimeError(f"`python -m worker migrate` exited with {migrate.returncode}")


def start_pubsub(stack: Stack, stop: Stopper) -> Emulator:
    section("Pub/Sub emulator")
    process = EmulatorProcess()
    stack.emulator_process = process

    def stop_emulator() -> None:
        with contextlib.suppress(OSError):
            shutil.copyfile(process.log_path, stack.logs_dir / "pubsub-emulator.log")
        process.stop()  # the whole process group: the gcloud wrapper and its java child

    stop.callback("the Pub/Sub emulator", stop_emulator)
    process.start()
    # worker.core.pubsub.publish (and the emulator helper) read it when their client is made.
    os.environ["PUBSUB_EMULATOR_HOST"] = process.host
    os.environ["GOOGLE_CLOUD_PROJECT"] = PROJECT
    stop.callback("the publisher", worker_pubsub.reset_client)
    emulator = Emulator(process.host, PROJECT)
    stack.emulator = emulator
    stop.callback("the emulator clients", emulator.close)
    emulator.create_topic(DELIVERY_TOPIC)
    emulator.create_topic(DEAD_LETTER_TOPIC)
    emulator.create_pull_subscription(DEAD_LETTER_TOPIC, REPLAY_SUBSCRIPTION, ack_deadline=10)
    say(f"  emulator  {process.host} (answered in {process.start_seconds:.1f} s)")
    say(f"  topics    {emulator.topic_path(DELIVERY_TOPIC)}")
    say(f"            {emulator.topic_path(DEAD_LETTER_TOPIC)}")
    say(f"  replay    pull subscription {emulator.subscription_path(REPLAY_SUBSCRIPTION)}")
    return emulator


def start_smtp(stack: Stack, stop: Stopper) -> None:
    section("SMTP server (saves .eml files)")
    sink = EmlSink(stack.emails_dir, refused=REFUSED)
    stack.sink = sink
    stop.callback("the SMTP server", sink.stop)
    sink.start()
    say(f"  smtp      {sink.host}:{sink.port}, no TLS, no AUTH")
    say(f"  emails    {stack.emails_dir}/")
    fallback = EmlSink(stack.emails_dir / "relays")
    stack.fallback = fallback
    stop.callback("the fallback SMTP server", fallback.stop)
    fallback.start()
    say(f"  fallback  {fallback.host}:{fallback.port} (FALLBACK_SMTP_HOST), emails in relays/")
    for address, reply in REFUSED.items():
        say(f"  refuses   {address} with `{reply}`")


def start_function(stack: Stack, emulator: Emulator, stop: Stopper) -> None:
    section("Function (main.py under functions-framework)")
    # The log stays with the other outputs, not in a temp dir.
    server = FunctionServer(stack.function_env(), log_path=stack.function_log)
    for name in _FOREIGN_SETTINGS:
        server.env.pop(name, None)
    stack.function = server
    stop.callback("the function", server.stop)
    server.start(timeout=60)
    endpoint = server.push_endpoint(PROJECT, DELIVERY_TOPIC)
    emulator.create_push_subscription(
        DELIVERY_TOPIC,
        PUSH_SUBSCRIPTION,
        endpoint,
        ack_deadline=30,
        minimum_backoff=1,
        maximum_backoff=5,
    )
    say(f"  function  {server.url} (target handle_delivery, cloudevent)")
    say(f"  push      {emulator.subscription_path(PUSH_SUBSCRIPTION)} -> {endpoint}")
    say("  settings  SMTP_SECURITY=none MAX_ATTEMPTS=3 SEND_TRIES_PER_INVOCATION=2")
    say("            RETRY_BACKOFF_SECONDS=0.2, push retry backoff 1..5 s")
    say(f"            RATE_LIMITS={RATE_LIMITS}")
    say(f"  log       {server.log_path}")


def start_console(stack: Stack, stop: Stopper) -> None:
    section("Support console (main.py delivery_console, as an email_reader login)")
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {CONSOLE_ROLE} LOGIN IN ROLE email_reader")
    reader_url = stack.database_url.replace("postgres@", f"{CONSOLE_ROLE}@", 1)
    server = FunctionServer(
        # A fresh cursor key each run: cursors of an earlier run are refused, as after a
        # deployment's key is rotated.
        {"CONSOLE_DATABASE_URL": reader_url, "CONSOLE_CURSOR_KEY": secrets.token_urlsafe(48)},
        log_path=stack.logs_dir / "console.log",
        target="delivery_console",
        signature_type="http",
    )
    # Only its own setting: no worker, SMTP or Pub/Sub one reaches it.
    for name in (*stack.function_env(), *_FOREIGN_SETTINGS):
        server.env.pop(name, None)
    stack.console = server
    stop.callback("the console", server.stop)
    server.start(timeout=60)
    say(f"  console   {server.url}/ (login {CONSOLE_ROLE}, granted email_reader only)")
    say(f"  log       {server.log_path}")


def check_console(stack: Stack) -> list[str]:
    """The console answers for a delivery the stack just sent: what support would look up."""
    assert stack.console is not None
    url = f"{stack.console.url}/api/deliveries/{VERIFY.delivery_id}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status = json.load(response)["delivery"]["status"]
    except (OSError, ValueError, KeyError) as error:
        return [f"the console did not answer for {VERIFY.delivery_id}: {_one_line(error)}"]
    section("Open the support console")
    say(f"  open      {stack.console.url}/")
    say(f"  e.g.      {stack.console.url}/deliveries/{VERIFY.delivery_id} ({status})")
    say(f"            {stack.console.url}/stats")
    if status != "sent":
        return [f"the console shows {VERIFY.delivery_id} as {status}, expected sent"]
    return []


def publish_samples(
    samples: Sequence[Sample] = SAMPLES,
    title: str = "Publishing sample deliveries (worker.core.pubsub.publish)",
) -> None:
    section(title)
    topic = f"projects/{PROJECT}/topics/{DELIVERY_TOPIC}"
    rows = []
    for sample in samples:
        message_id = worker_pubsub.publish(topic, sample.body, {}, timeout=15)
        recipient = mask_email(sample.recipient) if sample.recipient else "-"
        rows.append((sample.label, sample.delivery_id or "-", recipient, message_id))
    for line in table(("what", "delivery_id", "recipient", "pubsub message id"), rows):
        say(line)


# --- watching -------------------------------------------------------------------------------


def read_ledger(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT delivery_id, workflow, recipient, status::text AS status, attempts,"
            " last_error_code, provider_message_id"
            " FROM email.deliveries ORDER BY created_at, delivery_id"
        ).fetchall()


def collect_dead_letters(emulator: Emulator, seen: dict[str, dict[str, str]]) -> None:
    """Pull what is there and hand it straight back (not acked), so `replay` can take it."""
    batch = emulator.pull_once(REPLAY_SUBSCRIPTION, 100)
    for received in batch:
        seen[received.message.message_id] = dict(received.message.attributes)
    if batch:
        emulator.nack(REPLAY_SUBSCRIPTION, [m.ack_id for m in batch])


def read_function_log(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


def observe(stack: Stack, observed: Observed) -> None:
    assert stack.emulator is not None and stack.sink is not None
    observed.rows = read_ledger(stack.database_url)
    collect_dead_letters(stack.emulator, observed.dead_letters)
    log = read_function_log(stack.function_log)
    observed.log_messages = collections.Counter(str(line.get("message")) for line in log)
    observed.duplicates_skipped = sum(
        1
        for line in log
        if line.get("message") == "duplicate event skipped"
        and line.get("delivery_id") == VERIFY.delivery_id
    )
    observed.emails = stack.sink.saved


def wait_for_outcomes(stack: Stack, timeout: float) -> tuple[Observed, float]:
    section(f"Waiting for every delivery to finish (at most {timeout:g} s)")
    observed = Observed()
    started = time.monotonic()
    deadline = started + timeout
    while True:
        observe(stack, observed)
        if observed.finished() or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if observed.finished():
        time.sleep(0.5)  # anything extra (a second email, a stray dead letter) shows up now
        observe(stack, observed)
    elapsed = time.monotonic() - started
    state = "finished" if observed.finished() else "NOT finished"
    say(f"  {state} after {elapsed:.1f} s")
    return observed, elapsed


# --- the report -----------------------------------------------------------------------------


def print_ledger(observed: Observed) -> None:
    section("Ledger (email.deliveries)")
    headers = ("delivery_id", "workflow", "recipient", "status", "attempts", "last_error_code")
    rows = [
        (
            row["delivery_id"],
            row["workflow"] or "-",
            mask_email(row["recipient"]) if row["recipient"] else "-",
            row["status"],
            str(row["attempts"]),
            row["last_error_code"] or "-",
        )
        for row in observed.rows
    ]
    for line in table(headers, rows):
        say(line)
    if not rows:
        say("  (no rows)")


def print_dead_letters(observed: Observed) -> None:
    section(f"Dead letters (pull subscription {REPLAY_SUBSCRIPTION}, left for replay)")
    rows = [
        (
            attributes.get("reason", "-"),
            attributes.get("error_code", "-"),
            attributes.get("delivery_id", "-"),
            attributes.get("error_message", "")[:60],
        )
        for _, attributes in sorted(observed.dead_letters.items())
    ]
    rows.sort()
    for line in table(("reason", "error_code", "delivery_id", "error_message"), rows):
        say(line)
    if not rows:
        say("  (none)")


def email_headers(path: Path) -> dict[str, str]:
    message = BytesParser(policy=default_policy).parsebytes(path.read_bytes(), headersonly=True)
    return {name: str(message.get(name, "")) for name in ("To", "Subject", "Message-ID")}


def print_emails(stack: Stack, observed: Observed) -> None:
    section(f"Emails ({len(observed.emails)} in {stack.emails_dir}/)")
    for path in observed.emails:
        headers = email_headers(path)
        say(f"  {path.name}")
        say(f"      To: {mask_email(headers['To'])}  Subject: {headers['Subject']}")
    if not observed.emails:
        say("  (none)")


def print_logs(stack: Stack, observed: Observed) -> None:
    section("Logs")
    counts = ", ".join(f"{n} x {message!r}" for message, n in observed.log_messages.most_common())
    say(f"  function  {stack.function_log}")
    if counts:
        say(f"            {counts}")
    say(f"  others    {stack.logs_dir}/ (postgres.log, pubsub-emulator.log: copied on stop)")


def problems(observed: Observed) -> list[str]:
    """Everything that differs from the expected outcomes; empty when all is well."""
    found: list[str] = []
    rows = {row["delivery_id"]: row for row in observed.rows}
    for delivery_id in SENT_IDS:
        row = rows.get(delivery_id)
        if row is None or row["status"] != "sent":
            status = row["status"] if row else "no ledger row"
            found.append(f"{delivery_id} should be sent, is {status}")
    bounce = rows.get(FAILED_ID)
    if bounce is None or bounce["status"] != "failed" or bounce["last_error_code"] != "SMTP_550":
        status = f"{bounce['status']} {bounce['last_error_code']}" if bounce else "no ledger row"
        found.append(f"{FAILED_ID} should be failed with SMTP_550, is {status}")
    extra = sorted(set(rows) - {*SENT_IDS, FAILED_ID})
    if extra:
        found.append(f"unexpected ledger rows: {', '.join(extra)}")
    letters = sorted(
        (a.get("reason", "?"), a.get("delivery_id", "-")) for a in observed.dead_letters.values()
    )
    if letters != [("invalid_event", "-"), ("permanent_failure", FAILED_ID)]:
        found.append(
            "dead letters should be one invalid_event and one permanent_failure for "
            f"{FAILED_ID}, got {letters or 'none'}"
        )
    if observed.duplicates_skipped != 1:
        found.append(
            f"the duplicate of {VERIFY.delivery_id} should be skipped once, "
            f"was skipped {observed.duplicates_skipped} times"
        )
    message_ids = collections.Counter(email_headers(p)["Message-ID"] for p in observed.emails)
    want = {str(rows[i]["provider_message_id"]) for i in SENT_IDS if i in rows}
    if (
        len(observed.emails) != 3
        or set(message_ids) != want
        or max(message_ids.values(), default=0) != 1
    ):
        found.append(
            f"expected 3 emails, one per sent delivery, got {len(observed.emails)}: "
            f"{dict(message_ids)}"
        )
    return found


def summary_line(observed: Observed) -> str:
    statuses = collections.Counter(row["status"] for row in observed.rows)
    invalid = sum(1 for a in observed.dead_letters.values() if a.get("reason") == "invalid_event")
    return (
        f"{statuses['sent']} sent, {statuses['failed']} failed, "
        f"{invalid} invalid dead-lettered, {observed.duplicates_skipped} duplicate skipped"
    )


def keep_running(stack: Stack) -> None:
    env = stack.env()
    env_file = stack.run_dir / "local-stack.env"
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    section("Still running: Ctrl-C (or SIGTERM) stops everything")
    say(f"  In another shell, from {ROOT}: source {env_file}")
    say("  (it holds these settings:)")
    for name, value in env.items():
        say(f"    export {name}={value}")
    say("  then try, e.g.:")
    say(f"    .venv/bin/python -m worker status {VERIFY.delivery_id}")
    say("    .venv/bin/python -m worker suppressions list")
    say(f"    .venv/bin/python -m worker replay --subscription {REPLAY_SUBSCRIPTION} --dry-run")
    if stack.console is not None:
        say(f"  the support console: {stack.console.url}/")
    try:
        while True:
            time.sleep(3600)
    finally:
        env_file.unlink(missing_ok=True)


# --- skipped on purpose --------------------------------------------------------------------


def report_hard_bounce(database_url: str, delivery_id: str, recipient: str) -> None:
    """What a provider's webhook does on a hard bounce (worker/store/tracking.py): the
    recipient goes on the suppression list."""
    event = ProviderEvent(
        provider="local-stack",
        provider_event_id=f"bounce-{delivery_id}",
        event_type=EventType.BOUNCED,
        occurred_at=datetime.now(UTC),
        recipient=recipient,
        delivery_id=delivery_id,
        message_id=None,
        relay_message_id=None,
        bounce_type="HardBounce",
    )
    with ConnectionPool(database_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        Tracking(pool).apply(event)


def read_skipping(database_url: str) -> dict[str, dict[str, Any]]:
    ids = [SUPPRESSED.delivery_id, *(sample.delivery_id for sample in BURST)]
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT delivery_id, recipient, status::text AS status, last_error_code,"
            " status_reason FROM email.deliveries WHERE delivery_id = ANY(%s)",
            (ids,),
        ).fetchall()
    return {row["delivery_id"]: row for row in rows}


def demonstrate_skipping(stack: Stack, timeout: float) -> tuple[list[str], str]:
    """The suppression list and RATE_LIMITS at work; (problems, summary)."""
    assert stack.sink is not None
    assert INVITE.delivery_id is not None and INVITE.recipient is not None
    section("Skipped on purpose: a provider reports a hard bounce (worker/store/tracking.py)")
    report_hard_bounce(stack.database_url, INVITE.delivery_id, INVITE.recipient)
    say(
        f"  {INVITE.delivery_id} bounced: {mask_email(INVITE.recipient)} is on the suppression list"
    )
    emails_before = len(stack.sink.saved)
    publish_samples(
        (SUPPRESSED, *BURST),
        f"Skipped on purpose: publishing to it again, and a burst of codes ({RATE_LIMITS})",
    )
    deadline = time.monotonic() + timeout
    rows = read_skipping(stack.database_url)
    while time.monotonic() < deadline and not (
        len(rows) == 1 + len(BURST)
        and all(r["status"] in ("sent", "skipped") for r in rows.values())
    ):
        time.sleep(0.25)
        rows = read_skipping(stack.database_url)
    time.sleep(0.5)  # a stray email would show up now
    rows = read_skipping(stack.database_url)
    emails = stack.sink.saved[emails_before:]
    section("Skipped on purpose: the ledger")
    headers = ("delivery_id", "recipient", "status", "last_error_code", "status_reason")
    printed = [
        (
            delivery_id,
            mask_email(row["recipient"]),
            row["status"],
            row["last_error_code"] or "-",
            row["status_reason"] or "-",
        )
        for delivery_id, row in sorted(rows.items())
    ]
    for line in table(headers, printed):
        say(line)
    say(f"  emails: {len(emails)} more in {stack.emails_dir}/ (the burst's first {CODES_PER_HOUR})")
    say("  see it: python -m worker suppressions list; lift it: suppressions remove ADDRESS")

    found: list[str] = []
    skipped = rows.get(str(SUPPRESSED.delivery_id))
    if skipped is None or (skipped["status"], skipped["last_error_code"]) != (
        "skipped",
        "SUPPRESSED",
    ):
        found.append(f"{SUPPRESSED.delivery_id} should be skipped with SUPPRESSED, is {skipped}")
    burst = collections.Counter(
        (rows[str(s.delivery_id)]["status"], rows[str(s.delivery_id)]["last_error_code"])
        for s in BURST
        if str(s.delivery_id) in rows
    )
    want = {("sent", None): CODES_PER_HOUR, ("skipped", "RATE_LIMITED"): CODES_PER_HOUR}
    if burst != want:
        found.append(
            f"the burst should be {CODES_PER_HOUR} sent and {CODES_PER_HOUR} skipped,"
            f" got {dict(burst)}"
        )
    to = collections.Counter(email_headers(path)["To"].lower() for path in emails)
    if to != {"eve@example.com": CODES_PER_HOUR}:
        found.append(
            f"expected {CODES_PER_HOUR} more emails, all to the burst's address: {dict(to)}"
        )
    summary = (
        f"1 suppressed, {burst[('sent', None)]} of {len(BURST)} burst codes sent "
        f"({burst[('skipped', 'RATE_LIMITED')]} rate limited)"
    )
    return found, summary


def read_relay_demo(database_url: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    ids = [str(s.delivery_id) for s in (*OUTAGE, TRIAL, EXPIRED)]
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT delivery_id, status::text AS status, relay, last_error_code"
            " FROM email.deliveries WHERE delivery_id = ANY(%s)",
            (ids,),
        ).fetchall()
        circuits = conn.execute(
            "SELECT relay, CASE WHEN reopens_at IS NULL THEN 'closed' WHEN reopens_at > now()"
            " THEN 'open' ELSE 'half-open' END AS state, consecutive_failures,"
            " last_error_code FROM email.relay_circuits ORDER BY relay = 'fallback'"
        ).fetchall()
    return {row["delivery_id"]: row for row in rows}, circuits


def _wait_for(
    stack: Stack, timeout: float, done: Callable[[dict[str, dict[str, Any]], list[Any]], bool]
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    rows, circuits = read_relay_demo(stack.database_url)
    while time.monotonic() < deadline and not done(rows, circuits):
        time.sleep(0.25)
        rows, circuits = read_relay_demo(stack.database_url)
    return rows, circuits


def _print_circuits(circuits: list[dict[str, Any]]) -> None:
    headers = ("relay", "state", "consecutive_failures", "last_error_code")
    printed = [
        (c["relay"], c["state"], str(c["consecutive_failures"]), c["last_error_code"] or "-")
        for c in circuits
    ]
    for line in table(headers, printed):
        say(line)


def demonstrate_failover(stack: Stack, timeout: float, stop: Stopper) -> list[str]:
    """The primary relay refuses connections; the fallback takes over and the primary's
    circuit opens; the primary comes back, one trial closes the circuit. Problems found."""
    assert stack.sink is not None
    section("Fallback relay: the primary goes down (connections refused)")
    port = stack.sink.port
    stack.sink.stop()
    publish_samples((*OUTAGE, EXPIRED), "Fallback relay: publishing while the primary is down")
    ids = [str(s.delivery_id) for s in OUTAGE]
    rows, circuits = _wait_for(
        stack, timeout, lambda r, c: all(r.get(i, {}).get("status") == "sent" for i in ids)
    )
    section("Fallback relay: python -m worker relays")
    _print_circuits(circuits)
    opened = circuits[0]["state"]
    # The primary back (its later emails go to relays/ too), and the cool-down over.
    primary = EmlSink(stack.emails_dir / "relays", port=port)
    stop.callback("the primary SMTP server, back", primary.stop)
    primary.start()
    say(
        f"  primary back on port {port};"
        f" waiting out RELAY_COOLDOWN_SECONDS={RELAY_COOLDOWN_SECONDS}"
    )
    _wait_for(stack, timeout, lambda r, c: c[0]["state"] == "half-open")
    publish_samples((TRIAL,), "Fallback relay: one delivery tries the primary again")
    rows, circuits = _wait_for(
        stack,
        timeout,
        lambda r, c: (
            r.get(str(TRIAL.delivery_id), {}).get("status") == "sent" and c[0]["state"] == "closed"
        ),
    )
    section("Fallback relay: the ledger")
    headers = ("delivery_id", "status", "relay", "last_error_code")
    printed = [
        (i, row["status"], row["relay"] or "-", row["last_error_code"] or "-")
        for i, row in sorted(rows.items())
    ]
    for line in table(headers, printed):
        say(line)
    _print_circuits(circuits)
    logged = collections.Counter(
        str(line.get("message")) for line in read_function_log(stack.function_log)
    )
    for message in ("relay failover", "relay circuit opened", "relay circuit closed"):
        say(f"  log: {message!r} x{logged[message]}")

    found: list[str] = []
    outage = [rows.get(i, {}) for i in ids]
    if any((r.get("status"), r.get("relay")) != ("sent", "fallback") for r in outage):
        found.append(f"every code sent during the outage should be sent by the fallback: {outage}")
    if opened != "open":
        found.append(f"the primary's circuit should have opened, it was {opened}")
    trial = rows.get(str(TRIAL.delivery_id), {})
    if (trial.get("status"), trial.get("relay"), circuits[0]["state"]) != (
        "sent",
        "primary",
        "closed",
    ):
        found.append(f"the trial should be sent by the primary and close its circuit: {trial}")
    expired = rows.get(str(EXPIRED.delivery_id), {})
    if (expired.get("status"), expired.get("last_error_code")) != ("skipped", "EXPIRED"):
        found.append(f"{EXPIRED.delivery_id} should be skipped with EXPIRED, is {expired}")
    missing = [
        m
        for m in ("relay failover", "relay circuit opened", "relay circuit closed")
        if not logged[m]
    ]
    if missing:
        found.append(f"the function did not log {missing}")
    return found


# --- main -----------------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path) -> tuple[Path, Path]:
    """Creates `emails/` and `logs/`; removes the last run's outputs (they would only confuse),
    and nothing else."""
    emails, logs = run_dir / "emails", run_dir / "logs"
    for directory in (emails, logs):
        directory.mkdir(parents=True, exist_ok=True)
    stale = [*emails.glob("*.eml"), *emails.glob("*.eml.partial")]
    stale += [
        logs / name
        for name in (
            "function.log",
            "webhook.log",
            "console.log",
            "postgres.log",
            "pubsub-emulator.log",
        )
    ]
    stale += [run_dir / "summary.json", run_dir / "local-stack.env"]
    for path in stale:
        path.unlink(missing_ok=True)
    return emails, logs


def write_summary(stack: Stack, path: Path, payload: dict[str, Any]) -> None:
    data = {
        **payload,
        "run_dir": str(stack.run_dir),
        "ports": stack.ports(),
        "emulator_data_dir": str(stack.emulator_process.data_dir)
        if stack.emulator_process
        else None,
        "postgres_data_dir": str(stack.postgres.data) if stack.postgres else None,
        "function_log": str(stack.function_log),
        "console_url": f"{stack.console.url}/" if stack.console else None,
        "emails": [str(p) for p in stack.sink.saved] if stack.sink else [],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir.resolve()
    emails_dir, logs_dir = prepare_run_dir(run_dir)
    stack = Stack(run_dir=run_dir, emails_dir=emails_dir, logs_dir=logs_dir)
    started = time.monotonic()
    say(f"local stack: everything runs on 127.0.0.1; outputs in {run_dir}/")
    result: dict[str, Any] = {"ok": False}
    stop = Stopper()
    try:
        start_postgres(stack, stop)
        emulator = start_pubsub(stack, stop)
        start_smtp(stack, stop)
        start_function(stack, emulator, stop)
        start_console(stack, stop)
        publish_samples()
        observed, waited = wait_for_outcomes(stack, args.timeout)
        print_ledger(observed)
        print_dead_letters(observed)
        print_emails(stack, observed)
        print_logs(stack, observed)
        found = problems(observed)
        section("Provider webhooks: signed events for the sent deliveries")
        webhooks = demonstrate(
            stack.database_url, observed.rows, stack.logs_dir / "webhook.log", say, stop.callback
        )
        report(webhooks, say, table)
        found += webhooks.problems
        found += check_console(stack)
        if not observed.finished():
            found.insert(0, f"not every delivery finished within {args.timeout:g} s")
        skip_problems, skip_summary = demonstrate_skipping(stack, args.timeout)
        found += skip_problems
        found += demonstrate_failover(stack, args.timeout, stop)
        result = {
            "ok": not found,
            "summary": f"{summary_line(observed)}; {skip_summary}",
            "provider_events": webhooks.summary(),
            "provider_requests": webhooks.requests(),
            "problems": found,
            "wait_seconds": round(waited, 2),
        }
        if found:
            section("What went wrong")
            for problem in found:
                say(f"  {problem}")
        if args.keep_running:
            keep_running(stack)
    except Interrupted as signal_name:
        say()
        say(f"interrupted by {signal_name}")
        if not (args.keep_running and "summary" in result):  # Ctrl-C ends --keep-running
            result.update(ok=False, interrupted=f"interrupted by {signal_name}")
    except Exception as error:
        say()
        say(f"error: {_one_line(error)}")
        result.update(ok=False, error=_one_line(error))
    finally:
        _ignore_signals()
        section("Stopping: console, function, SMTP server, Pub/Sub emulator, PostgreSQL")
        stopping = time.monotonic()
        stop.stop_all()
        say(f"  stopped in {time.monotonic() - stopping:.1f} s")
        write_summary(stack, run_dir / "summary.json", result)
    elapsed = time.monotonic() - started
    if result["ok"]:
        say(f"local stack OK: {result['summary']} ({elapsed:.1f} s)")
        return 0
    found = result.get("problems") or []
    what = (
        result.get("error")
        or result.get("interrupted")
        or (
            f"{len(found)} outcome(s) not as expected"
            + (f": {found[0]}" if len(found) == 1 else " (listed under 'What went wrong')")
        )
    )
    say(f"local stack FAILED: {what}")
    say(f"  logs: {logs_dir}/ (function.log, console.log, postgres.log, pubsub-emulator.log)")
    return 1


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, subprocess.CalledProcessError):
        output = error.stderr or error.stdout or b""
        detail = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        text += ": " + " ".join(detail.split())[-300:]
    return f"{type(error).__name__}: {text}"


def _run_dir(value: str) -> Path:
    return Path(value).expanduser()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bash scripts/local-stack.sh",
        description="Run the email service locally, end to end, with sample deliveries.",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the stack up after the samples until Ctrl-C, and print its env vars",
    )
    parser.add_argument(
        "--run-dir",
        type=_run_dir,
        default=_run_dir(os.environ.get("LOCAL_STACK_DIR") or str(ROOT / "run")),
        help="where emails/, logs/ and summary.json go (default: $LOCAL_STACK_DIR or run/)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help=f"seconds to wait for the outcomes (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _catch_signals()
    try:
        return run(args)
    except Interrupted as signal_name:  # before anything was started, or while reporting
        print(f"interrupted ({signal_name})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
