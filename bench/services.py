"""The real components the benchmarks run against, started here and stopped at the end.

- PostgreSQL 15 from tests/harness/postgres.py (pg_stat_statements preloaded), migrated once
  into a template; every benchmark gets a fresh copy (`Stack.database()`).
- Debian's `smtp-sink` (Postfix): a fast C sink that accepts and discards; its `-c` counter
  line tells how many messages it took, a cross-check for every throughput figure.
- `bench.delaysink`: our asyncio sink that waits a fixed time per message and records every
  Message-ID (for the scale-out run).
- The Pub/Sub emulator, started on first use (only the replay benchmark needs it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.harness.postgres import Databases, PostgresServer, free_port
from tests.harness.pubsub import Emulator, EmulatorProcess

ROOT = Path(__file__).resolve().parent.parent
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
_MESSAGES = re.compile(rb"mesg=(\d+)")


def wait_for_port(port: int, alive: Callable[[], bool], what: str, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g}s")


def stop_group(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


class SmtpSink:
    """`smtp-sink -u postfix -c 127.0.0.1:PORT 1000` (the `-u` only when we are root)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / "smtp-sink.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        command = [SMTP_SINK]
        if os.geteuid() == 0:
            command += ["-u", "postfix"]
        command += ["-c", f"127.0.0.1:{self.port}", "1000"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        wait_for_port(self.port, lambda: process.poll() is None, "smtp-sink")
        return self

    def messages(self) -> int:
        """Messages accepted so far (smtp-sink's `-c` counter; it prints on every '.')."""
        found = _MESSAGES.findall(self.log_path.read_bytes()) if self.log_path.exists() else []
        return int(found[-1]) if found else 0

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        seen = self.messages()
        while seen < count and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = self.messages()
        return seen

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)


class DelaySink:
    """`python -m bench.delaysink`: waits `delay_ms` before accepting each message and
    appends every Message-ID it accepted to `ids_path`."""

    def __init__(self, log_dir: Path, delay_ms: float) -> None:
        self.port = free_port()
        self.delay_ms = delay_ms
        self.ids_path = log_dir / f"delaysink-{self.port}.ids"
        self.log_path = log_dir / f"delaysink-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DelaySink:
        self.ids_path.write_bytes(b"")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.delaysink",
                    "--port",
                    str(self.port),
                    "--delay-ms",
                    str(self.delay_ms),
                    "--ids",
                    str(self.ids_path),
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        wait_for_port(self.port, lambda: process.poll() is None, "bench.delaysink")
        return self

    def reset(self) -> None:
        """Forget the ids seen so far (the sink appends; truncating restarts the count)."""
        with self.ids_path.open("r+b") as ids:
            ids.truncate(0)

    def message_ids(self) -> Counter[str]:
        text = self.ids_path.read_text(errors="replace")
        return Counter(line for line in text.splitlines() if line)

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> Counter[str]:
        deadline = time.monotonic() + timeout
        ids = self.message_ids()
        while sum(ids.values()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
            ids = self.message_ids()
        return ids

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)


@dataclass
class Stack:
    """Everything started for one benchmark run; `close()` stops it all."""

    work_dir: Path
    postgres: PostgresServer | None = None
    databases: Databases | None = None
    _sink: SmtpSink | None = None
    _emulator_process: EmulatorProcess | None = None
    _emulator: Emulator | None = None
    _delay_sinks: list[DelaySink] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    def start_postgres(self) -> None:
        self.postgres = PostgresServer()
        self.postgres.init()
        self.postgres.start()
        self.databases = Databases(self.postgres.admin_url)
        self.databases.prepare_template()
        with psycopg.connect(self.postgres.admin_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            # Planning time too: every statement is planned afresh (no prepared statements).
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
            conn.execute("SELECT pg_reload_conf()")

    @property
    def admin_url(self) -> str:
        assert self.postgres is not None, "start_postgres() first"
        return self.postgres.admin_url

    def database(self) -> tuple[str, str]:
        """A fresh migrated database: (name, url)."""
        assert self.databases is not None, "start_postgres() first"
        name = self.databases.create()
        self._created.append(name)
        return name, self.databases.url(name)

    def drop(self, name: str) -> None:
        assert self.databases is not None
        self.databases.drop(name)
        if name in self._created:
            self._created.remove(name)

    def server_version(self) -> str:
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    @property
    def sink(self) -> SmtpSink:
        if self._sink is None:
            self._sink = SmtpSink(self.work_dir).start()
        return self._sink

    def delay_sink(self, delay_ms: float) -> DelaySink:
        sink = DelaySink(self.work_dir, delay_ms).start()
        self._delay_sinks.append(sink)
        return sink

    @property
    def emulator(self) -> Emulator:
        if self._emulator is None:
            process = EmulatorProcess()
            self._emulator_process = process
            process.start()
            self._emulator = Emulator(process.host)
            self._emulator.start_seconds = process.start_seconds
        return self._emulator

    def close(self) -> None:
        for sink in self._delay_sinks:
            sink.stop()
        if self._sink is not None:
            self._sink.stop()
        if self._emulator is not None:
            self._emulator.close()
        if self._emulator_process is not None:
            self._emulator_process.stop()
        if self.postgres is not None:
            self.postgres.destroy()
