"""1. Throughput in process: `pipeline.handle` vs plain smtplib, same messages, same sink.

Each round sends N fresh deliveries through `handle` (claim, render, build, send, record, log)
and the same N rendered messages through one reused `smtplib.SMTP` connection (and, as the
SMTP floor, the same messages pre-flattened with `sendmail`), in alternating chunks of 100 so
that load from other users of the machine hits all of them alike. The ratio worker/smtplib is
taken per round; the median is reported.

A second, shorter pass wraps the pipeline's steps with timers to show where the time goes
(the wrappers cost a little, so that pass's total is not the headline figure).
"""

from __future__ import annotations

import smtplib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar

from bench.common import captured_stdout, count_status, in_process_worker, settings_for
from bench.report import Section, median
from bench.services import Stack
from bench.workload import bodies, cloud_event
from worker.delivery import events, pipeline
from worker.delivery import smtp as worker_smtp
from worker.delivery.config import SmtpSettings
from worker.delivery.rendering import Renderer
from worker.store.ledger import Ledger

F = TypeVar("F", bound=Callable[..., Any])
CHUNK = 200


def rendered_messages(settings: SmtpSettings, payloads: list[dict[str, Any]]) -> list[EmailMessage]:
    """The worker's rendered content for these payloads, as plain smtplib users build it: a
    standard-library `EmailMessage` with the same headers and parts (the worker itself writes
    the bytes directly; that is part of what is being compared)."""
    renderer = Renderer()
    messages = []
    for index, body in enumerate(payloads):
        event = events.decode(cloud_event(body, f"m-{index}"))
        rendered = renderer.render(event)
        message = EmailMessage()
        message["From"] = settings.sender
        message["To"] = event.recipient
        message["Subject"] = rendered.subject
        message["Date"] = format_datetime(datetime.now(UTC))
        message["Message-ID"] = worker_smtp.message_id_for(
            event.delivery_id, settings.message_id_domain
        )
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(rendered.text, charset="utf-8", cte="quoted-printable")
        message.add_alternative(
            rendered.html, subtype="html", charset="utf-8", cte="quoted-printable"
        )
        messages.append(message)
    return messages


class PlainSmtp:
    """The baseline: plain smtplib over one connection, opened before any clock starts."""

    def __init__(self, port: int) -> None:
        self.connection = smtplib.SMTP("127.0.0.1", port, timeout=30)
        self.connection.ehlo()

    def send_messages(self, messages: Sequence[EmailMessage]) -> float:
        """`send_message` each (smtplib flattens the EmailMessage): seconds."""
        started = time.perf_counter()
        for message in messages:
            self.connection.send_message(message)
        return time.perf_counter() - started

    def send_bytes(self, flat: Sequence[tuple[str, list[str], bytes]]) -> float:
        """`sendmail` of bytes flattened beforehand: the SMTP exchange alone, seconds."""
        started = time.perf_counter()
        for sender, recipients, data in flat:
            self.connection.sendmail(sender, recipients, data)
        return time.perf_counter() - started

    def close(self) -> None:
        self.connection.quit()


def flattened(messages: Sequence[EmailMessage]) -> list[tuple[str, list[str], bytes]]:
    return [
        (str(m["From"]), [str(m["To"])], m.as_bytes(policy=m.policy.clone(linesep="\r\n")))
        for m in messages
    ]


def smtplib_seconds(port: int, messages: list[EmailMessage]) -> float:
    plain = PlainSmtp(port)
    try:
        return plain.send_messages(messages)
    finally:
        plain.close()


