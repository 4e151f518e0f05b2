"""In-process `Worker`s for tests: the real ledger pool, a real SmtpSender per worker (like
separate instances), the test's SMTP server and Pub/Sub namespace."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Protocol

import pytest

from tests.harness.pubsub import PubSubNamespace
from tests.harness.smtp import SmtpTestServer
from worker.core.settings import DatabaseSettings
from worker.delivery.config import RetrySettings, Settings, SmtpSettings
from worker.delivery.deadletter import DeadLetterPublisher
from worker.delivery.pipeline import Worker
from worker.delivery.rendering import Renderer
from worker.delivery.smtp import SmtpSender
from worker.store.ledger import Ledger

# Millisecond backoffs: the tests exercise the retry logic, not the waiting.
FAST_RETRY = RetrySettings(
    max_attempts=3,
    tries_per_invocation=2,
    initial_backoff_seconds=0.01,
    max_backoff_seconds=0.02,
    lease_seconds=30,
)


class MakeWorker(Protocol):
    def __call__(
        self, retry: RetrySettings = ..., *, smtp: SmtpSettings | None = None, **changes: Any
    ) -> Worker: ...


@pytest.fixture
def make_worker(
    database_url: str, ledger: Ledger, smtp_server: SmtpTestServer, pubsub: PubSubNamespace
) -> Iterator[MakeWorker]:
    """`make_worker(retry=FAST_RETRY, smtp=None, **changes)`: `smtp` replaces the server's
    client settings; `changes` replace Worker fields (ledger, renderer, dead_letters, ...)."""
    senders: list[SmtpSender] = []
    publishers: list[DeadLetterPublisher] = []

    def make(
        retry: RetrySettings = FAST_RETRY, *, smtp: SmtpSettings | None = None, **changes: Any
    ) -> Worker:
        settings = Settings(
            database=DatabaseSettings(url=database_url),
            smtp=smtp or smtp_server.settings(),
            pubsub=pubsub.settings,
            retry=retry,
        )
        sender = SmtpSender(settings.smtp)
        senders.append(sender)
        dead_letters = DeadLetterPublisher(settings.pubsub)
        publishers.append(dead_letters)
        worker = Worker(
            settings=settings,
            ledger=ledger,
            sender=sender,
            renderer=Renderer(),
            dead_letters=dead_letters,
        )
        return replace(worker, **changes)

    yield make
    for sender in senders:
        sender.close()
    for publisher in publishers:
        publisher.close()
