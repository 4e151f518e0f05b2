"""2. Throughput through a functions-framework server, the production shape.

`functions-framework --target handle_delivery --signature-type cloudevent` (gunicorn, one
worker process, its default threads) serves main.py; a client POSTs every event once over
keep-alive connections, as binary CloudEvents (Eventarc) and as raw Pub/Sub push bodies
(the emulator), at concurrency 1 and a few. Each configuration is compared with plain smtplib
sending the same rendered messages to the same sink, in alternating chunks of 100. A no-op
CloudEvent function on the same framework shows what HTTP + the framework cost on their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.common import count_status, settings_for
from bench.inprocess import CHUNK, PlainSmtp, rendered_messages
from bench.report import Section, median
from bench.services import ROOT, Stack, stop_group, wait_for_port
from bench.workload import (
    HttpRequest,
    LoadResult,
    bodies,
    cloud_event_request,
    drive,
    push_request,
    worker_env,
)
from tests.harness.function import FunctionServer
from tests.harness.postgres import free_port

SHAPES: dict[str, Callable[[dict[str, Any], str], HttpRequest]] = {
    "CloudEvent": cloud_event_request,
    "push": push_request,
}


class NoopServer:
    """functions-framework serving `target` of bench/noop_function.py; `env` adds variables
    (THREADS, NOOP_WAIT_MS, LOG_EXECUTION_ID)."""

    def __init__(
        self, log_dir: Path, *, target: str = "noop", env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.target = target
        self.env = dict(env or {})
        self.log_path = log_dir / f"{target}-function-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NoopServer:
        executable = Path(sys.executable).parent / "functions-framework"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(executable),
                    "--target",
                    self.target,
                    "--signature-type",
                    "cloudevent",
                    "--source",
                    str(ROOT / "bench" / "noop_function.py"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        wait_for_port(self.port, lambda: process.poll() is None, "noop functions-framework")
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)


def _requests(
    shape: str, prefix: str, count: int
) -> tuple[list[dict[str, Any]], list[HttpRequest]]:
    payloads = bodies(count, prefix)
    make = SHAPES[shape]
    return payloads, [make(body, f"{prefix}-m{index}") for index, body in enumerate(payloads)]


def _leased_requests(url: str, prefix: str, count: int) -> list[HttpRequest]:
    """Requests for deliveries another instance holds right now (in_progress, live lease)."""
    payloads, requests = _requests("push", prefix, count)
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, attempts,"
            " claim_token, lease_expires_at) VALUES (%s, %s, %s, 'in_progress', 1,"
            " gen_random_uuid(), now() + interval '1 hour')",
            [(b["delivery_id"], b["workflow"], b["recipient"]) for b in payloads],
        )
    return requests


def _describe(result: LoadResult) -> str:
    bad = {code: n for code, n in result.statuses.items() if code != 200}
    status = "all 200" if not bad else f"non-200: {bad}"
    return f"p50 {result.latency(0.5):.1f} ms, p99 {result.latency(0.99):.1f} ms, {status}"


def run(stack: Stack, *, count: int, concurrency: Sequence[int], log_dir: Path) -> Section:
    section = Section("http", "Throughput through functions-framework (keep-alive HTTP POSTs)")
    sink = stack.sink
    name, url = stack.database()
    smtp_settings = settings_for(url, sink.port).smtp
    server = FunctionServer(worker_env(database_url=url, smtp_port=sink.port))
    noop = NoopServer(log_dir)
    configs: list[dict[str, Any]] = []
    try:
        server.start()
        noop.start()
        _payloads, warm = _requests("push", "http-warm", 40)
        drive(server.port, warm, 1)
        drive(noop.port, warm, 1)
        for shape in SHAPES:
            for level in concurrency:
                prefix = f"http-{shape.lower()}-c{level}"
                payloads, requests = _requests(shape, prefix, count)
                messages = rendered_messages(smtp_settings, payloads)
                result = LoadResult(requests=0, seconds=0.0)
                plain_seconds = 0.0
                baseline = PlainSmtp(sink.port)
                try:
                    # Short alternating chunks: a noisy neighbour slows both alike.
                    for start in range(0, count, CHUNK):
                        plain_seconds += baseline.send_messages(messages[start : start + CHUNK])
                        result.merge(drive(server.port, requests[start : start + CHUNK], level))
                finally:
                    baseline.close()
                plain = count / plain_seconds
                sent = count_status(url, prefix + "-").get("sent", 0)
                section.add(
                    f"{shape}, concurrency {level}",
                    result.per_second,
                    "deliveries/s",
                    f"ratio to smtplib {result.per_second / plain:.2f}; {_describe(result)}",
                )
                configs.append(
                    {
                        "shape": shape,
                        "concurrency": level,
                        "per_s": result.per_second,
                        "smtplib_per_s": plain,
                        "ratio": result.per_second / plain,
                        "p50_ms": result.latency(0.5),
                        "p99_ms": result.latency(0.99),
                        "statuses": dict(result.statuses),
                        "reconnects": result.reconnects,
                        "ledger_sent": sent,
                    }
                )
                if sent != count:
                    section.add(f"  ledger check {shape} c{level}", f"{sent}/{count} sent")
        plain_rate = median([c["smtplib_per_s"] for c in configs])
        section.add(
            "plain smtplib (same messages)",
            plain_rate,
            "messages/s",
            "median over the configurations (each ratio uses its own, interleaved)",
        )
        best = max(configs, key=lambda c: c["ratio"])
        section.add(
            "best ratio to smtplib",
            best["ratio"],
            "",
            f"target >= 0.80 ({best['shape']}, concurrency {best['concurrency']})",
        )
        # At-least-once costs: copies of events already sent (acked, 2xx) and copies whose
        # delivery is held under a live lease elsewhere (RetryLater: 500, redelivered later).
        _payloads, again = _requests("push", "http-push-c1", count)
        duplicate = drive(server.port, again, 1)
        section.add(
            "duplicate of a sent event, c1",
            duplicate.per_second,
            "requests/s",
            _describe(duplicate),
        )
        leased = _leased_requests(url, "http-leased", count)
        busy = drive(server.port, leased, 1)
        section.add(
            "copy of an in-progress delivery, c1",
            busy.per_second,
            "requests/s",
            _describe(busy) + " (RetryLater: 5xx expected)",
        )
        section.data["duplicate_sent_per_s"] = duplicate.per_second
        section.data["duplicate_leased_per_s"] = busy.per_second
        for level in concurrency:
            _payloads, requests = _requests("push", f"noop-c{level}", count)
            floor = drive(noop.port, requests, level)
            section.add(
                f"no-op function, push, concurrency {level}",
                floor.per_second,
                "requests/s",
                f"framework floor; {_describe(floor)}",
            )
            section.data[f"noop_c{level}_per_s"] = floor.per_second
        section.data.update(count=count, configs=configs)
    finally:
        server.stop()
        noop.stop()
        stack.drop(name)
    return section
