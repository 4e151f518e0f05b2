"""Reliability: the "one email per delivery_id" promise under duplicates, faults and crashes.

Worker processes are real functions-framework servers (`tests.harness.cluster.WorkerCluster`)
fed by a deliverer that plays Pub/Sub's push contract at least once (redelivering on any
non-2xx, connection error or timeout). PostgreSQL, the Pub/Sub emulator (dead letters) and an
aiosmtpd server (counting what it accepted, by Message-ID) are the real ones.

Each scenario asserts correctness only, never timing, and prints a figures table (visible with
`pytest -s`); the figures also go to `run/reliability.json` for the README:

    .venv/bin/python -m pytest tests/test_reliability.py -s
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from cloudevents.http import CloudEvent
from psycopg.rows import dict_row

from tests import bad_inputs, factories
from tests.harness.cluster import (
    Deliverer,
    DeliveryReport,
    WorkerCluster,
    push_message,
    worker_env,
)
from tests.harness.function import ROOT
from tests.harness.postgres import PostgresServer
from tests.harness.pubsub import PubSubNamespace
from tests.harness.smtp import SmtpTestServer, Stage
from tests.harness.worker import MakeWorker
from worker.delivery.config import RetrySettings
from worker.delivery.pipeline import RetryLater, Worker, handle
from worker.delivery.smtp import message_id_for
from worker.store.ledger import Ledger

MESSAGE_ID_DOMAIN = "example.com"
FIGURES_PATH = ROOT / "run" / "reliability.json"
WORKFLOWS = tuple(factories.DATA)
FINISHED = ("sent", "failed", "dead_letter")


# --- figures ------------------------------------------------------------------------------------


def report_figures(
    scenario: str, events: int, emails: int, duplicates: int, seconds: float, **details: Any
) -> None:
    """Print one row (events, emails, duplicates, seconds) plus details; merge into the JSON."""
    header = f"{'scenario':<26} {'events':>7} {'emails':>7} {'duplicates':>10} {'seconds':>8}"
    print(f"\n{header}\n{scenario:<26} {events:>7} {emails:>7} {duplicates:>10} {seconds:>8.1f}")
    for key, value in details.items():
        print(f"  {key}: {value}")
    FIGURES_PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        existing = json.loads(FIGURES_PATH.read_text())
    except (OSError, ValueError):
        existing = {}
    existing[scenario] = {
        "events": events,
        "emails": emails,
        "duplicates": duplicates,
        "seconds": round(seconds, 1),
        **details,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    FIGURES_PATH.write_text(json.dumps(existing, indent=2, sort_keys=True, default=str) + "\n")


# --- the workload and what became of it ---------------------------------------------------------


def workload(
    count: int,
    prefix: str,
    *,
    recipient: Callable[[int], str] | None = None,
) -> list[dict[str, Any]]:
    """`count` valid events cycling through the workflows, ids `<prefix>-NNNNN`."""
    return [
        factories.payload(
            WORKFLOWS[k % len(WORKFLOWS)],
            delivery_id=f"{prefix}-{k:05d}",
            recipient=recipient(k) if recipient else f"user{k}@example.com",
            metadata={"n": k},
        )
        for k in range(count)
    ]


def expected_message_id(delivery_id: str) -> str:
    return message_id_for(delivery_id, MESSAGE_ID_DOMAIN)


@dataclass
class Outcome:
    """The ledger and the SMTP server's view after a run."""

    rows: dict[str, dict[str, Any]]
    history: dict[str, list[dict[str, Any]]]
    emails: Counter[str]  # Message-ID -> how many the SMTP server accepted

    def emails_for(self, delivery_id: str) -> int:
        return self.emails[expected_message_id(delivery_id)]

    def duplicated(self) -> dict[str, int]:
        """Delivery ids with more than one email, and how many each got."""
        by_message_id = {expected_message_id(d): d for d in self.rows}
        return {by_message_id.get(m, m): n for m, n in self.emails.items() if n > 1}

    def lease_takeovers(self, delivery_id: str) -> int:
        return sum(
            1
            for event in self.history.get(delivery_id, [])
            if event["status"] == "in_progress"
            and event["payload"].get("reason") == "lease_expired"
        )

    def statuses(self) -> Counter[str]:
        return Counter(row["status"] for row in self.rows.values())


