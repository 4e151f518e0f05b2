"""Issue 18. The primary relay goes down for the middle third of a run and comes back: one
functions-framework process at CONCURRENCY 8 (as `concurrency` runs it), relays that take 50 ms
per message, with the fallback relay and its shared circuit breaker, and without (one relay).

The primary sits behind a small TCP proxy in this process. While the primary is down the
proxy accepts each new connection and resets it at once (counted: the connections attempted
to the dead primary), and cuts each kept-alive session at the next command the worker sends
on it. A command, not a reply: a session waiting for the relay's answer to a message gets its
answer first, so the cut itself never leaves an email the relay took that the worker believes
failed (that would be a duplicate of the outage's making, not the worker's).

The client keeps 8 requests in flight for the whole run and does what Pub/Sub does with a
non-2xx answer: it redelivers the same message, here after `REDELIVERY_SECONDS` (Pub/Sub's
backoff is 10 s or more). Time to send runs from a message's first POST to the 200 that
follows the relay's acceptance; messages are put in the third their first POST fell in.
Every message must reach exactly one relay exactly once (duplicates 0, lost 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import math
import socket
import statistics
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import count_status
from bench.concurrency import MESSAGE_ID_DOMAIN, production_env
from bench.report import Section
from bench.services import DelaySink, Stack
from bench.workload import WORKFLOWS, HttpRequest, push_request, worker_env
from tests import factories
from tests.harness.function import FunctionServer
from tests.harness.postgres import free_port
from worker.delivery.smtp import message_id_for

RELAY_MS = 50.0
CONCURRENCY = 8
TRIP_AFTER = 5  # RELAY_TRIP_AFTER's default
REDELIVERY_SECONDS = 1.0
DRAIN_SECONDS = 60.0  # after the run, for the messages still being redelivered
P99_FACTOR = 2.0  # target: p99 during the outage at most this times the healthy p99
THIRDS = ("before", "outage", "after")


def cooldown_for(third_seconds: float) -> int:
    """RELAY_COOLDOWN_SECONDS for the run: about five probes of the dead primary per outage
    (the default 30 s would outlast a short run's outage)."""
    return max(1, round(third_seconds / 5))


# --- the proxy in front of the primary ------------------------------------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a relay whose process died would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class OutageProxy:
    """127.0.0.1:`port` -> the primary's sink, on an event loop in a thread of its own."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.up = True
        self.accepted = 0
        self.refused = 0  # new connections while down: attempts on the dead primary
        self.cut = 0  # kept-alive sessions cut at their next command while down
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> OutageProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, "127.0.0.1", self.port, backlog=1000),
            self._loop,
        )
        self._server = future.result(timeout=10)
        return self

    def set_up(self, up: bool) -> None:
        self.up = up  # read by the loop's thread; a bool's assignment is atomic

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            _reset(writer)
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _reset(writer)
            return
        downstream = asyncio.ensure_future(self._pump(up_reader, writer, gate=False))
        try:
            await self._pump(reader, up_writer, gate=True)
        finally:
            downstream.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await downstream
            for end in (writer, up_writer):
                if self.up:
                    end.close()
                else:
                    _reset(end)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gate: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(1 << 16):
                if gate and not self.up:
                    self.cut += 1
                    return  # the worker's next command meets a dead relay
                writer.write(chunk)
                await writer.drain()


# --- the client ------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    first_post: float  # seconds from the run's start
    done: float | None = None
    posts: int = 0
    status: int = 0


def _request(prefix: str, index: int) -> HttpRequest:
    body = factories.payload(
        WORKFLOWS[index % len(WORKFLOWS)],
        delivery_id=f"{prefix}-{index:07d}",
        recipient=f"user{index}@example.com",
        metadata={"tenant": "bench", "n": index},
    )
    return push_request(body, f"{prefix}-m{index}")


class Client:
    """CONCURRENCY threads, each with one keep-alive connection, each posting a new message
    as soon as its last one was accepted (redelivering the last one until then)."""

    def __init__(self, port: int, prefix: str, started: float) -> None:
        self.port = port
        self.prefix = prefix
        self.started = started
        self.outcomes: list[Outcome] = []
        self._next = itertools.count()
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.started

    def run(self, until: float) -> None:
        threads = [threading.Thread(target=self._loop, args=(until,)) for _ in range(CONCURRENCY)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _loop(self, until: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            while self.now() < until:
                with self._lock:
                    index = next(self._next)
                    outcome = Outcome(index, self.now())
                    self.outcomes.append(outcome)
                connection = self._deliver(connection, outcome, until + DRAIN_SECONDS)
        finally:
            connection.close()

    def _deliver(
        self, connection: http.client.HTTPConnection, outcome: Outcome, give_up: float
    ) -> http.client.HTTPConnection:
        request = _request(self.prefix, outcome.index)
        while self.now() < give_up:
            outcome.posts += 1
            try:
                connection.request("POST", request.path, request.body, request.headers)
                response = connection.getresponse()
                response.read()
                outcome.status = response.status
            except (http.client.HTTPException, OSError):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                outcome.status = 0
            if outcome.status == 200:
                outcome.done = self.now()
                return connection
            time.sleep(REDELIVERY_SECONDS)  # Pub/Sub redelivers after its backoff
        return connection


# --- one variant -----------------------------------------------------------------------------


def _percentile(values: list[float], quantile: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[max(0, min(98, round(quantile * 100) - 1))]


def _thirds(
    outcomes: list[Outcome], third: float, fallback_ids: Counter[str], prefix: str
) -> list[dict[str, Any]]:
    rows = []
    for k, name in enumerate(THIRDS):
        mine = [o for o in outcomes if min(2, int(o.first_post // third)) == k]
        times = [(o.done - o.first_post) * 1000 for o in mine if o.done is not None]
        finished = sum(
            1 for o in outcomes if o.done is not None and k * third <= o.done < (k + 1) * third
        )
        via_fallback = sum(
            1
            for o in mine
            if fallback_ids[message_id_for(f"{prefix}-{o.index:07d}", MESSAGE_ID_DOMAIN)]
        )
        rows.append(
            {
                "third": name,
                "messages": len(mine),
                "p50_ms": _percentile(times, 0.5),
                "p99_ms": _percentile(times, 0.99),
                "per_s": finished / third,
                "redelivered": sum(1 for o in mine if o.posts > 1),
                "via_fallback": via_fallback,
            }
        )
    return rows


def _wait_for(
    sinks: list[DelaySink], expected: set[str], timeout: float = 10.0
) -> list[Counter[str]]:
    deadline = time.monotonic() + timeout
    while True:
        counts = [sink.message_ids() for sink in sinks]
        seen: set[str] = set().union(*counts)
        if expected <= seen or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def _variant(
    stack: Stack,
    *,
    fallback: bool,
    third: float,
    primary: DelaySink,
    secondary: DelaySink,
    log_dir: Path,
) -> dict[str, Any]:
    name, url = stack.database()
    proxy = OutageProxy(primary.port).start()
    primary.reset()
    secondary.reset()
    cooldown = cooldown_for(third)
    env = {
        **worker_env(database_url=url, smtp_port=proxy.port),
        **production_env(CONCURRENCY),
        "RELAY_TRIP_AFTER": str(TRIP_AFTER),
        "RELAY_COOLDOWN_SECONDS": str(cooldown),
        # Nothing may be dead-lettered: the run counts what a long outage delays, not drops.
        "MAX_ATTEMPTS": "100",
    }
    if fallback:
        env |= {
            "FALLBACK_SMTP_HOST": "127.0.0.1",
            "FALLBACK_SMTP_PORT": str(secondary.port),
            "FALLBACK_SMTP_SECURITY": "none",
        }
    label = "fallback" if fallback else "single"
    prefix = f"outage-{label}"
    function = FunctionServer(env, log_path=log_dir / f"outage-{label}.log")
    try:
        function.start()
        _warm(function.port, prefix)
        client = Client(function.port, prefix, time.perf_counter())
        timer = threading.Thread(target=_schedule, args=(proxy, client, third))
        timer.start()
        client.run(until=3 * third)
        timer.join()
    finally:
        function.stop()
        proxy.stop()
    try:
        return _summary(client, proxy, [primary, secondary], url, third, cooldown, prefix, fallback)
    finally:
        stack.drop(name)


def _warm(port: int, prefix: str) -> None:
    """Every thread's first request and the pools' first connections, before the clock."""
    warm = Client(port, prefix + "-warm", time.perf_counter())
    warm.run(until=1.0)


def _schedule(proxy: OutageProxy, client: Client, third: float) -> None:
    time.sleep(max(0.0, third - client.now()))
    proxy.set_up(False)
    time.sleep(max(0.0, 2 * third - client.now()))
    proxy.set_up(True)


def _summary(
    client: Client,
    proxy: OutageProxy,
    sinks: list[DelaySink],
    url: str,
    third: float,
    cooldown: int,
    prefix: str,
    fallback: bool,
) -> dict[str, Any]:
    outcomes = client.outcomes
    expected = {message_id_for(f"{prefix}-{o.index:07d}", MESSAGE_ID_DOMAIN) for o in outcomes}
    counts = _wait_for(sinks, expected)
    total = counts[0] + counts[1]
    return {
        "fallback": fallback,
        "third_seconds": third,
        "cooldown_seconds": cooldown,
        "messages": len(outcomes),
        "thirds": _thirds(outcomes, third, counts[1], prefix),
        "attempts_on_dead_primary": proxy.refused,
        "sessions_cut": proxy.cut,
        # The bound: fewer than RELAY_TRIP_AFTER + one probe per cool-down of the outage.
        "allowed_attempts": TRIP_AFTER + math.ceil(third / cooldown),
        "duplicates": sum(total[m] - 1 for m in expected if total[m] > 1),
        "lost": sum(1 for m in expected if total[m] == 0),
        "unfinished": sum(1 for o in outcomes if o.done is None),
        "ledger": count_status(url, prefix + "-0"),
    }


def run(stack: Stack, *, third_seconds: float, log_dir: Path) -> Section:
    section = Section(
        "outage",
        f"Primary relay down for the middle third ({third_seconds:g} s of {3 * third_seconds:g}),"
        f" concurrency {CONCURRENCY}, relays {RELAY_MS:g} ms/message",
    )
    primary = stack.delay_sink(RELAY_MS)
    secondary = stack.delay_sink(RELAY_MS)
    results: list[dict[str, Any]] = []
    for fallback in (True, False):
        result = _variant(
            stack,
            fallback=fallback,
            third=third_seconds,
            primary=primary,
            secondary=secondary,
            log_dir=log_dir,
        )
        results.append(result)
        _report(section, result)
    section.data.update(relay_ms=RELAY_MS, concurrency=CONCURRENCY, variants=results)
    return section


def _report(section: Section, result: dict[str, Any]) -> None:
    label = "with fallback" if result["fallback"] else "no fallback"
    healthy, outage = result["thirds"][0], result["thirds"][1]
    for row in result["thirds"]:
        section.add(
            f"{label}: {row['third']}",
            row["per_s"],
            "deliveries/s",
            f"time to send p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms;"
            f" {row['messages']} messages, {row['via_fallback']} via the fallback,"
            f" {row['redelivered']} redelivered",
        )
    ratio = outage["p99_ms"] / healthy["p99_ms"] if healthy["p99_ms"] else 0.0
    verdict = "met" if ratio <= P99_FACTOR else "not met"
    section.add(
        f"{label}: outage p99 / healthy p99",
        ratio,
        "",
        f"target <= {P99_FACTOR:g}: {verdict}" if result["fallback"] else "the comparison",
    )
    attempts, allowed = result["attempts_on_dead_primary"], result["allowed_attempts"]
    if result["fallback"]:
        verdict = "met" if attempts < allowed else "not met"
        target = (
            f"target fewer than {allowed} (RELAY_TRIP_AFTER {TRIP_AFTER}"
            f" + {allowed - TRIP_AFTER} probes at a {result['cooldown_seconds']} s cool-down):"
            f" {verdict}"
        )
    else:
        target = "a lone relay is always tried"
    section.add(
        f"{label}: connections to the dead primary",
        attempts,
        "",
        f"{target}; {result['sessions_cut']} kept-alive sessions cut",
    )
    section.add(
        f"{label}: duplicates / lost",
        f"{result['duplicates']} / {result['lost']}",
        "",
        f"must be 0 / 0; {result['messages']} messages, {result['unfinished']} unfinished,"
        f" ledger {result['ledger']}",
    )
