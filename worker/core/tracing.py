"""The trace a request belongs to, so every log line of it groups under one trace in Cloud
Logging: W3C `traceparent` or Google's `X-Cloud-Trace-Context`, as Cloud Run forwards them
(and as a CloudEvent may carry `traceparent`)."""

from __future__ import annotations

import re
from typing import Any, Protocol

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
# TRACE_ID/SPAN_ID;o=OPTIONS, the span and options optional (Cloud Trace's legacy header).
_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/[0-9]{1,20})?(?:;o=[0-9]+)?")


def trace_id(traceparent: Any) -> str | None:
    if not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    # An all-zero trace id is invalid per W3C Trace Context.
    if match is None or set(match.group(1)) == {"0"}:
        return None
    return match.group(1)


class Headers(Protocol):
    """Request headers looked up by name (werkzeug's `Headers`, a dict)."""

    def get(self, key: str, /) -> str | None: ...


def trace_from_headers(headers: Headers) -> str | None:
    """The trace id of the HTTP request that carried the event, when the CloudEvent has none:
    W3C `traceparent` first, then Google's `X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=1`
    (Cloud Run adds one or both to every request it forwards)."""
    trace = trace_id(headers.get("traceparent"))
    if trace is not None:
        return trace
    cloud = headers.get("X-Cloud-Trace-Context")
    if not isinstance(cloud, str):
        return None
    match = _CLOUD_TRACE.fullmatch(cloud.strip())
    if match is None or set(match.group(1)) == {"0"}:
        return None
    return match.group(1).lower()
