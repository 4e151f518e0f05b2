"""Delivery events for the benchmarks, and a small keep-alive HTTP load driver.

Events rotate through the three workflows (so every template is rendered) with distinct
delivery ids and recipients, built with tests/factories.py as the tests build them.
"""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests import factories

WORKFLOWS = ("verification-code", "invite", "password-reset")
PROJECT = "bench-project"
TOPIC = "email-delivery"
EMAIL_FROM = "Bench <noreply@bench.example.com>"


def bodies(count: int, prefix: str) -> list[dict[str, Any]]:
    """`count` valid delivery payloads with ids `<prefix>-0000000`, ..."""
    return [
        factories.payload(
            WORKFLOWS[index % len(WORKFLOWS)],
            delivery_id=f"{prefix}-{index:07d}",
            recipient=f"user{index}@example.com",
            metadata={"tenant": "bench", "n": index},
        )
        for index in range(count)
    ]


def cloud_event(body: dict[str, Any], message_id: str) -> Any:
    """The Eventarc CloudEvent object the function receives in process."""
    return factories.cloud_event(body, message_id=message_id)


def worker_env(
    *, database_url: str, smtp_port: int, emulator_host: str = "127.0.0.1:1"
) -> dict[str, str]:
    """The environment of a function instance talking to the benchmark's services.

    No Pub/Sub call happens on the happy path; `emulator_host` only has to be well-formed.
    """
    return {
        "DATABASE_URL": database_url,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_SECURITY": "none",
        "EMAIL_FROM": EMAIL_FROM,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "DELIVERY_TOPIC": TOPIC,
        "DEAD_LETTER_TOPIC": "email-dead-letter",
        "PUBSUB_EMULATOR_HOST": emulator_host,
        "LEASE_SECONDS": "60",
    }


# --- HTTP bodies -------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    path: str
    headers: dict[str, str]
    body: bytes


def _message(body: dict[str, Any], message_id: str) -> dict[str, Any]:
    return {
        "data": base64.b64encode(factories.encode(body)).decode(),
        "attributes": {},
        "messageId": message_id,
        "publishTime": factories.publish_time(),
    }


def cloud_event_request(body: dict[str, Any], message_id: str) -> HttpRequest:
    """A binary-mode CloudEvent, as Eventarc POSTs it in production."""
    envelope = {
        "message": _message(body, message_id),
        "subscription": f"projects/{PROJECT}/subscriptions/eventarc-sub",
    }
    headers = {
        "Content-Type": "application/json",
        "ce-id": message_id,
        "ce-specversion": "1.0",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "ce-source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{TOPIC}",
    }
    return HttpRequest("/", headers, json.dumps(envelope).encode())


def push_request(body: dict[str, Any], message_id: str) -> HttpRequest:
    """A raw Pub/Sub push (the emulator's shape); functions-framework converts it."""
    envelope = {
        "message": _message(body, message_id),
        "subscription": f"projects/{PROJECT}/subscriptions/push-sub",
    }
    return HttpRequest(
        f"/projects/{PROJECT}/topics/{TOPIC}",
        {"Content-Type": "application/json"},
        json.dumps(envelope).encode(),
    )


# --- the driver ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    reconnects: int = 0

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: LoadResult) -> None:
        """Add a later batch's figures (its wall time adds to ours)."""
        self.requests += other.requests
        self.seconds += other.seconds
        self.statuses.update(other.statuses)
        self.latencies_ms.extend(other.latencies_ms)
        self.reconnects += other.reconnects

    def latency(self, quantile: float) -> float:
        if not self.latencies_ms:
            return 0.0
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0]
        cuts = statistics.quantiles(self.latencies_ms, n=100, method="inclusive")
        return cuts[max(0, min(98, round(quantile * 100) - 1))]


def drive(
    port: int, requests: Sequence[HttpRequest], concurrency: int, timeout: float = 60.0
) -> LoadResult:
    """POST every request once over `concurrency` keep-alive connections (one thread each)."""
    result = LoadResult(requests=len(requests), seconds=0.0)
    lock = threading.Lock()

    def run(share: Sequence[HttpRequest]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        reconnects = 0
        try:
            for request in share:
                for attempt in (1, 2):
                    started = time.perf_counter()
                    try:
                        connection.request("POST", request.path, request.body, request.headers)
                        response = connection.getresponse()
                        response.read()
                    except (http.client.HTTPException, ConnectionError):
                        connection.close()  # the server dropped a kept-alive connection
                        reconnects += 1
                        if attempt == 2:
                            statuses[0] += 1
                        continue
                    latencies.append((time.perf_counter() - started) * 1000)
                    statuses[response.status] += 1
                    break
        finally:
            connection.close()
            with lock:
                result.statuses.update(statuses)
                result.latencies_ms.extend(latencies)
                result.reconnects += reconnects

    shares = [requests[index::concurrency] for index in range(concurrency)]
    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result
