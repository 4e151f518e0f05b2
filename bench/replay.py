"""6. Replay: N dead letters replayed from the emulator by `python -m worker replay`.

Setup (untimed): a dead-letter topic and pull subscription, N dead-letter messages as the
worker publishes them (original bytes + the documented attributes), and N matching ledger
rows in `dead_letter`. Timed: the whole command, a fresh process, as an operator runs it
(`--limit N`, so it stops when done rather than after an idle wait). Checked afterwards: how
many rows are `queued` again and what the command's summary says.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from bench.report import Section
from bench.services import ROOT, Stack
from bench.workload import bodies
from tests import factories

PROJECT = "test-project"  # the emulator harness's project


def _ledger_rows(url: str, prefix: str, count: int) -> None:
    """N rows in `dead_letter` through legal transitions (new -> queued -> dead_letter)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status)"
            " SELECT %(prefix)s || lpad(n::text, 7, '0'),"
            "   (ARRAY['verification-code', 'invite', 'password-reset'])[n %% 3 + 1],"
            "   'user' || n || '@example.com', 'queued'"
            " FROM generate_series(0, %(last)s) AS n",
            {"prefix": prefix, "last": count - 1},
        )
        conn.execute(
            "UPDATE email.deliveries SET status = 'dead_letter',"
            " status_reason = 'retries_exhausted', attempts = 5,"
            " last_error_code = 'SMTP_421', last_error_message = '421 4.7.0 too busy'"
            " WHERE delivery_id LIKE %s",
            (prefix + "%",),
        )


def _publish(stack: Stack, topic: str, prefix: str, count: int) -> float:
    emulator = stack.emulator
    started = time.perf_counter()
    futures = []
    for index, body in enumerate(bodies(count, prefix.rstrip("-"))):
        futures.append(
            emulator.publisher.publish(
                emulator.topic_path(topic),
                factories.encode(body),
                delivery_id=body["delivery_id"],
                workflow=body["workflow"],
                reason="retries_exhausted",
                error_code="SMTP_421",
                error_message="421 4.7.0 too busy",
                attempts="5",
                source_message_id=f"orig-{index}",
            )
        )
    for future in futures:
        future.result(timeout=120)
    return time.perf_counter() - started


def run(stack: Stack, *, count: int, log_dir: Path) -> Section:
    section = Section("replay", f"Replay {count:,} dead letters (python -m worker replay)")
    name, url = stack.database()
    emulator = stack.emulator
    suffix = str(os.getpid())
    delivery_topic = f"bench-delivery-{suffix}"
    dead_topic = f"bench-dead-letter-{suffix}"
    emulator.create_topic(delivery_topic)
    emulator.create_topic(dead_topic)
    emulator.create_pull_subscription(delivery_topic, f"{delivery_topic}-pull")
    subscription = emulator.create_pull_subscription(
        dead_topic, f"{dead_topic}-pull", ack_deadline=60
    )
    prefix = "replay-"
    try:
        _ledger_rows(url, prefix, count)
        publish_seconds = _publish(stack, dead_topic, prefix, count)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
            "DATABASE_URL": url,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "DELIVERY_TOPIC": delivery_topic,
            "PUBSUB_EMULATOR_HOST": emulator.host,
        }
        command = [
            sys.executable,
            "-m",
            "worker",
            "replay",
            "--subscription",
            subscription,
            "--limit",
            str(count),
            "--wait",
            "2",
        ]
        log = log_dir / "replay.log"
        started = time.perf_counter()
        with log.open("wb") as out:
            done = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=out,
                timeout=1800,
                check=False,
            )
        seconds = time.perf_counter() - started
        summary = done.stdout.decode(errors="replace").strip().splitlines()
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'queued'), count(*)"
                " FROM email.deliveries WHERE delivery_id LIKE %s",
                (prefix + "%",),
            ).fetchone()
        queued, total = row if row else (0, 0)
        if done.returncode != 0:
            section.error = f"exit {done.returncode}; see {log}"
        section.add("replay command (wall)", seconds, "s", "fresh process, --limit N")
        section.add("replay rate", count / seconds, "messages/s")
        section.add("rows queued again", f"{queued:,} / {total:,}", "", "ledger check")
        section.add("command summary", summary[-1] if summary else "(no output)")
        section.add(
            "setup: emulator publish rate",
            count / publish_seconds,
            "messages/s",
            "batched client publish, for scale",
        )
        section.data.update(
            count=count,
            seconds=seconds,
            per_s=count / seconds,
            queued=queued,
            publish_seconds=publish_seconds,
            returncode=done.returncode,
            stdout=summary[-5:],
        )
    finally:
        stack.drop(name)
    return section