def handle_seconds_threaded(
    worker: pipeline.Worker, event_objects: list[Any], threads: int
) -> float:
    """The same events through `handle` from `threads` threads at once, as functions-framework
    serves concurrent requests in one instance (gunicorn threads)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda event: pipeline.handle(event, worker), event_objects))
    return time.perf_counter() - started


def handle_seconds(worker: pipeline.Worker, event_objects: list[Any]) -> float:
    started = time.perf_counter()
    for event in event_objects:
        pipeline.handle(event, worker)
    return time.perf_counter() - started


def relay_latency_ratio(stack: Stack, *, count: int, log_path: Path) -> dict[str, float]:
    """handle vs plain smtplib against a sink that waits 20 ms per message, as a real relay
    does: the ledger's fixed cost next to a realistic SMTP exchange."""
    sink = stack.delay_sink(20.0)
    name, url = stack.database()
    proc = in_process_worker(url, sink.port)
    settings = settings_for(url, sink.port)
    try:
        payloads = bodies(count, "inproc-relay")
        messages = rendered_messages(settings.smtp, payloads)
        event_objects = [cloud_event(b, f"relay-{i}") for i, b in enumerate(payloads)]
        with captured_stdout(log_path):
            handle_seconds(proc.worker, event_objects[:5])  # connect and warm up
            worker = handle_seconds(proc.worker, event_objects[5:])
        plain = smtplib_seconds(sink.port, messages[5:])
    finally:
        proc.close()
        sink.stop()
        stack.drop(name)
    measured = count - 5
    return {
        "count": measured,
        "worker_per_s": measured / worker,
        "smtplib_per_s": measured / plain,
        "ratio": plain / worker,
    }


