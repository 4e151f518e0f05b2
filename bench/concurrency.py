"""8. Requests per instance: one functions-framework process (one Cloud Run instance) at
CONCURRENCY 1, 4, 8 and 16, against a relay that takes 50 ms per message.

The function runs as deploy/deploy-function.sh configures it: CONCURRENCY=N and THREADS=N
(gunicorn's threads), LOG_EXECUTION_ID=true, pools sized from N. The client keeps exactly N
requests in flight (N keep-alive connections), as Cloud Run does with `--concurrency=N`.
Each level is compared with
  - the ideal, N / 50 ms: every request costs exactly the relay's time and nothing else;
  - a no-op function measured in the same run, same framework, threads and logging, that only
    waits 50 ms (bench/noop_function.py `wait`): what this machine can do at all, with the
    client, the servers and PostgreSQL sharing its cores. Function and no-op run in
    alternating chunks, so a noisy neighbour slows both alike; the ratio is the median of the
    chunks' ratios (function chunk over the no-op chunk after it).
Every delivery must end `sent` with exactly one email at the relay. Next to the CPU each
process used, the time its threads spent runnable without a core (and the function's
PostgreSQL backends'): on a shared machine that queueing, paid at every wake-up, is most of
the gap between the function and the no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cpu
from bench.common import count_status
from bench.httpbench import NoopServer
from bench.report import Section, median
from bench.services import Stack
from bench.workload import LoadResult, bodies, drive, push_request, worker_env
from tests.harness.function import FunctionServer
from worker.delivery.smtp import message_id_for

RELAY_MS = 50.0
TARGET_LEVEL = 8
TARGET_RATIO = 0.8
TARGET_SPAN = 3  # the target level runs this many times longer than the others
# Function and no-op take turns in chunks of this many waves of N requests (128 requests, about
# a second, at concurrency 8): short enough that a neighbour's load falls on both alike, long
# enough that a chunk's edges (fresh connections; a pool, relay session and backends that sat
# idle while the other side ran; the last wave draining) are a small part of it. With 4 waves
# the same code measured 0.73-0.78 of the no-op at concurrency 8, with 16 0.84-0.86 (README).
CHUNK_WAVES = 16
MESSAGE_ID_DOMAIN = "bench.example.com"  # EMAIL_FROM's domain (bench.workload)


def production_env(concurrency: int) -> dict[str, str]:
    """What deploy-function.sh adds to the worker's environment for this concurrency."""
    return {
        "CONCURRENCY": str(concurrency),
        "THREADS": str(concurrency),
        "LOG_EXECUTION_ID": "true",
        "MAX_ATTEMPTS": "5",
        "LEASE_SECONDS": "300",
    }


def _level(
    stack: Stack,
    database: str,
    url: str,
    relay_port: int,
    level: int,
    count: int,
    log_dir: Path,
) -> dict[str, Any]:
    env = {**worker_env(database_url=url, smtp_port=relay_port), **production_env(level)}
    function = FunctionServer(env, log_path=log_dir / f"concurrency-c{level}.log")
    noop = NoopServer(
        log_dir, target="wait", env={**production_env(level), "NOOP_WAIT_MS": f"{RELAY_MS:g}"}
    )
    prefix = f"conc-c{level}"
    payloads = bodies(count, prefix)
    requests = [push_request(body, f"{prefix}-m{k}") for k, body in enumerate(payloads)]
    floor_requests = [push_request(body, f"{prefix}-noop-m{k}") for k, body in enumerate(payloads)]
    try:
        function.start()
        noop.start()
        # Warm-up: every thread's first request, the pools' first connections.
        warm = bodies(2 * level, f"{prefix}-warm")
        drive(function.port, [push_request(b, f"w{k}") for k, b in enumerate(warm)], level)
        drive(noop.port, [push_request(b, f"w{k}") for k, b in enumerate(warm)], level)
        worker, floor = LoadResult(requests=0, seconds=0.0), LoadResult(requests=0, seconds=0.0)
        worker_cpu = noop_cpu = 0.0
        # Time spent runnable but without a core: on a shared 2-core machine, every wake-up
        # (a reply from PostgreSQL or the relay, the next request) can queue behind others.
        worker_wait = noop_wait = postgres_wait = 0.0
        # The function's rate over the no-op's, chunk by chunk: a neighbour's burst of load
        # spoils a chunk or two, not the figure (ledgercost takes its ratio the same way).
        chunk_ratios: list[float] = []
        assert function.process is not None and noop.process is not None
        chunk = max(CHUNK_WAVES * level, 40)
        for start in range(0, count, chunk):
            before = cpu.group_seconds(function.process.pid)
            waited = cpu.group_run_delay(function.process.pid)
            postgres_waited = cpu.backends_run_delay(database)
            ours = drive(function.port, requests[start : start + chunk], level)
            worker.merge(ours)
            worker_cpu += cpu.group_seconds(function.process.pid) - before
            worker_wait += cpu.group_run_delay(function.process.pid) - waited
            postgres_wait += cpu.backends_run_delay(database) - postgres_waited
            before = cpu.group_seconds(noop.process.pid)
            waited = cpu.group_run_delay(noop.process.pid)
            theirs = drive(noop.port, floor_requests[start : start + chunk], level)
            floor.merge(theirs)
            chunk_ratios.append(ours.per_second / theirs.per_second)
            noop_cpu += cpu.group_seconds(noop.process.pid) - before
            noop_wait += cpu.group_run_delay(noop.process.pid) - waited
    finally:
        function.stop()
        noop.stop()
    return {
        "concurrency": level,
        "events": count,
        "per_s": worker.per_second,
        "noop_per_s": floor.per_second,
        "chunk_ratios": [round(r, 3) for r in chunk_ratios],
        "ratio": median(chunk_ratios),
        "ideal_per_s": level / (RELAY_MS / 1000),
        "p50_ms": worker.latency(0.5),
        "p99_ms": worker.latency(0.99),
        "noop_p50_ms": floor.latency(0.5),
        # CPU the instance itself used per request: what a dedicated vCPU would have to give.
        "cpu_ms_per_delivery": worker_cpu * 1000 / count,
        "noop_cpu_ms_per_request": noop_cpu * 1000 / count,
        # Summed over the process's threads (and PostgreSQL's backends for the function).
        "run_queue_ms_per_delivery": worker_wait * 1000 / count,
        "postgres_run_queue_ms_per_delivery": postgres_wait * 1000 / count,
        "noop_run_queue_ms_per_request": noop_wait * 1000 / count,
        "statuses": dict(worker.statuses),
        "ledger": count_status(url, prefix + "-0"),
        "payload_ids": [body["delivery_id"] for body in payloads],
    }


