"""One log line per write: with CONCURRENCY request threads in one process, every line the
worker prints must still be one JSON object on a line of its own (Cloud Logging parses each
line; two lines run together are lost as plain text)."""

from __future__ import annotations

import io
import json
import sys
import threading
from collections.abc import Iterator

import pytest

from worker.core.logging import bind, bind_event, clear_event, get_logger

THREADS = 8
LINES_PER_THREAD = 300


class _Stdout(io.StringIO):
    """A stand-in stdout that yields the GIL inside every write, as a pipe write can."""

    def write(self, text: str) -> int:
        written = super().write(text)
        _yield_now()
        return written


def _yield_now() -> None:
    threading.Event().wait(0)


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter allows, so an interleaving shows."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_concurrent_log_lines_never_share_a_line(
    busy_switching: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout = _Stdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    log = get_logger()
    start = threading.Barrier(THREADS)

    def write_lines(thread: int) -> None:
        start.wait()
        for n in range(LINES_PER_THREAD):
            log.info("delivery sent", delivery_id=f"d-{thread}-{n}", attempts=1)

    threads = [threading.Thread(target=write_lines, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = stdout.getvalue().splitlines()
    parsed = [json.loads(line) for line in lines]  # raises on two objects run together
    assert len(parsed) == THREADS * LINES_PER_THREAD
    assert {line["delivery_id"] for line in parsed} == {
        f"d-{t}-{n}" for t in range(THREADS) for n in range(LINES_PER_THREAD)
    }


def test_a_line_carries_the_bound_fields_and_the_call_wins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = get_logger()
    bind_event(delivery_id="d-1", workflow="password-reset")
    bind(attempt=1)
    try:
        # A retry names its own attempt number; the claim's bound one must not replace it.
        log.warning("transient SMTP failure, retrying", attempt=3)
    finally:
        clear_event()
    log.info("after the event")
    during, after = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert during["attempt"] == 3
    assert (during["delivery_id"], during["workflow"]) == ("d-1", "password-reset")
    assert during["severity"] == "WARNING"
    assert during["message"] == "transient SMTP failure, retrying"
    assert during["time"].endswith("Z")
    assert "delivery_id" not in after and "attempt" not in after
