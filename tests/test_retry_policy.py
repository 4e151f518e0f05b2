"""The waits between SMTP retries, and the lease rule that bounds them, against aiosmtpd."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from tests import factories
from tests.harness.smtp import SmtpTestServer
from tests.harness.worker import FAST_RETRY, MakeWorker
from worker.core.settings import SettingsError
from worker.delivery.config import load_settings, send_window
from worker.delivery.pipeline import RetryLater, handle
from worker.delivery.smtp import OutgoingEmail, SmtpSender, build_message, send_with_retry
from worker.store.ledger import Ledger, Status


@pytest.fixture
def sender(smtp_server: SmtpTestServer) -> Iterator[SmtpSender]:
    sender = SmtpSender(smtp_server.settings())
    yield sender
    sender.close()


def message(smtp_server: SmtpTestServer, n: int) -> OutgoingEmail:
    return build_message(
        smtp_server.settings(),
        delivery_id=f"backoff-{n}",
        recipient="ada@example.com",
        subject="s",
        text="t",
        html="<p>h</p>",
    )


def test_backoff_grows_and_carries_jitter(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    """Equal jitter: wait n is its exponential step e_n = initial/2 * 2**(n-1) (capped at
    max/2) plus a random part in [0, e_n]. The fixed part grows, the random part differs."""
    initial, maximum, tries, runs = 0.01, 0.08, 5, 4
    waits: list[list[float]] = []
    for run in range(runs):
        smtp_server.fail_next(tries, 451, "4.3.0 busy")
        recorded: list[float] = []
        result = send_with_retry(
            sender,
            message(smtp_server, run),
            tries=tries,
            initial_backoff=initial,
            max_backoff=maximum,
            sleep=recorded.append,  # record instead of waiting
        )
        assert result.attempts == tries and result.error is not None
        waits.append(recorded)
    steps = [min(initial / 2 * 2**n, maximum / 2) for n in range(tries - 1)]
    assert steps == [0.005, 0.01, 0.02, 0.04]
    for recorded in waits:
        assert len(recorded) == tries - 1
        for wait, step in zip(recorded, steps, strict=True):
            assert step <= wait <= 2 * step, (recorded, steps)
        # Grows: each wait is at least the one before (the next floor is the last ceiling).
        assert recorded == sorted(recorded)
    # The random part, as a fraction of its step: uniform in [0, 1], 16 draws.
    jitter = [
        wait / step - 1 for recorded in waits for wait, step in zip(recorded, steps, strict=True)
    ]
    assert len({round(j, 9) for j in jitter}) > len(jitter) // 2, "no random part"
    assert max(jitter) > 0.25, "the random part is negligible"  # fails with p = 0.25**16


def test_the_lease_rule() -> None:
    # One attempt (two 10 s command timeouts) plus a second of slack must fit in the lease.
    assert send_window(300, 10) == 279
    assert send_window(300, 10, elapsed=100) == 179
    assert send_window(21, 10) == 0
    env = {
        "DATABASE_URL": "postgresql://x@127.0.0.1/x",
        "SMTP_HOST": "127.0.0.1",
        "EMAIL_FROM": "no-reply@example.com",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "DEAD_LETTER_TOPIC": "dead",
        "SMTP_TIMEOUT_SECONDS": "10",
    }
    with pytest.raises(SettingsError, match="LEASE_SECONDS"):
        load_settings({**env, "LEASE_SECONDS": "21"})
    assert load_settings({**env, "LEASE_SECONDS": "22"}).retry.lease_seconds == 22


@pytest.mark.parametrize(("backoff", "attempts"), [(2.5, 1), (0.02, 2)])
def test_no_retry_starts_that_could_end_after_the_lease(
    make_worker: MakeWorker,
    smtp_server: SmtpTestServer,
    ledger: Ledger,
    backoff: float,
    attempts: int,
) -> None:
    """Lease 30 s, command timeout 14 s: an attempt may start only in the first ~1 s. A
    retry after a 1.25..2.5 s wait would not end inside the lease, so it is not made: the
    claim is handed back after one attempt. A short wait fits and is retried."""
    worker = make_worker(
        replace(FAST_RETRY, initial_backoff_seconds=backoff, max_backoff_seconds=backoff * 2),
        smtp=smtp_server.settings(timeout_seconds=14.0),
    )
    assert worker.settings.retry.lease_seconds == 30
    smtp_server.fail_next(5, 451, "4.3.0 busy")
    body = factories.payload()
    with pytest.raises(RetryLater):
        handle(factories.cloud_event(body), worker)
    row = ledger.get(body["delivery_id"])
    assert row is not None and (row.status, row.attempts) == (Status.RETRYING, attempts)
    assert smtp_server.transactions == attempts