class PhaseTimer:
    """Wraps functions by attribute, sums their wall time; restores them afterwards."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._restore: list[tuple[object, str, Any]] = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - started
                calls[label] += 1

        self._restore.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()


class _TimedLog:
    """Stands in for `pipeline.log`: every call (building the line + the write) is timed."""

    def __init__(self, inner: Any, timer: PhaseTimer) -> None:
        self._inner = inner
        self._timer = timer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        timer = self._timer

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                timer.seconds["log lines"] += time.perf_counter() - started
                timer.calls["log lines"] += 1

        return timed


@contextmanager
def phases(timer: PhaseTimer) -> Iterator[None]:
    timer.wrap(events, "decode", "decode event")
    timer.wrap(Ledger, "claim_or_skip", "DB claim")
    timer.wrap(Renderer, "render", "render (jinja2)")
    timer.wrap(worker_smtp, "build_message", "build message bytes")
    timer.wrap(worker_smtp, "send_with_retry", "send_with_retry")
    timer.wrap(worker_smtp.SmtpSender, "send", "  of which SmtpSender.send")
    timer.wrap(Ledger, "set_sent_if_claimed", "DB set_sent")
    for name in ("bind_event", "bind", "clear_event"):
        timer.wrap(pipeline, name, "log context (contextvars)")
    real_log = pipeline.log
    pipeline.log = _TimedLog(real_log, timer)  # type: ignore[assignment]
    try:
        yield
    finally:
        pipeline.log = real_log
        timer.restore()


def run(stack: Stack, *, count: int, rounds: int, log_dir: Path) -> Section:
    section = Section("inprocess", "Throughput in process: pipeline.handle vs plain smtplib")
    sink = stack.sink
    name, url = stack.database()
    proc = in_process_worker(url, sink.port)
    settings = settings_for(url, sink.port)
    log_path = log_dir / "inprocess-worker.log"
    try:
        with captured_stdout(log_path):
            warm = bodies(50, "inproc-warm")
            handle_seconds(proc.worker, [cloud_event(b, f"w{i}") for i, b in enumerate(warm)])
            smtplib_seconds(sink.port, rendered_messages(settings.smtp, warm))

        per_round: list[dict[str, float]] = []
        for number in range(rounds):
            payloads = bodies(count, f"inproc-r{number}")
            messages = rendered_messages(settings.smtp, payloads)
            flat = flattened(messages)
            event_objects = [cloud_event(b, f"r{number}-{i}") for i, b in enumerate(payloads)]
            before = sink.messages()
            plain = wire = worker = 0.0
            baseline = PlainSmtp(sink.port)
            try:
                with captured_stdout(log_path):
                    # Short alternating chunks: a noisy neighbour slows all three alike.
                    for index, start in enumerate(range(0, count, CHUNK)):
                        chunk = slice(start, start + CHUNK)
                        if index % 2:
                            worker += handle_seconds(proc.worker, event_objects[chunk])
                        plain += baseline.send_messages(messages[chunk])
                        wire += baseline.send_bytes(flat[chunk])
                        if not index % 2:
                            worker += handle_seconds(proc.worker, event_objects[chunk])
            finally:
                baseline.close()
            received = sink.wait_for_messages(before + 3 * count) - before
            sent_rows = count_status(url, f"inproc-r{number}-").get("sent", 0)
            per_round.append(
                {
                    "worker_per_s": count / worker,
                    "smtplib_per_s": count / plain,
                    "ratio": plain / worker,
                    "sendmail_bytes_per_s": count / wire,
                    "sink_received": received,
                    "ledger_sent": sent_rows,
                }
            )

        worker_rate = median([r["worker_per_s"] for r in per_round])
        plain_rate = median([r["smtplib_per_s"] for r in per_round])
        ratio = median([r["ratio"] for r in per_round])
        section.add("pipeline.handle", worker_rate, "deliveries/s", f"median of {rounds} rounds")
        section.add("plain smtplib, same messages", plain_rate, "messages/s", "one connection")
        section.add(
            "ratio handle / smtplib", ratio, "", "target >= 0.80; median of per-round ratios"
        )
        wire_rate = median([r["sendmail_bytes_per_s"] for r in per_round])
        section.add(
            "smtplib.sendmail, pre-flattened bytes",
            wire_rate,
            "messages/s",
            "the SMTP exchange alone (no EmailMessage flatten)",
        )
        section.add("per delivery: handle", 1e6 / worker_rate, "us")
        section.add("per message: smtplib send_message", 1e6 / plain_rate, "us")
        section.add(
            "  of which flattening EmailMessage",
            1e6 / plain_rate - 1e6 / wire_rate,
            "us",
            "send_message minus sendmail(bytes)",
        )
        checks = all(
            r["sink_received"] == 3 * count and r["ledger_sent"] == count for r in per_round
        )
        section.add(
            "sink / ledger cross-check",
            "ok" if checks else "MISMATCH",
            "",
            f"sink got 3x{count} per round, ledger {count} sent",
        )
        section.data.update(
            count=count,
            rounds=rounds,
            per_round=per_round,
            worker_per_s=worker_rate,
            smtplib_per_s=plain_rate,
            ratio=ratio,
            sendmail_bytes_per_s=wire_rate,
        )

        threaded_events = [
            cloud_event(b, f"t-{i}") for i, b in enumerate(bodies(count, "inproc-threads"))
        ]
        with captured_stdout(log_path):
            threaded = count / handle_seconds_threaded(proc.worker, threaded_events, 4)
        section.add(
            "pipeline.handle, 4 threads",
            threaded,
            "deliveries/s",
            f"ratio {threaded / plain_rate:.2f} to plain smtplib; one instance's concurrency",
        )
        section.data["threads_4_per_s"] = threaded

        relay = relay_latency_ratio(stack, count=max(50, count // 10), log_path=log_path)
        section.add(
            "ratio with a 20 ms relay",
            relay["ratio"],
            "",
            f"same comparison, sink adds 20 ms/message; {relay['count']} each",
        )
        section.data["relay_20ms"] = relay

        # Where the time goes: a shorter pass with every step wrapped by a timer.
        breakdown_count = max(200, count // 2)
        payloads = bodies(breakdown_count, "inproc-phases")
        event_objects = [cloud_event(b, f"p-{i}") for i, b in enumerate(payloads)]
        timer = PhaseTimer()
        with captured_stdout(log_path), phases(timer):
            total = handle_seconds(proc.worker, event_objects)
        top_level = [k for k in timer.seconds if not k.startswith("  ")]
        accounted = sum(timer.seconds[k] for k in top_level)
        shares: dict[str, float] = {}
        for label, seconds in timer.seconds.items():
            per_us = seconds / breakdown_count * 1e6
            shares[label] = per_us
            section.add(
                f"phase: {label}", per_us, "us/delivery", f"{seconds / total * 100:4.1f}% of handle"
            )
        other = (total - accounted) / breakdown_count * 1e6
        section.add(
            "phase: other (glue, _durably tenacity)",
            other,
            "us/delivery",
            f"{(total - accounted) / total * 100:4.1f}% of handle",
        )
        section.data["phases_us_per_delivery"] = {**shares, "other": other}
        section.data["phases_total_us_per_delivery"] = total / breakdown_count * 1e6
    finally:
        proc.close()
        stack.drop(name)
    return section
