"""7. Peak memory of a function instance: VmHWM / VmRSS of the functions-framework worker.

functions-framework runs gunicorn: the started process is the arbiter, which forks the one
worker process that imports main.py and handles the events. Its /proc status is read after
start, after the first event (pool, SMTP connection, templates loaded) and after N events
sent at concurrency 4; growth between the last two would point at a leak.
"""

from __future__ import annotations

from pathlib import Path

from bench.report import Section
from bench.services import Stack
from bench.workload import bodies, drive, push_request, worker_env
from tests.harness.function import FunctionServer


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), ... of a process, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key.startswith("Vm") and rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0])
    return values


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def run(stack: Stack, *, count: int, log_dir: Path) -> Section:
    section = Section("memory", "Peak memory of a functions-framework instance")
    sink = stack.sink
    name, url = stack.database()
    server = FunctionServer(worker_env(database_url=url, smtp_port=sink.port))
    try:
        server.start()
        assert server.process is not None
        arbiter = server.process.pid
        workers = children(arbiter)
        if len(workers) != 1:
            raise RuntimeError(f"expected one gunicorn worker under {arbiter}, found {workers}")
        worker = workers[0]
        at_start = status_kib(worker)
        first = bodies(1, "mem-first")
        drive(server.port, [push_request(first[0], "mem-first-m")], 1)
        after_first = status_kib(worker)
        payloads = bodies(count, "mem-run")
        requests = [push_request(b, f"mem-m{i}") for i, b in enumerate(payloads)]
        third = max(1, count // 3)
        result = drive(server.port, requests[:third], 4)
        after_third = status_kib(worker)
        rest = drive(server.port, requests[third:], 4)
        result.statuses.update(rest.statuses)
        after_run = status_kib(worker)
        arbiter_status = status_kib(arbiter)

        def mib(kib: int) -> float:
            return kib / 1024

        section.add("worker RSS after start", mib(at_start["VmRSS"]), "MiB", "main imported")
        section.add("worker RSS after 1st event", mib(after_first["VmRSS"]), "MiB")
        section.add(
            f"worker RSS after {count:,} more", mib(after_run["VmRSS"]), "MiB", "concurrency 4"
        )
        section.add("worker peak RSS (VmHWM)", mib(after_run["VmHWM"]), "MiB")
        section.add(
            f"growth over the first {third:,}",
            mib(after_third["VmRSS"] - after_first["VmRSS"]),
            "MiB",
            "warm-up: pool and SMTP connections, caches",
        )
        late = after_run["VmRSS"] - after_third["VmRSS"]
        section.add(
            f"growth over the last {count - third:,}",
            mib(late),
            "MiB",
            f"{late / max(1, count - third):.2f} KiB/event (steady state; ~0 = no leak)",
        )
        section.add("gunicorn arbiter peak RSS", mib(arbiter_status["VmHWM"]), "MiB")
        section.data.update(
            count=count,
            worker_at_start_kib=at_start,
            worker_after_first_kib=after_first,
            worker_after_third_kib=after_third,
            worker_after_run_kib=after_run,
            arbiter_kib=arbiter_status,
            statuses=dict(result.statuses),
            per_s=result.per_second,
        )
    finally:
        server.stop()
        stack.drop(name)
    return section
