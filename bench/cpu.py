"""Who used the CPU during a run: utime+stime of every process, grouped by role."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _role(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "benchmark client"
    if "functions-framework" in cmdline or "gunicorn" in cmdline:
        return "workers (functions-framework)"
    if cmdline.startswith("postgres") or "/postgresql/" in cmdline:
        return "postgresql"
    if "bench.delaysink" in cmdline or "smtp-sink" in cmdline:
        return "smtp sink"
    return "other"


def snapshot() -> dict[str, float]:
    """CPU seconds used so far per role (processes alive now; threads included)."""
    used: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # after the comm: state ppid ... utime is field 14 of the full line, index 11 here.
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        role = _role(int(entry.name), cmdline)
        used[role] = used.get(role, 0.0) + seconds
    return used


def since(start: dict[str, float]) -> dict[str, float]:
    now = snapshot()
    return {
        role: used - start.get(role, 0.0)
        for role, used in now.items()
        if used > start.get(role, 0.0)
    }


def _group_members(pgid: int) -> Iterator[tuple[str, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command) of each live process in a group."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # state ppid pgrp ...: the process group is index 2 here.
        if int(fields[2]) == pgid:
            yield entry.name, fields


def group_seconds(pgid: int) -> float:
    """CPU seconds used so far by the live processes of one process group (a server started
    with `start_new_session=True`: functions-framework's gunicorn master and its worker)."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in _group_members(pgid))
    return ticks / TICK


def _run_delay_ns(pid: str) -> int:
    """Nanoseconds the threads of one process spent runnable but waiting for a core
    (/proc/PID/task/TID/schedstat, second field): the scheduler's queueing, not I/O."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


def group_run_delay(pgid: int) -> float:
    """Seconds the live processes of one process group have waited for a core so far."""
    return sum(_run_delay_ns(pid) for pid, _ in _group_members(pgid)) / 1e9


def backends_run_delay(database: str) -> float:
    """Seconds the live PostgreSQL backends connected to `database` have waited for a core
    so far (their titles read `postgres: USER DATABASE HOST ...`); other servers on the
    machine, and this server's other databases, are left out."""
    waited = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("postgres:") and f" {database} " in cmdline:
            waited += _run_delay_ns(entry.name)
    return waited / 1e9
