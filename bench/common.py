"""Helpers shared by the benchmarks: an in-process `Worker`, log capture, ledger counts."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from bench.workload import worker_env
from worker.delivery.config import Settings, load_settings
from worker.delivery.deadletter import DeadLetterPublisher
from worker.delivery.pipeline import Worker
from worker.delivery.rendering import Renderer
from worker.delivery.smtp import SmtpSender
from worker.store.db import connection_kwargs, open_pool
from worker.store.ledger import Ledger


@dataclass
class InProcess:
    worker: Worker
    pool: ConnectionPool

    def close(self) -> None:
        self.worker.sender.close()
        self.pool.close()


def settings_for(database_url: str, smtp_port: int) -> Settings:
    """Parsed from the same environment a deployed instance gets (load_settings)."""
    return load_settings(worker_env(database_url=database_url, smtp_port=smtp_port))


def in_process_worker(
    database_url: str,
    smtp_port: int,
    *,
    configure: Callable[[psycopg.Connection[Any]], None] | None = None,
    pool_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> InProcess:
    """A `Worker` as tests/test_pipeline.py builds one: a real pool, a real SmtpSender.

    Without `configure`, `pool_size` or `overrides` (connection keyword arguments), the pool
    is the production one (`worker.store.db.open_pool`).
    """
    settings = settings_for(database_url, smtp_port)
    if configure is None and pool_size is None and not overrides:
        pool = open_pool(settings.database)
        pool.wait(timeout=10)
    else:
        size = pool_size or settings.database.pool_max_size
        pool = ConnectionPool(
            database_url,
            min_size=size,
            max_size=size,
            kwargs={**connection_kwargs(settings.database), **(overrides or {})},
            configure=configure,
            timeout=10,
        )
        pool.wait(timeout=10)
    worker = Worker(
        settings=settings,
        ledger=Ledger(pool),
        sender=SmtpSender(settings.smtp),
        renderer=Renderer(),
        dead_letters=DeadLetterPublisher(settings.pubsub),
    )
    return InProcess(worker, pool)


@contextlib.contextmanager
def captured_stdout(log_path: Path | None) -> Iterator[None]:
    """The worker logs one JSON line per delivery to stdout: keep it off the table.

    Written to `log_path` (a real file write per line, like a log pipe) or, without one, to
    an in-memory buffer.
    """
    if log_path is None:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
        return
    with log_path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        yield
    sys.stdout.flush()


def count_status(database_url: str, prefix: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT status::text, count(*) FROM email.deliveries"
            " WHERE delivery_id LIKE %s GROUP BY 1",
            (prefix + "%",),
        ).fetchall()
    return {str(status): int(count) for status, count in rows}
