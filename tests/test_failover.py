"""The fallback relay: which SMTP failures hand a message to the other relay within the same
invocation, and which never do. Two real aiosmtpd relays scripted to fail in one phase each,
the real ledger; every email is counted where it arrived, and every connection too."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from tests import factories
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import FAST_RETRY, MakeWorker
from worker.delivery.config import BreakerSettings, RetrySettings, SmtpSettings
from worker.delivery.pipeline import RetryLater, Worker, handle
from worker.delivery.relay import SmtpProvider
from worker.delivery.smtp import OutgoingEmail, SmtpError, SmtpSender
from worker.store.ledger import Ledger, Status, StatusChange
from worker.store.relays import Circuits, CircuitState, Relay


class GreetingServer:
    """A relay that answers every connection with one greeting line and hangs up (`421 busy`),
    counting the connections."""

    def __init__(self, greeting: str, delay: float = 0.0) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._delay = delay
        self.port: int = self._socket.getsockname()[1]
        self.connections = 0
        self._greeting = greeting.encode("ascii") + b"\r\n"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._socket.accept()
            except OSError:
                return
            self.connections += 1
            with client:
                threading.Event().wait(self._delay)  # a slow relay
                client.sendall(self._greeting)

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def greeting_server() -> Iterator[Callable[..., GreetingServer]]:
    servers: list[GreetingServer] = []

    def make(greeting: str, delay: float = 0.0) -> GreetingServer:
        servers.append(GreetingServer(greeting, delay))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens on it: connections are refused


@pytest.fixture
def fallback_server(make_smtp_server: Callable[..., SmtpTestServer]) -> SmtpTestServer:
    return make_smtp_server()


@pytest.fixture
def two_relays(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, fallback_server: SmtpTestServer
) -> Callable[..., Worker]:
    """A worker whose primary is `primary` (default: the harness server) and whose fallback
    is `fallback_server`."""
    senders: list[SmtpSender] = []

    def make(
        primary: SmtpSettings | None = None,
        *,
        fallback: SmtpSettings | None = None,
        breaker: BreakerSettings | None = None,
        retry: RetrySettings = FAST_RETRY,
        **changes: Any,
    ) -> Worker:
        worker = make_worker(retry, smtp=primary or smtp_server.settings(), **changes)
        sender = SmtpSender(fallback or fallback_server.settings())
        senders.append(sender)
        settings = replace(worker.settings, fallback=sender.settings)
        if breaker is not None:
            settings = replace(settings, breaker=breaker)
        return replace(worker, settings=settings, fallback=sender)

    return make


def attempt_rows(ledger: Ledger, delivery_id: str) -> list[StatusChange]:
    return [e for e in ledger.events(delivery_id) if e.payload.get("attempt_failed")]


def sent_by(server: SmtpTestServer, delivery_id: str) -> int:
    return sum(delivery_id in str(m.message["Message-ID"]) for m in server.messages)


# --- fail over: the relay does not have the message ------------------------------------------


def primary_refusing(smtp_server: SmtpTestServer, **_: Any) -> SmtpSettings:
    return replace(smtp_server.settings(), port=closed_port())


def primary_greeting_421(
    smtp_server: SmtpTestServer, greeting_server: Callable[..., GreetingServer], **_: Any
) -> SmtpSettings:
    return replace(smtp_server.settings(), port=greeting_server("421 4.3.2 busy, try later").port)


def primary_auth_535(make_smtp_server: Callable[..., SmtpTestServer], **_: Any) -> SmtpSettings:
    server = make_smtp_server(username="relay-user", password="right")
    return server.settings(password="wrong")


def cue(stage: str, code: int) -> Callable[..., SmtpSettings]:
    def primary(smtp_server: SmtpTestServer, **_: Any) -> SmtpSettings:
        smtp_server.fail_next(1, code, "scripted failure", at=stage)  # type: ignore[arg-type]
        return smtp_server.settings()

    primary.__name__ = f"{code}_to_{stage}"
    return primary


FAIL_OVER: dict[str, tuple[Callable[..., SmtpSettings], str]] = {
    "refused": (primary_refusing, "CONN_REFUSED"),
    "421_greeting": (primary_greeting_421, "SMTP_421"),
    "535_auth": (primary_auth_535, "SMTP_535"),
    "451_mail": (cue("mail", 451), "SMTP_451"),
    "550_mail": (cue("mail", 550), "SMTP_550"),
    "452_rcpt": (cue("rcpt", 452), "SMTP_452"),
    "451_end_of_data": (cue("data", 451), "SMTP_451"),
}


@pytest.mark.parametrize("fault", sorted(FAIL_OVER))
def test_a_relay_without_the_message_fails_over_at_once(
    fault: str,
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    fallback_server: SmtpTestServer,
    make_smtp_server: Callable[..., SmtpTestServer],
    greeting_server: Callable[..., GreetingServer],
    ledger: Ledger,
) -> None:
    make_primary, code = FAIL_OVER[fault]
    primary = make_primary(
        smtp_server=smtp_server,
        make_smtp_server=make_smtp_server,
        greeting_server=greeting_server,
    )
    worker = two_relays(primary)
    body = factories.payload()
    handle(factories.cloud_event(body), worker)  # no RetryLater: sent in this invocation

    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.SENT
    assert (row.relay, row.attempts) == ("fallback", 1)
    assert sent_by(fallback_server, body["delivery_id"]) == 1
    assert sent_by(smtp_server, body["delivery_id"]) == 0
    failed = attempt_rows(ledger, body["delivery_id"])
    assert [(e.status, e.error_code, e.payload["relay"]) for e in failed] == [
        (Status.IN_PROGRESS, code, "primary")
    ]
    sent_row = ledger.events(body["delivery_id"])[-1]
    assert (sent_row.status, sent_row.payload["relay"]) == (Status.SENT, "fallback")


# --- never fail over: about the recipient or the message, or the relay may have it -----------


@pytest.mark.parametrize(("stage", "code"), [("rcpt", 550), ("data", 554)])
def test_a_permanent_answer_about_the_message_is_not_sent_elsewhere(
    stage: str,
    code: int,
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    fallback_server: SmtpTestServer,
    ledger: Ledger,
) -> None:
    smtp_server.fail_next(1, code, "5.1.1 no such user / message refused", at=stage)  # type: ignore[arg-type]
    worker = two_relays()
    body = factories.payload()
    handle(factories.cloud_event(body), worker)  # failed: dead-lettered and acked

    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.FAILED
    assert row.last_error_code == f"SMTP_{code}" and row.relay is None
    assert fallback_server.connections == 0 and fallback_server.messages == []
    failed = attempt_rows(ledger, body["delivery_id"])
    assert [(e.error_code, e.payload["relay"], e.payload["transient"]) for e in failed] == [
        (f"SMTP_{code}", "primary", False)
    ]
    # Not a fail-over failure: the relay works, its breaker does not count it.
    assert Circuits(ledger.pool).report()[0].consecutive_failures == 0


class StopsAfterAFailure(SmtpSender):
    """The primary's connections; its relay goes down right after the first failed send, so
    a retry in the same invocation finds it refusing connections."""

    def __init__(self, settings: SmtpSettings, server: SmtpTestServer) -> None:
        super().__init__(settings)
        self.server = server

    def send(self, message: OutgoingEmail) -> str | None:
        try:
            return super().send(message)
        except SmtpError:
            self.server.stop()
            raise


def test_a_connection_lost_after_the_message_is_never_sent_elsewhere(
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    fallback_server: SmtpTestServer,
    ledger: Ledger,
) -> None:
    # The relay takes the whole message and hangs up before its reply: it may have queued it,
    # so this invocation sends it nowhere else, not even when the retry finds that relay down
    # (which alone would fail over).
    smtp_server.drop_next(1)
    worker = two_relays()
    primary = StopsAfterAFailure(smtp_server.settings(), smtp_server)
    worker = replace(worker, sender=primary)
    body = factories.payload()
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(body), worker)

    assert fallback_server.connections == 0 and fallback_server.messages == []
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.RETRYING
    failed = attempt_rows(ledger, body["delivery_id"])
    assert [(e.payload["relay"], e.error_code) for e in failed] == [
        ("primary", "DISCONNECTED"),
        ("primary", "CONN_REFUSED"),
    ]


def test_each_relay_gets_its_own_providers_headers(
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    fallback_server: SmtpTestServer,
) -> None:
    smtp_server.fail_next(1, 421, "4.3.2 busy", at="mail")
    worker = two_relays(
        smtp_server.settings(provider=SmtpProvider.SENDGRID),
        fallback=fallback_server.settings(provider=SmtpProvider.MAILGUN),
    )
    body = factories.payload()
    handle(factories.cloud_event(body), worker)
    [received] = fallback_server.messages
    assert received.message["X-Mailgun-Variables"] is not None
    assert received.message["X-SMTPAPI"] is None


def test_a_non_ascii_local_part_goes_to_the_relay_that_offers_smtputf8(
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    make_smtp_server: Callable[..., SmtpTestServer],
    ledger: Ledger,
) -> None:
    international = make_smtp_server(smtputf8=True)
    worker = two_relays(fallback=international.settings())
    body = factories.payload(recipient="ñoño@example.com")
    handle(factories.cloud_event(body), worker)

    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.relay) == (Status.SENT, "fallback")
    assert [m.rcpt_tos for m in international.messages] == [("ñoño@example.com",)]
    assert smtp_server.messages == []
    # The primary cannot take this message; that says nothing about its health.
    assert Circuits(ledger.pool).report()[0].consecutive_failures == 0


def test_smtputf8_unsupported_stands_when_the_last_relay_says_so_too(
    two_relays: Callable[..., Worker], ledger: Ledger
) -> None:
    worker = two_relays()
    body = factories.payload(recipient="ñoño@example.com")
    handle(factories.cloud_event(body), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and row.status is Status.FAILED
    assert row.last_error_code == "SMTPUTF8_UNSUPPORTED"
    failed = attempt_rows(ledger, body["delivery_id"])
    assert [e.payload["relay"] for e in failed] == ["primary", "fallback"]


def test_one_relay_only_keeps_todays_behaviour(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    worker = make_worker(FAST_RETRY)
    smtp_server.fail_next(1, 451, "4.3.0 try again", at="mail")
    body = factories.payload()
    handle(factories.cloud_event(body), worker)  # the in-invocation retry sends it
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.relay, row.attempts) == (Status.SENT, "primary", 2)
    assert row.smtp_ms is not None and row.smtp_ms >= 0
    [failed] = attempt_rows(ledger, body["delivery_id"])
    assert (failed.attempt, failed.error_code, failed.payload["relay"]) == (
        1,
        "SMTP_451",
        "primary",
    )
    # The success right after that failure reset the relay's count.
    assert Circuits(ledger.pool).report()[0].consecutive_failures == 0


def test_a_success_resets_a_count_another_delivery_left(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    with ledger.pool.connection() as conn:
        conn.execute("UPDATE email.relay_circuits SET consecutive_failures = 3")
    handle(factories.cloud_event(factories.payload()), make_worker(FAST_RETRY))
    assert Circuits(ledger.pool).report()[0].consecutive_failures == 0


def test_no_failover_starts_after_the_lease_leaves_no_room_for_it(
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    fallback_server: SmtpTestServer,
    greeting_server: Callable[..., GreetingServer],
    ledger: Ledger,
) -> None:
    # A 12 s lease with 5 s SMTP timeouts leaves 1 s in which an attempt may start; the primary
    # takes 2 s to refuse, so the fallback attempt could outlive the lease: it is not made.
    slow = greeting_server("421 4.3.2 busy", delay=2.0)
    worker = two_relays(
        replace(smtp_server.settings(), port=slow.port),
        retry=replace(FAST_RETRY, lease_seconds=12),
    )
    body = factories.payload()
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(body), worker)
    assert fallback_server.connections == 0
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.last_error_code) == (Status.RETRYING, "SMTP_421")


# --- the breaker, in one process ---------------------------------------------------------------


def test_the_breaker_opens_skips_the_relay_then_one_trial_closes_it(
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    fallback_server: SmtpTestServer,
    ledger: Ledger,
) -> None:
    circuits = Circuits(ledger.pool)
    worker = two_relays(breaker=BreakerSettings(trip_after=2, cooldown_seconds=1))
    smtp_server.fail_next(2, 421, "4.3.2 busy", at="mail")
    for _ in range(2):
        handle(factories.cloud_event(factories.payload()), worker)
    primary = circuits.report()[0]
    assert (primary.relay, primary.state, primary.consecutive_failures) == (
        Relay.PRIMARY,
        CircuitState.OPEN,
        2,
    )
    assert primary.last_error_code == "SMTP_421"

    # While open: straight to the fallback, without connecting to the primary.
    connections = smtp_server.connections
    body = factories.payload()
    handle(factories.cloud_event(body), worker)
    assert smtp_server.connections == connections
    assert sent_by(fallback_server, body["delivery_id"]) == 1

    # After the cool-down: one delivery tries the primary again, and its success closes it.
    with ledger.pool.connection() as conn:
        conn.execute("UPDATE email.relay_circuits SET reopens_at = now() WHERE relay = 'primary'")
    assert circuits.report()[0].state is CircuitState.HALF_OPEN
    body = factories.payload()
    handle(factories.cloud_event(body), worker)
    assert sent_by(smtp_server, body["delivery_id"]) == 1
    primary = circuits.report()[0]
    assert (primary.state, primary.consecutive_failures) == (CircuitState.CLOSED, 0)


def test_a_lone_relay_is_tried_while_its_circuit_is_open(
    make_worker: MakeWorker, smtp_server: SmtpTestServer, ledger: Ledger
) -> None:
    worker = make_worker(FAST_RETRY)
    worker = replace(
        worker,
        settings=replace(
            worker.settings, breaker=BreakerSettings(trip_after=1, cooldown_seconds=60)
        ),
    )
    smtp_server.fail_next(2, 421, "4.3.2 busy", at="mail")
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(factories.payload()), worker)
    assert Circuits(ledger.pool).report()[0].state is CircuitState.OPEN

    body = factories.payload()
    handle(factories.cloud_event(body), worker)  # no other relay: tried anyway
    assert sent_by(smtp_server, body["delivery_id"]) == 1
    assert Circuits(ledger.pool).report()[0].state is CircuitState.CLOSED


def test_every_relay_open_tries_them_in_order(
    two_relays: Callable[..., Worker],
    smtp_server: SmtpTestServer,
    fallback_server: SmtpTestServer,
    ledger: Ledger,
) -> None:
    with ledger.pool.connection() as conn:
        conn.execute(
            "UPDATE email.relay_circuits SET consecutive_failures = 5, opened_at = now(),"
            " reopens_at = now() + interval '1 hour'"
        )
    worker = two_relays()
    smtp_server.fail_next(1, 421, "4.3.2 busy", at="mail")
    body = factories.payload()
    handle(factories.cloud_event(body), worker)
    assert smtp_server.transactions == 1  # the primary first...
    assert sent_by(fallback_server, body["delivery_id"]) == 1  # ...then the fallback took it
    states = {c.relay: c.state for c in Circuits(ledger.pool).report()}
    assert states == {Relay.PRIMARY: CircuitState.OPEN, Relay.FALLBACK: CircuitState.CLOSED}
