"""structlog, one JSON object per line on stdout, in Cloud Logging's structured format.

Cloud Logging reads `severity`, `message`, `logging.googleapis.com/trace` and
`logging.googleapis.com/labels` from each line. `request_scope()` (main.py) adds the HTTP
request's trace, when the event carried none, and its execution id to every line.
Per-event fields (`delivery_id`, `workflow`, `attempt`, `message_id`) are bound with
`bind_event()` and cleared by `clear_event()`. Redaction runs last, on every line: values
under sensitive keys are dropped and addresses and URLs in any string are masked, so a
careless `log.info(..., url=...)` cannot leak a reset link.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog

from worker.redact import mask_links_and_addresses
from worker.settings import SettingsError, log_level

SENSITIVE_KEYS = frozenset(
    {
        "code",
        "data",
        "password",
        "secret",
        "token",
        "url",
        "invite_url",
        "reset_url",
        "html",
        "text",
        "body",
        "authorization",
        "database_url",
    }
)
_SEVERITY = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "warn": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}
TRACE_KEY = "logging.googleapis.com/trace"
LABELS_KEY = "logging.googleapis.com/labels"
# Ids that only look like addresses (`<inv_2f6c9d1e@example.com>`): kept as they are, so a
# log line can be matched to the email and the ledger row.
VERBATIM_KEYS = frozenset({TRACE_KEY, "provider_message_id", "message_id", "delivery_id"})

_configured = False


@dataclass(frozen=True)
class _Request:
    """What the HTTP request that carried an event adds to every line logged while it runs."""

    trace: str | None  # full resource name: projects/P/traces/T
    execution_id: str | None


# Per request thread (gunicorn serves CONCURRENCY requests at once in one process); apart from
# structlog's context so that `bind_event`/`clear_event` leave it alone.
_request: ContextVar[_Request | None] = ContextVar("email_worker_request", default=None)


# One line, one write: `print` writes the text and its newline separately, so with several
# request threads two JSON lines could share a line and Cloud Logging would parse neither.
_write_lock = threading.Lock()


class _StdoutLogger:
    """Writes each line to whatever `sys.stdout` is now (tests swap it), flushed at once."""

    def msg(self, message: str) -> None:
        line = message + "\n"
        with _write_lock:
            stream = sys.stdout
            stream.write(line)
            stream.flush()

    debug = info = warning = warn = error = critical = exception = log = msg


def _severity(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["severity"] = _SEVERITY.get(method, "DEFAULT")
    return event


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_links_and_addresses(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items() if k not in SENSITIVE_KEYS}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _request_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The request's trace, unless the event carried its own, and its execution id.

    functions-framework's LOG_EXECUTION_ID adds the execution id too (and the span id), by
    swapping the process-wide `sys.stdout` while a request runs; with several requests at
    once a request ending can restore the plain stream under another that is still running.
    Adding it here, per thread, labels every line whatever the framework does.
    """
    request = _request.get()
    if request is None:
        return event
    if request.trace is not None and TRACE_KEY not in event:
        event[TRACE_KEY] = request.trace
    if request.execution_id is not None:
        labels = event.get(LABELS_KEY)
        event[LABELS_KEY] = {
            **(labels if isinstance(labels, Mapping) else {}),
            "execution_id": request.execution_id,
        }
    return event


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in SENSITIVE_KEYS:
            event[key] = "[redacted]"
        elif key not in VERBATIM_KEYS:
            event[key] = _redact_value(event[key])
    return event


def configure_logging(level: str | None = None) -> None:
    """Idempotent: the first call wins (a warm instance configures once). The level is
    `LOG_LEVEL` unless given; a malformed `LOG_LEVEL` means `INFO` here, and `load_settings`
    stops the instance with one line naming it."""
    global _configured
    if _configured:
        return
    if level is None:
        try:
            level = log_level()
        except SettingsError:
            level = "INFO"
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _request_fields,
            structlog.processors.add_log_level,
            _severity,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            _redact,
            structlog.processors.JSONRenderer(serializer=json.dumps, default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=lambda *_: _StdoutLogger(),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger() -> Any:
    configure_logging()
    return structlog.get_logger()


def bind_event(*, project: str | None = None, trace: str | None = None, **fields: Any) -> None:
    """Bind per-event fields (and the trace, if the event carried one) to every log line."""
    structlog.contextvars.clear_contextvars()
    if trace and project:
        fields[TRACE_KEY] = f"projects/{project}/traces/{trace}"
    structlog.contextvars.bind_contextvars(**fields)


def bind(**fields: Any) -> None:
    structlog.contextvars.bind_contextvars(**fields)


def clear_event() -> None:
    structlog.contextvars.clear_contextvars()


@contextmanager
def request_scope(
    *, project: str | None, trace: str | None, execution_id: str | None
) -> Iterator[None]:
    """Every line logged inside carries the request's trace (when the event has none) and its
    execution id (functions-framework's `Function-Execution-Id`)."""
    resource = f"projects/{project}/traces/{trace}" if trace and project else None
    token = _request.set(_Request(trace=resource, execution_id=execution_id or None))
    try:
        yield
    finally:
        _request.reset(token)