def read_outcome(database_url: str, smtp: SmtpTestServer) -> Outcome:
    # A fresh connection: pooled ones may predate a server restart.
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM email.deliveries").fetchall()
        events = conn.execute(
            "SELECT delivery_id, status::text AS status, attempt, error_code, payload"
            " FROM email.delivery_events WHERE NOT payload ? 'attempt_failed' ORDER BY id"
        ).fetchall()
    history: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        history.setdefault(event["delivery_id"], []).append(event)
    emails = Counter(str(m.message["Message-ID"]) for m in smtp.messages)
    return Outcome({str(r["delivery_id"]): r for r in rows}, history, emails)


def check_ledger_is_sane(outcome: Outcome, max_attempts: int) -> list[str]:
    """Every row finished, its attempts in range, its audit trail ending in its status."""
    problems = []
    for delivery_id, row in outcome.rows.items():
        trail = [event["status"] for event in outcome.history.get(delivery_id, [])]
        if row["status"] not in FINISHED:
            problems.append(f"{delivery_id}: left {row['status']}")
        if not 1 <= row["attempts"] <= max_attempts:
            problems.append(f"{delivery_id}: attempts {row['attempts']}")
        if not trail or trail[-1] != row["status"] or trail[0] != "in_progress":
            problems.append(f"{delivery_id}: trail {trail} for status {row['status']}")
        claims = trail.count("in_progress")
        if claims > row["attempts"]:
            problems.append(f"{delivery_id}: {claims} claims but attempts {row['attempts']}")
        if row["status"] == "sent" and row["provider_message_id"] != expected_message_id(
            delivery_id
        ):
            problems.append(f"{delivery_id}: provider_message_id {row['provider_message_id']}")
    return problems


def pull_dead_letters(
    pubsub: PubSubNamespace, *, expected: int, at_most: int | None = None
) -> list[Any]:
    """Every dead letter (up to `at_most`); waits long enough for `expected` of them, briefly
    when none."""
    timeout = 20.0 if expected else 2.0
    limit = max(at_most or 0, expected + 100)
    return pubsub.emulator.pull(
        pubsub.dead_letter_subscription, max_messages=limit, timeout=timeout, quiet=2.0
    )


@contextlib.contextmanager
def running(cluster: WorkerCluster) -> Iterator[WorkerCluster]:
    """Start the cluster; on failure show the tail of its logs; always stop it."""
    cluster.start()
    try:
        yield cluster
    except BaseException:
        print("---- worker logs (tail) ----\n" + cluster.logs()[-6000:])
        raise
    finally:
        cluster.stop()


def cluster_env(
    database_url: str, smtp: SmtpTestServer, pubsub: PubSubNamespace, **extra: str
) -> dict[str, str]:
    return worker_env(
        database_url=database_url,
        smtp_port=smtp.port,
        project=pubsub.project,
        delivery_topic=pubsub.delivery_topic,
        dead_letter_topic=pubsub.dead_letter_topic,
        emulator_host=pubsub.emulator.host,
        MESSAGE_ID_DOMAIN=MESSAGE_ID_DOMAIN,
        **extra,
    )


# Requests each worker process serves at once, as deployed (deploy/config.sh CONCURRENCY):
# the storm and the faults run in that shape, with CONCURRENCY and THREADS set and the pools
# sized from them.
WORKER_CONCURRENCY = 8


def assert_several_requests_at_once(report: DeliveryReport, *, servers: int) -> None:
    """Every worker process really had several requests in flight at once (counted by the
    deliverer: POSTs sent to it and not answered yet), so the scenario tested the worker
    under concurrency, not one request after another."""
    peaks = report.peak_in_flight
    assert sorted(peaks) == list(range(servers)), peaks
    assert min(peaks.values()) >= WORKER_CONCURRENCY // 2, peaks


def deliverer_for(cluster: WorkerCluster, pubsub: PubSubNamespace, **options: Any) -> Deliverer:
    return Deliverer(cluster.urls, project=pubsub.project, topic=pubsub.delivery_topic, **options)


# --- the deliverer speaks the emulator's push dialect -------------------------------------------


