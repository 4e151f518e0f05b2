"""One JSON object per line on stdout, in Cloud Logging's structured format.

Cloud Logging reads `severity`, `message`, `logging.googleapis.com/trace` and
`logging.googleapis.com/labels` from each line. `request_scope()` (main.py) adds the HTTP
request's trace, when the event carried none, and its execution id to every line.
Per-event fields (`delivery_id`, `workflow`, `attempt`, `message_id`) are bound with
`bind_event()` and cleared by `clear_event()`. Redaction runs last, on every line: values
under sensitive keys are dropped and addresses and URLs in any string are masked, so a
careless `log.info(..., url=...)` cannot leak a reset link.

The worker logs with four methods (`debug`, `info`, `warning`, `error`) and keyword fields,
so this is a few dozen lines rather than a logging library: structlog's processor chain
cost about as much CPU per line as rendering an email.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from worker.core.instance import Lazy
from worker.core.redact import mask_links_and_addresses
from worker.core.settings import SettingsError, log_level

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
TRACE_KEY = "logging.googleapis.com/trace"
LABELS_KEY = "logging.googleapis.com/labels"
# Ids that only look like addresses (`<inv_2f6c9d1e@example.com>`): kept as they are, so a
# log line can be matched to the email and the ledger row.
VERBATIM_KEYS = frozenset({TRACE_KEY, "provider_message_id", "message_id", "delivery_id"})


# Per request thread (gunicorn serves CONCURRENCY requests at once in one process): what the
# HTTP request adds, and the fields bound for the event being handled.
@dataclass(frozen=True)
class _Request:
    """What the HTTP request that carried an event adds to every line logged while it runs."""

    trace: str | None  # full resource name: projects/P/traces/T
    execution_id: str | None


_request: ContextVar[_Request | None] = ContextVar("email_worker_request", default=None)
_NOTHING_BOUND: Mapping[str, Any] = MappingProxyType({})
_bound: ContextVar[Mapping[str, Any]] = ContextVar("email_worker_bound", default=_NOTHING_BOUND)

# One line, one write: `print` writes the text and its newline separately, so with several
# request threads two JSON lines could share a line and Cloud Logging would parse neither.
_write_lock = threading.Lock()


def _write(line: str) -> None:
    """To whatever `sys.stdout` is now (tests swap it), flushed at once."""
    with _write_lock:
        stream = sys.stdout
        stream.write(line)
        stream.flush()


class Logger:
    """`log.info("delivery sent", attempts=1)`: the message, the bound fields, the request's."""

    def __init__(self, level: int) -> None:
        self.level = level

    def debug(self, message: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, "DEBUG", message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self._emit(logging.INFO, "INFO", message, fields)

    def warning(self, message: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "WARNING", message, fields)

    def error(self, message: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "ERROR", message, fields)

    def _emit(self, level: int, severity: str, message: str, fields: dict[str, Any]) -> None:
        if level < self.level:
            return
        # What the call names wins over what is bound; then the request's trace and labels.
        line = {**_bound.get(), **fields}
        _add_request_fields(line)
        line["severity"] = severity
        line["time"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line["message"] = message
        _write(json.dumps(_redact(line), default=str) + "\n")


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_links_and_addresses(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items() if k not in SENSITIVE_KEYS}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _add_request_fields(line: dict[str, Any]) -> None:
    """The request's trace, unless the event carried its own, and its execution id.

    functions-framework's LOG_EXECUTION_ID adds the execution id too (and the span id), by
    swapping the process-wide `sys.stdout` while a request runs; with several requests at
    once a request ending can restore the plain stream under another that is still running.
    Adding it here, per thread, labels every line whatever the framework does.
    """
    request = _request.get()
    if request is None:
        return
    if request.trace is not None and TRACE_KEY not in line:
        line[TRACE_KEY] = request.trace
    if request.execution_id is not None:
        labels = line.get(LABELS_KEY)
        line[LABELS_KEY] = {
            **(labels if isinstance(labels, Mapping) else {}),
            "execution_id": request.execution_id,
        }


def _redact(line: dict[str, Any]) -> dict[str, Any]:
    for key, value in line.items():
        if key.lower() in SENSITIVE_KEYS:
            line[key] = "[redacted]"
        elif key not in VERBATIM_KEYS:
            line[key] = _redact_value(value)
    return line


def _make_logger() -> Logger:
    """Its level is `LOG_LEVEL`, read once; a malformed `LOG_LEVEL` means `INFO` here, and
    `load_settings` stops the instance with one line naming it."""
    try:
        level = log_level()
    except SettingsError:
        level = "INFO"
    return Logger(logging.getLevelNamesMapping().get(level.upper(), logging.INFO))


_LOGGER = Lazy(_make_logger)


def get_logger() -> Logger:
    """The process's logger."""
    return _LOGGER.get()


def bind_event(*, project: str | None = None, trace: str | None = None, **fields: Any) -> None:
    """Bind per-event fields (and the trace, if the event carried one) to every log line."""
    if trace and project:
        fields[TRACE_KEY] = f"projects/{project}/traces/{trace}"
    _bound.set(fields)


def bind(**fields: Any) -> None:
    _bound.set({**_bound.get(), **fields})


def clear_event() -> None:
    _bound.set(_NOTHING_BOUND)


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
