"""The relays' circuit breaker across worker processes: real functions-framework processes
(tests.harness.cluster) sharing one PostgreSQL, a primary and a fallback aiosmtpd relay that
count connections and transactions. Also the race rules in SQL, and a storm with the primary
failing half the time that loses and doubles nothing."""

from __future__ import annotations

import contextlib
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from tests import factories
from tests.harness.cluster import Deliverer, WorkerCluster, push_message, worker_env
from tests.harness.pubsub import PubSubNamespace
from tests.harness.smtp import SmtpTestServer
from worker.delivery.smtp import message_id_for
from worker.store.ledger import Ledger
from worker.store.relays import Circuits, CircuitState, Relay


@contextlib.contextmanager
def running(cluster: WorkerCluster) -> Iterator[WorkerCluster]:
    cluster.start()
    try:
        yield cluster
    except BaseException:
        print("---- worker logs (tail) ----\n" + cluster.logs()[-6000:])
        raise
    finally:
        cluster.stop()


def relays_env(
    database_url: str,
    primary: SmtpTestServer,
    fallback: SmtpTestServer,
    pubsub: PubSubNamespace,
    **extra: str,
) -> dict[str, str]:
    return worker_env(
        database_url=database_url,
        smtp_port=primary.port,
        project=pubsub.project,
        delivery_topic=pubsub.delivery_topic,
        dead_letter_topic=pubsub.dead_letter_topic,
        emulator_host=pubsub.emulator.host,
        MESSAGE_ID_DOMAIN="example.com",
        FALLBACK_SMTP_HOST=fallback.host,
        FALLBACK_SMTP_PORT=str(fallback.port),
        FALLBACK_SMTP_SECURITY="none",
        **extra,
    )


def emails(server: SmtpTestServer) -> Counter[str]:
    return Counter(str(m.message["Message-ID"]) for m in server.messages)


def mid(delivery_id: str) -> str:
    return message_id_for(delivery_id, "example.com")


def circuit(ledger: Ledger, relay: Relay) -> Any:
    return next(c for c in Circuits(ledger.pool).report() if c.relay is relay)


def test_the_breaker_is_shared_by_worker_processes(
    database_url: str,
    smtp_server: SmtpTestServer,
    make_smtp_server: Callable[..., SmtpTestServer],
    pubsub: PubSubNamespace,
    ledger: Ledger,
) -> None:
    fallback = make_smtp_server()
    env = relays_env(
        database_url,
        smtp_server,
        fallback,
        pubsub,
        RELAY_TRIP_AFTER="3",
        RELAY_COOLDOWN_SECONDS="3600",
    )
    with running(WorkerCluster(2, env, threads=4)) as cluster:
        deliverer = Deliverer(cluster.urls, project=pubsub.project, topic=pubsub.delivery_topic)
        # 1. Three fail-over failures in process 0 open the primary's circuit.
        smtp_server.fail_next(3, 421, "4.3.2 too busy", at="mail")
        first = [factories.payload() for _ in range(3)]
        for body in first:
            assert deliverer.deliver(push_message(body), server=0).acked
        primary = circuit(ledger, Relay.PRIMARY)
        assert (primary.state, primary.consecutive_failures) == (CircuitState.OPEN, 3)
        assert primary.last_error_code == "SMTP_421"

        # 2. Process 1 never failed itself, and does not even connect to the primary.
        connections = smtp_server.connections
        second = [factories.payload() for _ in range(3)]
        for body in second:
            assert deliverer.deliver(push_message(body), server=1).acked
        assert smtp_server.connections == connections
        sent_by_fallback = emails(fallback)
        assert all(sent_by_fallback[mid(b["delivery_id"])] == 1 for b in first + second)

        # 3. The cool-down is over: one delivery tries the primary while the others keep
        # going to the fallback; its success closes the circuit.
        with ledger.pool.connection() as conn:
            conn.execute(
                "UPDATE email.relay_circuits SET reopens_at = now() WHERE relay = 'primary'"
            )
        assert circuit(ledger, Relay.PRIMARY).state is CircuitState.HALF_OPEN
        release = smtp_server.hold_data()
        trial = factories.payload()
        transactions = smtp_server.transactions
        results: list[bool] = []
        trying = threading.Thread(
            target=lambda: results.append(deliverer.deliver(push_message(trial), server=0).acked)
        )
        trying.start()
        try:
            while smtp_server.transactions == transactions and trying.is_alive():
                threading.Event().wait(0.02)  # until the trial is at the primary
            third = [factories.payload() for _ in range(3)]
            for k, body in enumerate(third):
                assert deliverer.deliver(push_message(body), server=k % 2).acked
            assert smtp_server.transactions == transactions + 1  # the trial alone
        finally:
            release.set()
            trying.join(timeout=30)
        assert results == [True]
        assert emails(smtp_server)[mid(trial["delivery_id"])] == 1
        assert all(emails(fallback)[mid(b["delivery_id"])] == 1 for b in third)
        primary = circuit(ledger, Relay.PRIMARY)
        assert (primary.state, primary.consecutive_failures) == (CircuitState.CLOSED, 0)
        logs = cluster.logs()
    assert "relay circuit opened" in logs and "relay circuit closed" in logs
    assert "relay failover" in logs