def run(stack: Stack, *, levels: Sequence[int], seconds: float, log_dir: Path) -> Section:
    section = Section(
        "concurrency",
        f"Requests per instance: one functions-framework process, relay {RELAY_MS:g} ms/message",
    )
    relay = stack.delay_sink(RELAY_MS)
    name, url = stack.database()
    results: list[dict[str, Any]] = []
    try:
        for level in levels:
            # About `seconds` of load at the ideal rate, at least 40 events; the level with the
            # target three times as long, so that its ratio moves less with a neighbour's load.
            span = seconds * (TARGET_SPAN if level == TARGET_LEVEL else 1)
            count = max(40, round(span * level / (RELAY_MS / 1000)))
            relay.reset()
            result = _level(stack, name, url, relay.port, level, count, log_dir)
            ids = relay.wait_for_messages(count + 2 * level)
            expected = {message_id_for(d, MESSAGE_ID_DOMAIN) for d in result.pop("payload_ids")}
            result["emails"] = sum(ids[m] for m in expected)
            result["duplicates"] = sum(ids[m] - 1 for m in expected if ids[m] > 1)
            result["missing"] = sum(1 for m in expected if ids[m] == 0)
            results.append(result)
            ratio = result["ratio"]
            of_ideal = result["per_s"] / result["ideal_per_s"]
            note = (
                f"ideal {result['ideal_per_s']:.0f}/s ({of_ideal:.2f});"
                f" no-op {result['noop_per_s']:.0f}/s (ratio {ratio:.2f}, the median of"
                f" {len(result['chunk_ratios'])} chunks'"
                + (f", target >= {TARGET_RATIO:.1f}" if level == TARGET_LEVEL else "")
                + f"); p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms;"
                f" CPU {result['cpu_ms_per_delivery']:.1f} ms/delivery"
                f" (no-op {result['noop_cpu_ms_per_request']:.1f});"
                f" waiting for a core {result['run_queue_ms_per_delivery']:.1f} ms/delivery"
                f" + PostgreSQL {result['postgres_run_queue_ms_per_delivery']:.1f}"
                f" (no-op {result['noop_run_queue_ms_per_request']:.1f});"
                f" {result['emails']}/{count} emails, {result['duplicates']} duplicates"
            )
            section.add(f"concurrency {level}", result["per_s"], "deliveries/s", note)
            if result["statuses"] != {200: count} or result["ledger"] != {"sent": count}:
                section.add(
                    f"  check c{level}", f"statuses {result['statuses']}, ledger {result['ledger']}"
                )
        target = next((r for r in results if r["concurrency"] == TARGET_LEVEL), None)
        if target is not None:
            ratio = target["ratio"]
            verdict = "met" if ratio >= TARGET_RATIO else "not met"
            rates = target["per_s"] / target["noop_per_s"]
            chunks = target["chunk_ratios"]
            section.add(
                f"ratio to the no-op at concurrency {TARGET_LEVEL}",
                ratio,
                "",
                f"target >= {TARGET_RATIO:.1f}: {verdict}; median of {len(chunks)} chunks' ratios"
                f" ({min(chunks):.2f}-{max(chunks):.2f}); whole run's rates {rates:.2f}",
            )
        section.data.update(relay_ms=RELAY_MS, levels=results)
    finally:
        stack.drop(name)
    return section