def test_deliverer_pushes_what_the_emulator_pushes(pubsub: PubSubNamespace) -> None:
    """The body `PushMessage.push_body` builds has the keys the emulator's push has."""
    captured: list[tuple[str, bytes]] = []

    class Capture(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            captured.append((self.path, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        path = f"/projects/{pubsub.project}/topics/{pubsub.delivery_topic}"
        pubsub.emulator.create_push_subscription(
            pubsub.delivery_topic,
            f"capture-{pubsub.delivery_topic}",
            f"http://127.0.0.1:{server.server_port}{path}",
        )
        pubsub.emulator.publish(pubsub.delivery_topic, b'{"x": 1}', k="v")
        deadline = time.monotonic() + 30
        while not captured and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()
    assert captured, "the emulator pushed nothing"
    emulator_path, emulator_body = captured[0]
    pushed = json.loads(emulator_body)
    ours = json.loads(
        push_message(b'{"x": 1}', attributes={"k": "v"}).push_body(pushed["subscription"])
    )
    assert emulator_path == path
    assert set(ours) == set(pushed)
    assert set(ours["message"]) == set(pushed["message"])
    assert ours["message"]["data"] == pushed["message"]["data"]
    assert ours["message"]["attributes"] == pushed["message"]["attributes"]


# --- 1. duplicate storm ---------------------------------------------------------------------------


@pytest.mark.slow
def test_duplicate_storm_sends_each_delivery_exactly_once(
    database_url: str, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> None:
    """~2000 events, each pushed 3 times at once to 3 different worker processes."""
    bodies = workload(2000, "storm")
    messages = [push_message(body) for body in bodies]
    env = cluster_env(database_url, smtp_server, pubsub, LEASE_SECONDS="30", MAX_ATTEMPTS="5")
    with running(WorkerCluster(3, env, concurrency=WORKER_CONCURRENCY)) as cluster:
        deliverer = deliverer_for(cluster, pubsub, seed=1, max_backoff=0.5)
        report = deliverer.deliver_all(messages, copies=3, concurrency=24)
    outcome = read_outcome(database_url, smtp_server)
    duplicates = outcome.duplicated()
    report_figures(
        "duplicate_storm",
        events=len(bodies),
        emails=sum(outcome.emails.values()),
        duplicates=sum(n - 1 for n in duplicates.values()),
        seconds=report.seconds,
        workers=3,
        copies=3,
        deliverer=report.as_dict(),
    )

    assert (report.acked, report.gave_up) == (3 * len(bodies), 0), report.summary()
    assert_several_requests_at_once(report, servers=3)
    assert duplicates == {}
    assert set(outcome.rows) == {b["delivery_id"] for b in bodies}
    for body in bodies:
        assert outcome.emails_for(body["delivery_id"]) == 1, body["delivery_id"]
    assert sum(outcome.emails.values()) == len(bodies)  # nothing else went out
    assert outcome.statuses() == Counter({"sent": len(bodies)})
    assert check_ledger_is_sane(outcome, max_attempts=1) == []
    assert all(
        [e["status"] for e in outcome.history[d]] == ["in_progress", "sent"] for d in outcome.rows
    )
    assert pull_dead_letters(pubsub, expected=0) == []


# --- 2. SMTP faults ------------------------------------------------------------------------------


@pytest.fixture
def faulty_smtp(smtp_server: SmtpTestServer) -> SmtpTestServer:
    """The harness server; this scenario uses every cue it has, `accept_then_drop_next` too."""
    return smtp_server


@dataclass
class FaultInjector:
    """Keeps a fault or two cued on the SMTP server while events flow (seeded, bounded)."""

    server: SmtpTestServer
    seed: int
    slow_reply_seconds: float
    max_slow_windows: int = 4
    injected: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    KINDS: tuple[tuple[str, int], ...] = (
        ("421 at RCPT", 3),
        ("421 at DATA", 3),
        ("451 at DATA", 4),
        ("554 at DATA", 1),
        ("drop after DATA, not accepted", 3),
        ("drop after DATA, accepted", 3),
        ("slow reply (timeout)", 1),
    )

    def start(self) -> FaultInjector:
        self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.server.delay(0.0)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        kinds = [kind for kind, _ in self.KINDS]
        weights = [weight for _, weight in self.KINDS]
        while not self._stop.wait(0.02):
            if self.server.pending_cues() >= 2:
                continue
            kind = rng.choices(kinds, weights)[0]
            if kind == "slow reply (timeout)":
                if self.injected[kind] >= self.max_slow_windows:
                    continue
                self.server.delay(self.slow_reply_seconds)
                self._stop.wait(0.15)
                self.server.delay(0.0)
            elif kind == "drop after DATA, not accepted":
                self.server.drop_next(1)
            elif kind == "drop after DATA, accepted":
                self.server.accept_then_drop_next(1)
            else:
                code, _, stage = kind.split()
                text = {"421": "4.7.0 busy", "451": "4.3.0 try later", "554": "5.7.1 refused"}
                at: Stage = "rcpt" if stage == "RCPT" else "data"
                self.server.fail_next(1, int(code), text[code], at=at)
            self.injected[kind] += 1


@pytest.mark.slow
def test_smtp_faults_end_sent_or_dead_lettered(
    database_url: str, faulty_smtp: SmtpTestServer, pubsub: PubSubNamespace
) -> None:
    """421/451/554 replies, slow replies past the client timeout and connections closed after
    DATA, cued while events flow through 3 worker processes, each event pushed twice.

    Every event ends `sent`, `dead_letter` (retries exhausted) or `failed` (5xx), each of the
    last two with exactly one dead letter carrying the original bytes. A duplicate email is
    allowed only for a delivery whose relay accepted a message and then dropped the connection
    before replying (`drop after DATA, accepted`): the client saw a failure and resent.
    """
    max_attempts = 4
    bodies = workload(600, "faults")
    doomed = workload(8, "doomed", recipient=lambda k: f"doomed{k}@example.com")
    gone = workload(8, "gone", recipient=lambda k: f"gone{k}@example.com")
    for body in doomed:
        faulty_smtp.fail_recipient(body["recipient"], 451, "4.2.0 mailbox busy")
    for body in gone:
        faulty_smtp.fail_recipient(body["recipient"], 550, "5.1.1 no such user")
    everything = [*bodies, *doomed, *gone]
    random.Random(7).shuffle(everything)
    originals = {b["delivery_id"]: factories.encode(b) for b in everything}
    env = cluster_env(
        database_url,
        faulty_smtp,
        pubsub,
        MAX_ATTEMPTS=str(max_attempts),
        SEND_TRIES_PER_INVOCATION="2",
        SMTP_TIMEOUT_SECONDS="3",
        LEASE_SECONDS="60",
    )
    with running(WorkerCluster(3, env, concurrency=WORKER_CONCURRENCY)) as cluster:
        injector = FaultInjector(faulty_smtp, seed=11, slow_reply_seconds=5.0).start()
        try:
            deliverer = deliverer_for(cluster, pubsub, seed=2, max_backoff=0.5)
            report = deliverer.deliver_all(
                [push_message(b) for b in everything], copies=2, concurrency=16
            )
        finally:
            injector.stop()
    outcome = read_outcome(database_url, faulty_smtp)
    # How many random faults exhaust a delivery's attempts depends on the machine's speed:
    # pull every letter there can be, not only the doomed and gone ones.
    letters = pull_dead_letters(pubsub, expected=len(doomed) + len(gone), at_most=len(everything))
    duplicates = outcome.duplicated()
    ambiguous = set(faulty_smtp.ambiguous)
    statuses = outcome.statuses()
    report_figures(
        "smtp_faults",
        events=len(everything),
        emails=sum(outcome.emails.values()),
        duplicates=sum(n - 1 for n in duplicates.values()),
        seconds=report.seconds,
        statuses=dict(statuses),
        faults_injected=dict(injector.injected),
        accepted_then_dropped=len(ambiguous),
        dead_letters=len(letters),
        deliverer=report.as_dict(),
    )

    assert report.gave_up == 0, report.summary()
    assert_several_requests_at_once(report, servers=3)
    assert set(outcome.rows) == set(originals)
    assert check_ledger_is_sane(outcome, max_attempts) == []
    # A random cue at RCPT may answer before the recipient's own reply does.
    for body in doomed:
        row = outcome.rows[body["delivery_id"]]
        assert (row["status"], row["attempts"]) == ("dead_letter", max_attempts), row
        assert str(row["last_error_code"]).startswith("SMTP_4"), row
    for body in gone:
        row = outcome.rows[body["delivery_id"]]
        assert (row["status"], row["last_error_code"]) == ("failed", "SMTP_550") or (
            row["status"] == "dead_letter"
        ), row

    # Exactly one dead letter per row that was not sent, with the original bytes.
    by_id = Counter(m.message.attributes["delivery_id"] for m in letters)
    unsent = {d for d, row in outcome.rows.items() if row["status"] != "sent"}
    assert set(by_id) == unsent and all(n == 1 for n in by_id.values()), by_id
    for letter in letters:
        attributes = letter.message.attributes
        row = outcome.rows[attributes["delivery_id"]]
        assert letter.message.data == originals[attributes["delivery_id"]]
        reason = {"dead_letter": "retries_exhausted", "failed": "permanent_failure"}
        assert attributes["reason"] == reason[row["status"]]
        assert attributes["error_code"] == row["last_error_code"]

    # Nothing lost: sent means an email arrived; unsent means none did, unless accepted
    # and dropped. Duplicates only in that window.
    for delivery_id, row in outcome.rows.items():
        count = outcome.emails_for(delivery_id)
        if row["status"] == "sent":
            assert count >= 1, f"{delivery_id} is sent but no email arrived"
        elif expected_message_id(delivery_id) not in ambiguous:
            assert count == 0, f"{delivery_id} is {row['status']} but {count} emails arrived"
    unexplained = {d for d in duplicates if expected_message_id(d) not in ambiguous}
    assert unexplained == set(), {d: duplicates[d] for d in unexplained}
    assert set(outcome.emails) <= {expected_message_id(d) for d in originals}


# --- 3. PostgreSQL restarted mid-run -------------------------------------------------------------


@pytest.mark.slow
def test_postgres_restart_mid_run_loses_and_doubles_nothing(
    database_url: str,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
    pg_server: PostgresServer | None,
) -> None:
    """The session's PostgreSQL is stopped (fast shutdown: sessions killed mid-statement) while
    events flow, kept down a few seconds, and started again on the same port."""
    assert pg_server is not None, "restarting needs the suite's own server: unset DATABASE_URL"
    server = pg_server
    bodies = workload(900, "pgrestart")
    env = cluster_env(
        database_url,
        smtp_server,
        pubsub,
        LEASE_SECONDS="20",
        DB_TIMEOUT_SECONDS="5",
        SMTP_TIMEOUT_SECONDS="5",
    )
    down_seconds = 3.0
    restart: dict[str, float] = {}

    def restart_postgres_midway(stop: threading.Event) -> None:
        deadline = time.monotonic() + 60
        while len(smtp_server.messages) < len(bodies) // 3 and time.monotonic() < deadline:
            if stop.wait(0.05):
                return
        restart["at_emails"] = len(smtp_server.messages)
        began = time.monotonic()
        server.stop()
        try:
            time.sleep(down_seconds)
        finally:
            server.start()
        restart["outage_seconds"] = round(time.monotonic() - began, 2)

    with running(WorkerCluster(3, env, concurrency=WORKER_CONCURRENCY)) as cluster:
        stop = threading.Event()
        restarter = threading.Thread(target=restart_postgres_midway, args=(stop,), daemon=True)
        restarter.start()
        try:
            deliverer = deliverer_for(cluster, pubsub, seed=3, max_backoff=1.0)
            report = deliverer.deliver_all(
                [push_message(b) for b in bodies], copies=2, concurrency=16, rate=60
            )
        finally:
            stop.set()
            restarter.join(timeout=180)
            ensure_running(server)
    outcome = read_outcome(database_url, smtp_server)
    duplicates = outcome.duplicated()
    report_figures(
        "postgres_restart",
        events=len(bodies),
        emails=sum(outcome.emails.values()),
        duplicates=sum(n - 1 for n in duplicates.values()),
        seconds=report.seconds,
        restarted_after_emails=restart.get("at_emails"),
        outage_seconds=restart.get("outage_seconds"),
        deliverer=report.as_dict(),
    )

    assert "outage_seconds" in restart, "the restart did not happen during the run"
    assert report.gave_up == 0, report.summary()
    assert outcome.statuses() == Counter({"sent": len(bodies)})
    assert duplicates == {}
    for body in bodies:
        assert outcome.emails_for(body["delivery_id"]) == 1, body["delivery_id"]
    assert check_ledger_is_sane(outcome, max_attempts=5) == []
    assert pull_dead_letters(pubsub, expected=0) == []


def ensure_running(server: PostgresServer) -> None:
    """Never leave the session without its server: start it if it does not answer."""
    try:
        psycopg.connect(server.admin_url, connect_timeout=5).close()
    except psycopg.OperationalError:
        server.start()


# --- 4. worker processes killed: the unavoidable window ------------------------------------------


@pytest.mark.slow
def test_killed_workers_lose_nothing_and_duplicates_are_counted(
    database_url: str, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> None:
    """Worker processes are SIGKILLed at random while events flow, and restarted.

    Nothing may be lost: a killed invocation never answered, so Pub/Sub (the deliverer)
    redelivers it. Duplicates are possible, and this test measures how many: a worker sends
    only under a claim, but if the relay has accepted the message (250 after DATA) and the
    process dies before `set_sent_if_claimed` is durable, the ledger still says `in_progress`.
    The redelivered copies find a live lease and are asked to come back later (never
    dropped); once the lease expires (`LEASE_SECONDS` after the claim, here 5 s) the next copy
    takes the claim over (`status_reason = lease_expired`) and sends again. The lease thus
    bounds when the copy is retried, never whether: an email can go out twice, but never zero
    times. No SMTP relay lets a client make "accept" and "record" one atomic step; the
    Message-ID is stable per delivery id, so a receiving system can still collapse the pair.

    Every duplicate must therefore come with a lease takeover in its audit trail.
    """
    lease_seconds = 5
    max_attempts = 10
    bodies = workload(1200, "kill")
    env = cluster_env(
        database_url,
        smtp_server,
        pubsub,
        LEASE_SECONDS=str(lease_seconds),
        SMTP_TIMEOUT_SECONDS="1",  # one attempt must fit in the short lease (settings check)
        MAX_ATTEMPTS=str(max_attempts),
    )
    rng = random.Random(5)
    kills: list[int] = []
    killer_errors: list[BaseException] = []

    def kill_at_random(cluster: WorkerCluster, stop: threading.Event) -> None:
        try:
            while len(kills) < 12 and not stop.wait(rng.uniform(1.0, 2.5)):
                victim = rng.randrange(len(cluster))
                cluster.kill(victim)  # mid-request, most likely
                kills.append(victim)
                stop.wait(rng.uniform(0.1, 0.5))
                cluster.restart(victim)
        except BaseException as error:  # reported by the test, not lost in a thread
            killer_errors.append(error)

    with running(WorkerCluster(3, env, concurrency=WORKER_CONCURRENCY)) as cluster:
        stop = threading.Event()
        killer = threading.Thread(target=kill_at_random, args=(cluster, stop), daemon=True)
        killer.start()
        try:
            deliverer = deliverer_for(cluster, pubsub, seed=4, max_backoff=1.0)
            report = deliverer.deliver_all(
                [push_message(b) for b in bodies], copies=2, concurrency=16, rate=50
            )
        finally:
            stop.set()
            killer.join(timeout=120)
    outcome = read_outcome(database_url, smtp_server)
    duplicates = outcome.duplicated()
    takeovers = {d: n for d in outcome.rows if (n := outcome.lease_takeovers(d))}
    duplicate_emails = sum(n - 1 for n in duplicates.values())
    report_figures(
        "worker_kills",
        events=len(bodies),
        emails=sum(outcome.emails.values()),
        duplicates=duplicate_emails,
        seconds=report.seconds,
        kills=len(kills),
        lease_seconds=lease_seconds,
        lease_takeovers=sum(takeovers.values()),
        duplicate_rate=f"{duplicate_emails} of {len(bodies)} "
        f"({100 * duplicate_emails / len(bodies):.2f}%)",
        deliverer=report.as_dict(),
    )

    assert killer_errors == []
    assert kills, "no worker was killed"
    assert report.gave_up == 0, report.summary()
    assert outcome.statuses() == Counter({"sent": len(bodies)})
    for body in bodies:  # none lost
        assert outcome.emails_for(body["delivery_id"]) >= 1, body["delivery_id"]
    assert check_ledger_is_sane(outcome, max_attempts) == []
    assert set(duplicates) <= set(takeovers), "a duplicate without a lease takeover"
    assert set(outcome.emails) <= {expected_message_id(b["delivery_id"]) for b in bodies}


def test_a_worker_never_sends_after_its_lease_expired(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    """In-invocation SMTP retries must stop when the claim's lease runs out.

    Worker A claims and gets a 451; its next try (after a backoff of at least 1.5 s) would start
    after its lease (1 s) ran out, when a redelivered copy on worker B may have taken the claim
    over and sent. So A must hand the claim back instead of retrying, and only B sends.
    Scaled up this is LEASE_SECONDS=30 with SMTP_TIMEOUT_SECONDS=10 and three tries: without
    the lease bound, up to ~84 s of sending.
    """
    slow = RetrySettings(
        max_attempts=5,
        tries_per_invocation=3,
        initial_backoff_seconds=3.0,  # every wait is 1.5 s fixed + up to 1.5 s random
        max_backoff_seconds=3.0,
        lease_seconds=1,
    )
    first, second = make_worker(slow), make_worker(FAST_RETRY)
    body = factories.payload()
    smtp_server.fail_next(1, 451, "4.3.0 try again later")

    def run_first() -> None:
        with contextlib.suppress(RetryLater):  # giving up on a lost lease is a fine answer
            handle(factories.cloud_event(body), first)

    thread = threading.Thread(target=run_first)
    thread.start()
    time.sleep(1.1)  # the lease has expired; the first worker is still in its backoff
    handle(factories.cloud_event(body), second)  # the redelivery takes over and sends
    thread.join(timeout=30)
    trail = [
        (e.status.value, e.payload.get("reason"))
        for e in ledger.events(body["delivery_id"])
        if not e.attempt_failed
    ]
    # A did not retry past its lease: it handed the claim back after its one attempt.
    assert trail[:2] == [("in_progress", None), ("retrying", "transient_failure")], trail
    assert len(smtp_server.messages) == 1, f"{len(smtp_server.messages)} emails; {trail}"


# --- 5. bad input ---------------------------------------------------------------------------------

CORPUS = bad_inputs.corpus()
SENTINELS = workload(3, "sentinel")


FAST_RETRY = RetrySettings(
    max_attempts=3,
    tries_per_invocation=1,
    initial_backoff_seconds=0.01,
    max_backoff_seconds=0.02,
    lease_seconds=30,
)


@pytest.fixture
def worker(make_worker: MakeWorker, smtp_server: SmtpTestServer) -> Worker:
    return make_worker(FAST_RETRY, smtp=smtp_server.settings(message_id_domain=MESSAGE_ID_DOMAIN))


def corpus_message_id(index: int) -> str:
    return f"corpus-{index:03d}"


def check_corpus_outcome(
    sent: Sequence[tuple[str, bad_inputs.Case]],
    database_url: str,
    smtp: SmtpTestServer,
    pubsub: PubSubNamespace,
) -> list[str]:
    """For each (message id, case) that was sent: a rejected case is dead-lettered once with
    its bytes and a reason naming its field, with a `failed` row when its id is readable; an
    accepted one is sent once and stored verbatim. No other row exists, the sentinel rows
    are untouched, and `count(*)` still works."""
    problems: list[str] = []
    cases = [case for _, case in sent]
    rejected = [case for case in cases if not case.accepted]
    letters = pull_dead_letters(pubsub, expected=len(rejected))
    by_source = {m.message.attributes.get("source_message_id"): m.message for m in letters}
    if len(letters) != len(rejected):
        problems.append(f"{len(letters)} dead letters for {len(rejected)} rejected cases")
    outcome = read_outcome(database_url, smtp)
    for message_id, case in sent:
        letter = by_source.get(message_id)
        if case.accepted:
            row = outcome.rows.get(case.delivery_id or "")
            if letter is not None:
                problems.append(f"{case.name}: dead-lettered: {letter.attributes['error_message']}")
            if row is None or row["status"] != "sent":
                problems.append(f"{case.name}: row {row and row['status']}, expected sent")
            elif (row["recipient"], row["metadata"]) != (case.recipient, case.metadata):
                problems.append(f"{case.name}: stored {row['recipient']!r} {row['metadata']!r}")
            if outcome.emails_for(case.delivery_id or "") != 1:
                problems.append(f"{case.name}: {outcome.emails_for(case.delivery_id or '')} emails")
            continue
        if letter is None:
            problems.append(f"{case.name}: no dead letter")
            continue
        attributes = dict(letter.attributes)
        message = attributes.get("error_message", "")
        if not message.startswith(f"{case.field}: "):
            problems.append(f"{case.name}: error_message {message!r} should name {case.field}")
        if (attributes.get("reason"), attributes.get("error_code")) != (
            "invalid_event",
            "INVALID_EVENT",
        ):
            problems.append(f"{case.name}: attributes {attributes}")
        if attributes.get("delivery_id") != case.delivery_id:
            problems.append(f"{case.name}: delivery_id attribute {attributes.get('delivery_id')}")
        if letter.data != case.dead_letter_data:
            problems.append(f"{case.name}: dead letter data is not the original bytes")
        if case.delivery_id is not None:
            row = outcome.rows.get(case.delivery_id)
            if row is None:
                problems.append(f"{case.name}: no ledger row")
            elif (row["status"], row["last_error_code"]) != ("failed", "INVALID_EVENT") or not (
                row["last_error_message"] or ""
            ).startswith(f"{case.field}: "):
                problems.append(
                    f"{case.name}: row {row['status']} {row['last_error_code']} "
                    f"{row['last_error_message']!r}"
                )
    expected_ids = {c.delivery_id for c in cases if c.delivery_id} | {
        b["delivery_id"] for b in SENTINELS
    }
    if set(outcome.rows) != expected_ids:
        problems.append(
            f"unexpected rows {sorted(set(outcome.rows) - expected_ids)[:5]}, "
            f"missing {sorted(expected_ids - set(outcome.rows))[:5]}"
        )
    for body in SENTINELS:
        row = outcome.rows.get(body["delivery_id"])
        if row is None or row["status"] != "sent" or row["metadata"] != body["metadata"]:
            problems.append(f"sentinel {body['delivery_id']} changed: {row}")
    with psycopg.connect(database_url, autocommit=True) as conn:
        counted = conn.execute("SELECT count(*) FROM email.deliveries").fetchone()
        audited = conn.execute("SELECT count(DISTINCT delivery_id) FROM email.delivery_events")
        audit_count = audited.fetchone()
    if counted != (len(expected_ids),) or audit_count != (len(expected_ids),):
        problems.append(f"count(*) {counted}, audited {audit_count}, expected {len(expected_ids)}")
    expected_emails = sum(1 for c in cases if c.accepted) + len(SENTINELS)
    if sum(outcome.emails.values()) != expected_emails:
        problems.append(f"{sum(outcome.emails.values())} emails, expected {expected_emails}")
    return problems


def test_bad_input_corpus_is_rejected_in_process(
    worker: Worker,
    database_url: str,
    smtp_server: SmtpTestServer,
    pubsub: PubSubNamespace,
) -> None:
    """Hostile and malformed events through `worker.delivery.pipeline.handle` itself."""
    started = time.monotonic()
    for body in SENTINELS:
        handle(factories.cloud_event(body), worker)
    raised: list[str] = []
    for index, case in enumerate(CORPUS):
        message_id = corpus_message_id(index)
        event = CloudEvent(
            {
                "type": "google.cloud.pubsub.topic.v1.messagePublished",
                "source": f"//pubsub.googleapis.com/projects/test-project/topics/{index}",
                "id": message_id,
            },
            case.event_data(message_id),
        )
        try:
            handle(event, worker)
        except Exception as error:  # the assertion below reports them all
            raised.append(f"{case.name}: {type(error).__name__}: {error}")
    sent = [(corpus_message_id(i), case) for i, case in enumerate(CORPUS)]
    problems = check_corpus_outcome(sent, database_url, smtp_server, pubsub)
    rejected = sum(1 for c in CORPUS if not c.accepted)
    report_figures(
        "bad_input_in_process",
        events=len(CORPUS),
        emails=sum(1 for c in CORPUS if c.accepted),
        duplicates=0,
        seconds=time.monotonic() - started,
        rejected=rejected,
        accepted_odd_but_legal=len(CORPUS) - rejected,
        problems=len(problems) + len(raised),
    )
    assert raised == []
    assert problems == [], "\n".join(problems)


def test_bad_input_corpus_is_acked_through_a_worker_process(
    database_url: str, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> None:
    """The same corpus as Pub/Sub pushes to a functions-framework process: every bad message
    is acknowledged at once (a 2xx: never a redelivery loop) and dead-lettered."""
    sent = [(corpus_message_id(i), case) for i, case in enumerate(CORPUS) if case.over_http]
    cases = [case for _, case in sent]
    started = time.monotonic()
    statuses: dict[str, str] = {}
    env = cluster_env(database_url, smtp_server, pubsub)
    with running(WorkerCluster(1, env, threads=4)) as cluster:
        deliverer = deliverer_for(cluster, pubsub)
        for body in SENTINELS:
            assert deliverer.deliver(push_message(body)).acked
        for message_id, case in sent:
            push = case.event_data(message_id, subscription=deliverer.subscription)
            statuses[case.name] = deliverer.post_body(json.dumps(push).encode(), 0)
        deliverer.close()
    not_acked = {name: status for name, status in statuses.items() if not status.startswith("2")}
    problems = check_corpus_outcome(sent, database_url, smtp_server, pubsub)
    report_figures(
        "bad_input_over_http",
        events=len(cases),
        emails=sum(1 for c in cases if c.accepted),
        duplicates=0,
        seconds=time.monotonic() - started,
        not_acked=len(not_acked),
        problems=len(problems),
    )
    assert not_acked == {}
    assert problems == [], "\n".join(problems)
