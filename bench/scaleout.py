"""5. Scale-out: 1, 2, 4, 8 functions-framework processes against one PostgreSQL.

tests/harness/cluster.py runs the processes (`WorkerCluster`) and plays Pub/Sub
(`Deliverer.deliver_all(..., copies=3)`: every event three times at once, to different
servers, each copy redelivered after a non-2xx until acked). The relay is bench.delaysink,
which takes ~20 ms per message and records every Message-ID it accepted, so duplicate emails
are counted where they would land. Throughput is unique deliveries per second of wall time
(all copies acked); the deliverer's concurrency is the same for every process count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cpu
from bench.common import count_status
from bench.report import Section
from bench.services import Stack
from bench.workload import bodies
from tests.harness.cluster import Deliverer, WorkerCluster, push_message, worker_env
from worker.delivery.smtp import message_id_for

COPIES = 3


def cpu_times() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of the whole machine, from /proc/stat. Steal is time the
    hypervisor gave our vCPUs to someone else: not ours, and not idle either."""
    with open("/proc/stat", encoding="utf-8") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(value) for value in stat.readline().split()[1:9]
        )
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + steal + idle + iowait


def busy_since(start: tuple[int, int, int]) -> tuple[float, float]:
    """Shares of the machine's CPU time since `start`: (busy, stolen)."""
    busy, steal, total = cpu_times()
    elapsed = max(1, total - start[2])
    return (busy - start[0]) / elapsed, (steal - start[1]) / elapsed


DELIVERER_CONCURRENCY = 48
MESSAGE_ID_DOMAIN = "example.com"  # tests.harness.cluster.worker_env sets it


def run(
    stack: Stack,
    *,
    events: int,
    processes: Sequence[int],
    delay_ms: float,
    log_dir: Path,
) -> Section:
    section = Section(
        "scaleout",
        f"Scale-out: N processes, each event x{COPIES}, relay {delay_ms:g} ms/message",
    )
    sink = stack.delay_sink(delay_ms)
    rows: list[dict[str, Any]] = []
    base_rate: float | None = None
    for count in processes:
        name, url = stack.database()
        sink.reset()
        env = worker_env(
            database_url=url,
            smtp_port=sink.port,
            project="bench-project",
            delivery_topic="email-delivery",
            dead_letter_topic="email-dead-letter",
            emulator_host="127.0.0.1:1",  # nothing is dead-lettered on this path
        )
        prefix = f"scale-{count}p"
        payloads = bodies(events, prefix)
        messages = [
            push_message(body, message_id=f"{prefix}-m{i}") for i, body in enumerate(payloads)
        ]
        try:
            with WorkerCluster(count, env) as cluster:
                deliverer = Deliverer(cluster.urls, project="bench-project", topic="email-delivery")
                # Warm every process (imports done, pool and SMTP connection open) untimed.
                warm = [push_message(b) for b in bodies(count * 4, f"{prefix}-warm")]
                deliverer.deliver_all(warm, copies=1, concurrency=count * 2)
                sink.reset()
                deliverer = Deliverer(cluster.urls, project="bench-project", topic="email-delivery")
                cpu_start = cpu_times()
                roles_start = cpu.snapshot()
                report = deliverer.deliver_all(
                    messages, copies=COPIES, concurrency=DELIVERER_CONCURRENCY
                )
                cpu_busy, cpu_stolen = busy_since(cpu_start)
                roles = cpu.since(roles_start)
            ids = sink.wait_for_messages(events, timeout=5)
            expected = {message_id_for(b["delivery_id"], MESSAGE_ID_DOMAIN) for b in payloads}
            duplicates = sum(n - 1 for n in ids.values() if n > 1)
            missing = len(expected - set(ids))
            sent = count_status(url, prefix + "-0").get("sent", 0)
        finally:
            stack.drop(name)
        rate = events / report.seconds if report.seconds > 0 else 0.0
        base_rate = base_rate or rate
        rows.append(
            {
                "processes": count,
                "events": events,
                "deliveries_per_s": rate,
                "speedup": rate / base_rate,
                "cpu_busy": cpu_busy,
                "cpu_stolen": cpu_stolen,
                "cpu_ms_per_delivery": {k: v * 1000 / events for k, v in roles.items()},
                "duplicate_emails": duplicates,
                "missing_emails": missing,
                "ledger_sent": sent,
                "report": report.as_dict(),
            }
        )
        failures = ", ".join(f"{k}x{v}" for k, v in report.failures.most_common(3)) or "none"
        section.add(
            f"{count} process{'es' if count > 1 else ''}",
            rate,
            "deliveries/s",
            f"x{rate / base_rate:.2f}; CPU busy {cpu_busy:.0%}, stolen {cpu_stolen:.0%};"
            f" dup {duplicates}, missing {missing}; {report.posts} POSTs,"
            f" redelivered after: {failures}",
        )
    for row in rows:
        split = sorted(row["cpu_ms_per_delivery"].items(), key=lambda kv: -kv[1])
        ours = [(role, ms) for role, ms in split if role != "other"]
        others = row["cpu_ms_per_delivery"].get("other", 0.0)
        section.add(
            f"CPU ms/delivery, {row['processes']}p",
            sum(ms for _, ms in ours),
            "ms",
            ", ".join(f"{role} {ms:.1f}" for role, ms in ours if ms >= 0.05)
            + f"; POSTs/delivery {row['report']['posts'] / events:.1f}"
            + f" (other users of the machine, lower bound: {others:.1f})",
        )
    total_duplicates = sum(r["duplicate_emails"] for r in rows)
    section.add(
        "duplicate emails (all runs)",
        total_duplicates,
        "",
        "must be 0; counted by Message-ID at the sink",
    )
    section.data.update(
        copies=COPIES,
        deliverer_concurrency=DELIVERER_CONCURRENCY,
        delay_ms=delay_ms,
        runs=rows,
    )
    return section