def test_races_are_decided_in_sql(ledger: Ledger, database_url: str) -> None:
    circuits = Circuits(ledger.pool)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE email.relay_circuits SET consecutive_failures = 5, opened_at = now(),"
            " reopens_at = now() WHERE relay = 'primary'"
        )
    # Two deliveries want the trial of the half-open relay: one gets it.
    assert circuits.claim_probe(Relay.PRIMARY, seconds=30) is True
    assert circuits.claim_probe(Relay.PRIMARY, seconds=30) is False
    # A closed relay has no trial to claim.
    assert circuits.claim_probe(Relay.FALLBACK, seconds=30) is False
    # A success closes it once: the second caller finds it closed already.
    assert circuits.record_success(Relay.PRIMARY) is True
    assert circuits.record_success(Relay.PRIMARY) is False


def test_a_storm_with_the_primary_failing_half_the_time_loses_and_doubles_nothing(
    database_url: str,
    smtp_server: SmtpTestServer,
    make_smtp_server: Callable[..., SmtpTestServer],
    pubsub: PubSubNamespace,
    ledger: Ledger,
) -> None:
    """300 events pushed twice each to two worker processes while about every other
    transaction at the primary fails in a phase where it does not have the message."""
    fallback = make_smtp_server()
    bodies = [
        factories.payload(delivery_id=f"storm-{k:04d}", recipient=f"user{k}@example.com")
        for k in range(300)
    ]
    env = relays_env(
        database_url,
        smtp_server,
        fallback,
        pubsub,
        RELAY_TRIP_AFTER="3",
        RELAY_COOLDOWN_SECONDS="1",
        MAX_ATTEMPTS="10",
    )
    stop = threading.Event()
    kinds = [("mail", 421), ("rcpt", 451), ("data", 451), ("mail", 550)]

    def keep_failing() -> None:
        rng = random.Random(5)
        while not stop.wait(0.01):
            if smtp_server.pending_cues() < 2 and rng.random() < 0.5:
                stage, code = rng.choice(kinds)
                smtp_server.fail_next(1, code, "scripted failure", at=stage)  # type: ignore[arg-type]

    with running(WorkerCluster(2, env, concurrency=8)) as cluster:
        injector = threading.Thread(target=keep_failing, daemon=True)
        injector.start()
        try:
            deliverer = Deliverer(
                cluster.urls, project=pubsub.project, topic=pubsub.delivery_topic, seed=3
            )
            report = deliverer.deliver_all(
                [push_message(b) for b in bodies], copies=2, concurrency=12
            )
        finally:
            stop.set()
            injector.join(timeout=10)
    assert (report.acked, report.gave_up) == (2 * len(bodies), 0), report.summary()
    total = emails(smtp_server) + emails(fallback)
    for body in bodies:
        row = ledger.get(body["delivery_id"])
        assert row is not None and row.status.value == "sent", row
        assert total[mid(body["delivery_id"])] == 1, body["delivery_id"]
        relay_server = smtp_server if row.relay == "primary" else fallback
        assert emails(relay_server)[mid(body["delivery_id"])] == 1
    assert sum(total.values()) == len(bodies)
    assert emails(fallback) and emails(smtp_server)  # both relays took part
