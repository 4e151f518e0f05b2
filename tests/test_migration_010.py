"""Migration 010 (freshness: published_at, not_after, the claim's validity end): the previous
release's worker runs against the schema while it is migrated and after (the machinery of
tests/test_migration_002.py), and the way back restores the claim of migration 005 word for
word."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests.harness.smtp import SmtpTestServer
from tests.test_migration_002 import (
    OldWorker,
    columns,
    previous_release_commit,
    quiet,
    release_tree,
    up_to,
)
from worker.store.ledger import Code, Ledger, Skipped, Status
from worker.store.migrations import discover, migrate_down

NEW_COLUMNS = {"published_at", "not_after"}

# The release before 010, in its own layout: one command per stdin line, one answer each.
OLD_WORKER = r"""
import sys
import time
import psycopg
import worker
from tests import factories
from worker.delivery import pipeline
from worker.store.ledger import Failure, Reason

print("@@", "from", worker.__file__, flush=True)
pipeline.INSTANCE.configure()
w = pipeline.INSTANCE.get()
claims = {}
for line in sys.stdin:
    command, delivery_id = line.split()
    if command == "deliver":
        body = factories.payload("invite", delivery_id=delivery_id)
        # Migration 010 drops and creates email.claim_delivery(): a claim that was being
        # planned at that instant fails once ("cache lookup failed for function"), and the
        # handler raises, as for a database blip. Pub/Sub redelivers it; so does this script.
        for redelivery in range(3):
            try:
                pipeline.handle(factories.cloud_event(body), w)
                break
            except psycopg.Error:
                time.sleep(0.1)
    elif command == "claim":
        claims[delivery_id] = w.ledger.claim(
            delivery_id=delivery_id, workflow="invite", recipient="ada@example.com",
            locale="en", metadata=None, source_message_id=None, lease_seconds=60)
    elif command == "sent":
        w.ledger.set_sent_if_claimed(
            claims.pop(delivery_id), attempts=1, provider_message_id=f"<{delivery_id}@x>")
    elif command == "reject":
        w.ledger.set_failed_if_new_or_queued(
            delivery_id=delivery_id, workflow="invite", recipient="ada@example.com",
            source_message_id=None,
            failure=Failure("SMTP_550", "no", Reason.PERMANENT_FAILURE))
    elif command == "replay":
        w.ledger.set_queued_if_finished(delivery_id)
    row = w.ledger.get(delivery_id)
    print("@@", delivery_id, row.status if row else None, flush=True)
"""


def claim_source(url: str) -> tuple[str, str]:
    """email.claim_delivery()'s arguments and body, as the catalog holds them."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT pg_get_function_arguments(oid), prosrc FROM pg_proc"
            " WHERE proname = 'claim_delivery'"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.fixture(scope="module")
def release_before_010(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = release_tree(tmp_path_factory.mktemp("before-010"), previous_release_commit("010"))
    assert not list((tree / "sql" / "migrations").glob("010_*"))
    return tree


@pytest.fixture
def old_worker(
    release_before_010: Path, empty_database_url: str, smtp_server: SmtpTestServer
) -> Iterator[OldWorker]:
    up_to(empty_database_url, 9)
    old = OldWorker(release_before_010, empty_database_url, smtp_server, OLD_WORKER)
    assert old.origin[1].startswith(str(release_before_010)), old.origin
    yield old
    old.close()


def test_the_release_before_010_works_during_and_after_it(
    old_worker: OldWorker, empty_database_url: str, smtp_server: SmtpTestServer
) -> None:
    url = empty_database_url
    assert old_worker("deliver", "before") == "sent"
    assert old_worker("claim", "across") == "in_progress"  # held across the migration

    during: list[str] = []
    flowing, stop = threading.Event(), threading.Event()

    def deliver_until_stopped() -> None:
        while not stop.is_set() or len(during) < 3:
            during.append(old_worker("deliver", f"during-{len(during)}"))
            flowing.set()

    loop = threading.Thread(target=deliver_until_stopped)
    loop.start()
    assert flowing.wait(30)
    up_to(url, 10)
    stop.set()
    loop.join(60)
    assert during and set(during) == {"sent"}, during
    assert columns(url) >= NEW_COLUMNS

    # After: the held claim is recorded, new deliveries go out, a replay works; the old
    # release's call (without the two new arguments) claims as before, with no validity end.
    assert old_worker("sent", "across") == "sent"
    assert old_worker("deliver", "after") == "sent"
    assert old_worker("reject", "replayed") == "failed"
    assert old_worker("replay", "replayed") == "queued"
    assert old_worker("deliver", "replayed") == "sent"
    assert len(smtp_server.messages) == len(during) + 3
    up_to(url, 12)  # this release's worker below needs its later migrations (012: relays)
    with ConnectionPool(url, kwargs={"autocommit": True}) as pool:
        ledger = Ledger(pool)
        row = ledger.get("after")
        assert row is not None and (row.published_at, row.not_after) == (None, None)
        # And a row the old release left behind is held to an end the new one gives it.
        assert old_worker("reject", "late") == "failed"
        assert old_worker("replay", "late") == "queued"
        assert row.sent_at is not None
        result = ledger.claim_or_skip(
            delivery_id="late",
            workflow="invite",
            recipient="ada@example.com",
            locale="en",
            metadata=None,
            source_message_id=None,
            lease_seconds=60,
            not_after=row.sent_at - timedelta(seconds=1),
        )
        assert isinstance(result, Skipped) and result.code == Code.EXPIRED
        late = ledger.get("late")
        assert late is not None and late.status is Status.SKIPPED


def test_010_goes_down_to_the_claim_of_005_word_for_word_and_up_again(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    up_to(url, 9)
    before = claim_source(url), columns(url)
    up_to(url, 10)
    assert claim_source(url) != before[0] and columns(url) == before[1] | NEW_COLUMNS
    through_010 = [m for m in discover() if m.version <= 10]
    assert [m.version for m in migrate_down(url, migrations=through_010, report=quiet)] == [10]
    assert (claim_source(url), columns(url)) == before
    up_to(url, 10)
    assert columns(url) == before[1] | NEW_COLUMNS
