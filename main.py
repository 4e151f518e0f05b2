"""The Cloud Function: `handle_delivery`, triggered by the delivery topic (Eventarc).

Thin on purpose: the work is in worker/pipeline.py. Importing this module parses the
settings (a missing one stops the instance with one line) but opens no connection and does
not import the Pub/Sub client; the database pool and SMTP connection are made on first use.
"""

from __future__ import annotations

import sys
from typing import Any

import flask
import functions_framework
from werkzeug.exceptions import ServiceUnavailable

from worker import events, pipeline
from worker.logging import request_scope
from worker.settings import SettingsError

try:
    pipeline.configure()
except SettingsError as error:
    print(f"email-worker: configuration error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


@functions_framework.cloud_event
def handle_delivery(cloud_event: Any) -> None:
    """Returns when the delivery is finished (ack); raises so Pub/Sub redelivers it."""
    # Lines carry the trace of the request Cloud Run forwarded (when the CloudEvent has none)
    # and functions-framework's execution id.
    # (Called outside a request, as the cold-start benchmark does, there are no headers.)
    headers: events.Headers = flask.request.headers if flask.has_request_context() else {}
    with request_scope(
        project=pipeline.configure().pubsub.project,
        trace=events.trace_from_headers(headers),
        execution_id=headers.get("Function-Execution-Id"),
    ):
        try:
            pipeline.handle(cloud_event)
        except pipeline.RetryLater as retry_later:
            # An expected "not yet": answer 503 (Pub/Sub redelivers with backoff) without the
            # framework's crash traceback; the worker already logged why. Other exceptions are
            # bugs or outages (database down) and keep their traceback.
            raise ServiceUnavailable(str(retry_later)) from None
