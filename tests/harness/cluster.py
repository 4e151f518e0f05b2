"""Several worker processes and a Pub/Sub-like pusher: reliability tests and benchmarks.

`WorkerCluster(n, env)` runs `n` functions-framework servers (each `main.py` in its own process
group and port, see `tests.harness.function.FunctionServer`) that can be crashed (`kill`, a
SIGKILL of the whole group) and brought back on the same port (`restart`).

`Deliverer` plays Pub/Sub's push contract, at least once: it POSTs the JSON body a push
subscription sends (the emulator's exact shape, camelCase and snake_case keys) to
`/projects/P/topics/T` on one server, and redelivers a copy after any non-2xx answer, connection
error or timeout, after a short jittered backoff and to the next server, until a 2xx or a
bounded deadline. `deliver_all(messages, copies=3)` sends every message `copies` times at once
to different servers, as Pub/Sub does when redeliveries overlap. Standard library only.

    env = worker_env(database_url=url, smtp_port=smtp.port, project=ns.project,
                     delivery_topic=ns.delivery_topic, dead_letter_topic=ns.dead_letter_topic,
                     emulator_host=ns.emulator.host, LEASE_SECONDS="10")
    with WorkerCluster(3, env, threads=8) as cluster:
        deliverer = Deliverer(cluster.urls)
        report = deliverer.deliver_all([push_message(body) for body in bodies], copies=3)
        print(report.summary())
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from tests.harness.function import FunctionServer

__all__ = [
    "CopyResult",
    "Deliverer",
    "DeliveryReport",
    "PushMessage",
    "WorkerCluster",
    "push_message",
    "worker_env",
]

# --- worker processes -------------------------------------------------------------------------


def worker_env(
    *,
    database_url: str,
    smtp_port: int,
    project: str,
    delivery_topic: str,
    dead_letter_topic: str,
    emulator_host: str,
    smtp_host: str = "127.0.0.1",
    **extra: str,
) -> dict[str, str]:
    """The environment of a worker process against the local stack (plain SMTP, no AUTH).

    `extra` adds or overrides variables, e.g. `MAX_ATTEMPTS="4"`, `LEASE_SECONDS="10"`,
    `SMTP_TIMEOUT_SECONDS="1"`, `DB_POOL_MAX_SIZE="8"` (docs/reference.md, worker/core/settings.py).
    """
    env = {
        "DATABASE_URL": database_url,
        "SMTP_HOST": smtp_host,
        "SMTP_PORT": str(smtp_port),
        "SMTP_SECURITY": "none",
        "EMAIL_FROM": "Example <noreply@example.com>",
        "MESSAGE_ID_DOMAIN": "example.com",
        "GOOGLE_CLOUD_PROJECT": project,
        "DELIVERY_TOPIC": delivery_topic,
        "DEAD_LETTER_TOPIC": dead_letter_topic,
        "PUBSUB_EMULATOR_HOST": emulator_host,
        "PUBLISH_TIMEOUT_SECONDS": "10",
        "SEND_TRIES_PER_INVOCATION": "2",
        "RETRY_BACKOFF_SECONDS": "0.05",
        "RETRY_BACKOFF_MAX_SECONDS": "0.2",
        "LEASE_SECONDS": "30",
        "DB_POOL_MAX_SIZE": "8",
        "DB_TIMEOUT_SECONDS": "5",
    }
    env.update(extra)
    return env


class WorkerCluster:
    """`n` functions-framework processes serving `main.py` on 127.0.0.1, one port each.

    `env` is the whole worker configuration (see `worker_env`); `threads` sets gunicorn's
    threads per process (`THREADS`, functions-framework's default is 4 per CPU);
    `concurrency` sets `CONCURRENCY` and `THREADS` together, as the deploy does. Servers are
    addressed by index `0..n-1`; a restarted server keeps its index and port, so `urls` never
    changes. Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        n: int,
        env: Mapping[str, str],
        *,
        threads: int | None = None,
        concurrency: int | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one server")
        self.env = dict(env)
        if threads is not None:
            self.env["THREADS"] = str(threads)
        if concurrency is not None:
            # The deployed shape (deploy/deploy-function.sh): CONCURRENCY requests at once per
            # instance, as many gunicorn threads, the worker's pools sized from it.
            self.env["CONCURRENCY"] = self.env["THREADS"] = str(concurrency)
        self._servers = [FunctionServer(self.env) for _ in range(n)]
        self._lock = threading.Lock()
        self._kills = 0
        self._restarts = 0
        self._old_logs: list[str] = []

    # lifecycle

    def start(self, timeout: float = 60.0) -> Self:
        """Start every server (in parallel) and wait until each listens."""
        with ThreadPoolExecutor(len(self._servers)) as pool:
            futures = [pool.submit(server.start, timeout) for server in self._servers]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            self.stop()
            raise RuntimeError(f"worker cluster did not start: {failed[0]}") from failed[0]
        return self

    def stop(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL after 10 s) and delete their log dirs."""
        with ThreadPoolExecutor(len(self._servers)) as pool:
            list(pool.map(lambda server: server.stop(), self._servers))
        for server in self._servers:
            shutil.rmtree(server.log_path.parent, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # faults

    def kill(self, i: int) -> None:
        """Crash server `i`: SIGKILL its process group (gunicorn's arbiter and worker) at once,
        mid-request if it is serving one. No-op if it is not running."""
        server = self._servers[i]
        process, server.process = server.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        with self._lock:
            self._kills += 1

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Kill server `i` if it still runs, then start a fresh process on the same port."""
        self.kill(i)
        old = self._servers[i]
        self._old_logs.append(old.logs()[-20000:])
        shutil.rmtree(old.log_path.parent, ignore_errors=True)
        fresh = FunctionServer(self.env, port=old.port)
        self._servers[i] = fresh
        fresh.start(timeout)
        with self._lock:
            self._restarts += 1

    # observations

    def __len__(self) -> int:
        return len(self._servers)

    @property
    def urls(self) -> list[str]:
        """`http://127.0.0.1:PORT` of each server, by index; stable across restarts."""
        return [server.url for server in self._servers]

    def alive(self, i: int) -> bool:
        process = self._servers[i].process
        return process is not None and process.poll() is None

    @property
    def kills(self) -> int:
        return self._kills

    @property
    def restarts(self) -> int:
        return self._restarts

    def logs(self, i: int | None = None) -> str:
        """The log of server `i` (its current process), or of all servers when `i` is None,
        including the tails of processes that were killed or restarted."""
        if i is not None:
            return self._servers[i].logs()
        return "\n".join([*self._old_logs, *(server.logs() for server in self._servers)])


# --- Pub/Sub push -------------------------------------------------------------------------------


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class PushMessage:
    """One Pub/Sub message. All copies of it (redeliveries) keep its `message_id`."""

    data: bytes = field(repr=False)
    message_id: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    publish_time: str = field(default_factory=_now_rfc3339)

    def push_body(self, subscription: str) -> bytes:
        """The JSON body a push subscription POSTs, with the keys the emulator sends."""
        message = {
            "data": base64.b64encode(self.data).decode("ascii"),
            "attributes": dict(self.attributes),
            "messageId": self.message_id,
            "message_id": self.message_id,
            "publishTime": self.publish_time,
            "publish_time": self.publish_time,
        }
        return json.dumps({"message": message, "subscription": subscription}).encode()


_message_numbers = itertools.count(1)


def push_message(
    body: Mapping[str, Any] | bytes,
    *,
    message_id: str | None = None,
    attributes: Mapping[str, str] | None = None,
) -> PushMessage:
    """A message whose data is `body` (JSON-encoded unless already bytes); ids are unique in
    the process unless given."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    if message_id is None:
        message_id = f"{next(_message_numbers)}-{uuid.uuid4().hex[:8]}"
    return PushMessage(data=data, message_id=message_id, attributes=dict(attributes or {}))


@dataclass(frozen=True)
class CopyResult:
    """How one copy of a message went: acked (a 2xx) or gave up, after `posts` POSTs."""

    message_id: str
    acked: bool
    posts: int
    failures: tuple[str, ...]  # one entry per failed POST: "500", "ConnectionRefusedError", ...


@dataclass
class DeliveryReport:
    """What `deliver_all` did. `acked + gave_up == messages * copies`."""

    messages: int = 0
    copies: int = 0
    acked: int = 0
    gave_up: int = 0
    posts: int = 0
    retries: int = 0  # POSTs after a failed one (redeliveries)
    seconds: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)
    gave_up_ids: list[str] = field(default_factory=list)
    # Per server index: the most POSTs that were outstanding on it at one moment (sent and
    # not yet answered), i.e. how many requests that worker process had at once.
    peak_in_flight: dict[int, int] = field(default_factory=dict)

    @property
    def posts_per_second(self) -> float:
        return self.posts / self.seconds if self.seconds > 0 else 0.0

    def add(self, result: CopyResult) -> None:
        self.posts += result.posts
        self.retries += max(0, result.posts - 1)
        self.failures.update(result.failures)
        if result.acked:
            self.acked += 1
        else:
            self.gave_up += 1
            self.gave_up_ids.append(result.message_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "copies": self.copies,
            "acked": self.acked,
            "gave_up": self.gave_up,
            "posts": self.posts,
            "retries": self.retries,
            "seconds": round(self.seconds, 2),
            "posts_per_second": round(self.posts_per_second, 1),
            "failures": dict(self.failures.most_common()),
            "peak_in_flight": dict(sorted(self.peak_in_flight.items())),
        }

    def summary(self) -> str:
        failures = ", ".join(f"{k}={v}" for k, v in self.failures.most_common(6)) or "none"
        return (
            f"{self.messages} messages x {self.copies}: {self.acked} acked, "
            f"{self.gave_up} gave up, {self.posts} POSTs ({self.retries} retries) in "
            f"{self.seconds:.1f} s, {self.posts_per_second:.0f}/s; failures: {failures}"
        )


class _Stale(Exception):
    """A kept-alive connection the server had already closed: resend on a fresh one."""


class Deliverer:
    """Pushes messages to worker servers with Pub/Sub's at-least-once contract.

    `urls` are server base URLs, or a callable returning the current ones. A copy goes first to
    its assigned server; after a failure (non-2xx, connection error, `request_timeout`) it
    waits a jittered exponential backoff (`min_backoff` doubling up to `max_backoff`) and
    POSTs again to the next server, until a 2xx, `deadline` seconds after its first POST, or
    `max_posts` POSTs, whichever comes first. `cancel()` makes every copy give up at its next
    step. Each thread keeps one keep-alive connection per server.
    """

    def __init__(
        self,
        urls: Sequence[str] | Callable[[], Sequence[str]],
        *,
        project: str = "test-project",
        topic: str = "deliveries",
        subscription: str = "push",
        request_timeout: float = 60.0,
        deadline: float = 180.0,
        max_posts: int = 500,
        min_backoff: float = 0.05,
        max_backoff: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self._urls: Callable[[], Sequence[str]]
        if callable(urls):
            self._urls = urls
        else:
            fixed = list(urls)
            self._urls = lambda: fixed
        if not self._urls():
            raise ValueError("no servers to deliver to")
        self.path = f"/projects/{project}/topics/{topic}"
        self.subscription = (
            subscription
            if subscription.startswith("projects/")
            else f"projects/{project}/subscriptions/{subscription}"
        )
        self.request_timeout = request_timeout
        self.deadline = deadline
        self.max_posts = max_posts
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._random = random.Random(seed)
        self._cancelled = threading.Event()
        self._local = threading.local()
        self._connections: set[http.client.HTTPConnection] = set()
        self._connections_lock = threading.Lock()
        self._in_flight: Counter[int] = Counter()
        self._peaks: dict[int, int] = {}
        self._in_flight_lock = threading.Lock()

    # one POST

    def post(self, message: PushMessage, server: int) -> str:
        """POST one copy to server `server` (index, modulo the number of servers); the HTTP
        status as a string ("204"), or the error's class name ("ConnectionRefusedError",
        "TimeoutError"). Never raises for network errors."""
        return self.post_body(message.push_body(self.subscription), server)

    def post_body(self, body: bytes, server: int) -> str:
        """POST a ready-made body (e.g. a hand-built, malformed push) to server `server`."""
        urls = self._urls()
        index = server % len(urls)
        url = urls[index]
        with self._in_flight_lock:
            self._in_flight[index] += 1
            self._peaks[index] = max(self._peaks.get(index, 0), self._in_flight[index])
        try:
            try:
                return self._exchange(url, body, fresh=False)
            except _Stale:
                return self._exchange(url, body, fresh=True)
        except (OSError, http.client.HTTPException) as error:
            self._drop_connection(url)
            return "TimeoutError" if isinstance(error, TimeoutError) else type(error).__name__
        finally:
            with self._in_flight_lock:
                self._in_flight[index] -= 1

    def peak_in_flight(self) -> dict[int, int]:
        """Per server index, the most POSTs outstanding on it at once so far."""
        with self._in_flight_lock:
            return dict(self._peaks)

    def _exchange(self, url: str, body: bytes, *, fresh: bool) -> str:
        if fresh:
            self._drop_connection(url)
        connection, reused = self._connection(url)
        try:
            connection.request(
                "POST",
                self.path,
                body=body,
                headers={"Content-Type": "application/json", "User-Agent": "harness-deliverer"},
            )
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if reused:
                # Keep-alive race: the server closed an idle connection as we reused it.
                raise _Stale from None
            raise
        response.read()
        if response.will_close:
            self._drop_connection(url)
        return str(response.status)

    def _connection(self, url: str) -> tuple[http.client.HTTPConnection, bool]:
        pool: dict[str, http.client.HTTPConnection] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        connection = pool.get(url)
        if connection is not None:
            return connection, True
        parts = urlsplit(url)
        connection = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=self.request_timeout
        )
        pool[url] = connection
        with self._connections_lock:
            self._connections.add(connection)
        return connection, False

    def _drop_connection(self, url: str) -> None:
        pool: dict[str, http.client.HTTPConnection] | None = getattr(self._local, "pool", None)
        connection = pool.pop(url, None) if pool is not None else None
        if connection is not None:
            connection.close()
            with self._connections_lock:
                self._connections.discard(connection)

    # one copy, until acked

    def deliver(self, message: PushMessage, *, server: int = 0) -> CopyResult:
        """Deliver one copy, first to server `server`, redelivering until acked or bounded."""
        body = message.push_body(self.subscription)
        failures: list[str] = []
        started = time.monotonic()
        attempt = 0
        while not self._cancelled.is_set():
            outcome = self.post_body(body, server + attempt)
            attempt += 1
            if outcome.isdigit() and outcome.startswith("2"):
                return CopyResult(message.message_id, True, attempt, tuple(failures))
            failures.append(outcome)
            if attempt >= self.max_posts or time.monotonic() - started >= self.deadline:
                break
            ceiling = min(self.max_backoff, self.min_backoff * 2 ** min(attempt - 1, 20))
            if self._cancelled.wait(self._random.uniform(self.min_backoff, ceiling)):
                break
        return CopyResult(message.message_id, False, attempt, tuple(failures))

    # many messages, many copies

    def deliver_all(
        self,
        messages: Iterable[PushMessage],
        *,
        copies: int = 3,
        concurrency: int = 24,
        rate: float | None = None,
        on_result: Callable[[CopyResult], None] | None = None,
    ) -> DeliveryReport:
        """Deliver every message `copies` times; block until each copy is acked or gave up.

        The copies of one message start together, each on a different server (message `k`,
        copy `c` goes first to server `k + c`; with more copies than servers some share one).
        `concurrency` threads do the work; `rate` (messages per second) paces the start of
        messages for an open-loop load, otherwise they start as fast as threads free up.
        `on_result` is called (from worker threads) with each finished copy. Run one
        `deliver_all` at a time per `Deliverer`: it closes its connections when it returns.
        """
        if copies < 1 or concurrency < 1:
            raise ValueError("copies and concurrency must be at least 1")
        report = DeliveryReport(copies=copies)
        lock = threading.Lock()

        def run(message: PushMessage, server: int) -> None:
            result = self.deliver(message, server=server)
            with lock:
                report.add(result)
            if on_result is not None:
                on_result(result)

        started = time.monotonic()
        with self._in_flight_lock:
            self._peaks = {}
        with ThreadPoolExecutor(concurrency, thread_name_prefix="deliverer") as pool:
            futures: list[Future[None]] = []
            for k, message in enumerate(messages):
                if rate is not None:
                    wait = started + k / rate - time.monotonic()
                    if wait > 0 and self._cancelled.wait(wait):
                        break
                report.messages += 1
                futures.extend(pool.submit(run, message, k + c) for c in range(copies))
            for future in futures:
                future.result()
        report.seconds = time.monotonic() - started
        report.peak_in_flight = self.peak_in_flight()
        self.close()
        return report

    def cancel(self) -> None:
        """Make every copy in flight give up at its next step (and new ones at once)."""
        self._cancelled.set()

    def close(self) -> None:
        """Close the kept-alive connections of every thread."""
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            connection.close()
