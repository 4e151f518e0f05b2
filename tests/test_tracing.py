"""Traces and execution ids on the worker's log lines, through a real functions-framework
server configured as the deploy configures it (LOG_EXECUTION_ID=true, THREADS=CONCURRENCY=8).

Cloud Run forwards each push with a `traceparent` and/or `X-Cloud-Trace-Context` header and
functions-framework gives it a `Function-Execution-Id`; the CloudEvent itself has a
`traceparent` extension only when Eventarc carried one. Every line of a delivery must name
the request's trace (the event's own, if it has one) and its execution id, also when the
instance serves several requests at once.
"""

from __future__ import annotations

import base64
import http.client
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests import factories
from tests.harness.function import FunctionServer
from tests.harness.smtp import SmtpTestServer

PROJECT = "trace-project"
TOPIC = "deliveries"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACE_KEY = "logging.googleapis.com/trace"
LABELS_KEY = "logging.googleapis.com/labels"


def start_function(
    database_url: str, smtp_server: SmtpTestServer, *, log_execution_id: bool
) -> FunctionServer:
    return FunctionServer(
        {
            "DATABASE_URL": database_url,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_server.port),
            "SMTP_SECURITY": "none",
            "EMAIL_FROM": "Example <noreply@example.com>",
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "DELIVERY_TOPIC": TOPIC,
            "DEAD_LETTER_TOPIC": "dead-letters",
            # Nothing here dead-letters; a publish would go to a closed local port.
            "PUBSUB_EMULATOR_HOST": "127.0.0.1:9",
            "LOG_EXECUTION_ID": str(log_execution_id).lower(),
            "CONCURRENCY": "8",
            "THREADS": "8",
        }
    ).start()


@pytest.fixture
def function(database_url: str, smtp_server: SmtpTestServer) -> Iterator[FunctionServer]:
    """As deployed: LOG_EXECUTION_ID=true."""
    server = start_function(database_url, smtp_server, log_execution_id=True)
    yield server
    server.stop()


@pytest.fixture(params=[True, False], ids=["LOG_EXECUTION_ID=true", "LOG_EXECUTION_ID=false"])
def either_function(
    request: pytest.FixtureRequest, database_url: str, smtp_server: SmtpTestServer
) -> Iterator[FunctionServer]:
    """With or without functions-framework's own execution-id logging: the worker labels its
    lines itself, per request thread, so neither depends on the framework's stdout swap."""
    server = start_function(database_url, smtp_server, log_execution_id=request.param)
    yield server
    server.stop()


def push_body(delivery_id: str) -> bytes:
    data = factories.encode(factories.payload("verification-code", delivery_id=delivery_id))
    message = {"data": base64.b64encode(data).decode(), "messageId": uuid.uuid4().hex}
    return json.dumps(
        {"message": message, "subscription": f"projects/{PROJECT}/subscriptions/push"}
    ).encode()


def post(server: FunctionServer, body: bytes, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(
            "POST",
            f"/projects/{PROJECT}/topics/{TOPIC}",
            body=body,
            headers={"Content-Type": "application/json", **headers},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def lines_for(server: FunctionServer, delivery_id: str) -> list[dict[str, Any]]:
    lines = []
    for text in server.logs().splitlines():
        if text.startswith("{"):
            line = json.loads(text)
            if line.get("delivery_id") == delivery_id:
                lines.append(line)
    assert lines, f"no log line for {delivery_id}"
    assert any(line["message"] == "delivery sent" for line in lines), lines
    return lines


def traces(lines: list[dict[str, Any]]) -> set[str | None]:
    return {line.get(TRACE_KEY) for line in lines}


def execution_ids(lines: list[dict[str, Any]]) -> set[str | None]:
    return {line.get(LABELS_KEY, {}).get("execution_id") for line in lines}


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"},
        {"X-Cloud-Trace-Context": f"{TRACE.upper()}/1234567890;o=1"},
        {"X-Cloud-Trace-Context": TRACE},
        # Both: W3C first (Cloud Run sends the same trace in both).
        {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "X-Cloud-Trace-Context": OTHER_TRACE},
    ],
    ids=["traceparent", "x-cloud-trace-context", "trace-id-only", "both"],
)
def test_lines_carry_the_request_headers_trace(
    function: FunctionServer, headers: dict[str, str]
) -> None:
    delivery_id = f"trace_{uuid.uuid4().hex[:10]}"
    assert post(function, push_body(delivery_id), headers) == 200
    assert traces(lines_for(function, delivery_id)) == {f"projects/{PROJECT}/traces/{TRACE}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
        {"X-Cloud-Trace-Context": "junk"},
    ],
    ids=["none", "all-zero", "malformed"],
)
def test_no_usable_trace_means_no_trace_field(
    function: FunctionServer, headers: dict[str, str]
) -> None:
    delivery_id = f"notrace_{uuid.uuid4().hex[:10]}"
    assert post(function, push_body(delivery_id), headers) == 200
    assert traces(lines_for(function, delivery_id)) == {None}


def test_the_cloud_events_own_trace_wins_over_the_headers(function: FunctionServer) -> None:
    """Eventarc's binary-mode CloudEvent with a `traceparent` extension (the publisher's)."""
    delivery_id = f"cetrace_{uuid.uuid4().hex[:10]}"
    envelope = json.loads(push_body(delivery_id))
    headers = {
        "ce-id": uuid.uuid4().hex,
        "ce-source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{TOPIC}",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "ce-specversion": "1.0",
        "ce-traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
        "traceparent": f"00-{OTHER_TRACE}-00f067aa0ba902b7-01",
    }
    assert post(function, json.dumps(envelope).encode(), headers) == 200
    assert traces(lines_for(function, delivery_id)) == {f"projects/{PROJECT}/traces/{TRACE}"}


def test_concurrent_requests_keep_their_own_execution_id_and_trace(
    either_function: FunctionServer, smtp_server: SmtpTestServer
) -> None:
    """8 requests at once in one process (a slow relay keeps them overlapping): each line
    names its own request's execution id and trace, none another's, none missing."""
    function = either_function
    smtp_server.delay(0.3)
    requests = {
        f"conc_{k}_{uuid.uuid4().hex[:8]}": (f"exec{k:08d}", f"{k + 1:032x}") for k in range(8)
    }

    def send(delivery_id: str) -> int:
        execution_id, trace = requests[delivery_id]
        return post(
            function,
            push_body(delivery_id),
            {
                "Function-Execution-Id": execution_id,
                "X-Cloud-Trace-Context": f"{trace}/1;o=1",
            },
        )

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            statuses = list(pool.map(send, requests))
    finally:
        smtp_server.delay(0.0)
    assert statuses == [200] * len(requests)
    for delivery_id, (execution_id, trace) in requests.items():
        lines = lines_for(function, delivery_id)
        assert execution_ids(lines) == {execution_id}, lines
        assert traces(lines) == {f"projects/{PROJECT}/traces/{trace}"}, lines


def test_an_execution_id_is_made_when_the_request_has_none(
    either_function: FunctionServer,
) -> None:
    function = either_function
    delivery_id = f"noexec_{uuid.uuid4().hex[:10]}"
    assert post(function, push_body(delivery_id), {}) == 200
    (execution_id,) = execution_ids(lines_for(function, delivery_id))
    assert isinstance(execution_id, str) and len(execution_id) == 12
