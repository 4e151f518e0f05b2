"""The Cloud Functions: `handle_delivery`, triggered by the delivery topic (Eventarc), and
`handle_provider_event`, the providers' webhooks (HTTP, worker/providers/), and
`delivery_console`, the read-only support console (HTTP, worker/console/).

All three deploy from this source, each with only its own settings: importing this module parses
the settings of the target being served (`FUNCTION_TARGET`, which Cloud Functions and
functions-framework set before loading the source; a missing or bad one stops the instance
with one line) but opens no connection and does not import the Pub/Sub client. The delivery
target never imports the provider adapters (or their crypto); the database pool and SMTP
connection are made on first use.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import flask
import functions_framework
from werkzeug.exceptions import ServiceUnavailable

from worker.core import tracing
from worker.core.logging import request_scope
from worker.core.settings import SettingsError
from worker.delivery import pipeline

WEBHOOK_TARGET = "handle_provider_event"
CONSOLE_TARGET = "delivery_console"
TARGET = os.environ.get("FUNCTION_TARGET", "handle_delivery")


def _configure() -> None:
    """Parse the served target's settings, importing only that target's wing."""
    if TARGET == WEBHOOK_TARGET:
        from worker.providers import webhook

        webhook.INSTANCE.configure()
    elif TARGET == CONSOLE_TARGET:
        from worker.console import app as console_app

        console_app.INSTANCE.configure()
    else:
        pipeline.INSTANCE.configure()


try:
    _configure()
except SettingsError as error:
    print(f"email-worker: configuration error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


@functions_framework.cloud_event
def handle_delivery(cloud_event: Any) -> None:
    """Returns when the delivery is finished (ack); raises so Pub/Sub redelivers it."""
    # Lines carry the trace of the request Cloud Run forwarded (when the CloudEvent has none)
    # and functions-framework's execution id.
    # (Called outside a request, as the cold-start benchmark does, there are no headers.)
    headers: tracing.Headers = flask.request.headers if flask.has_request_context() else {}
    with request_scope(
        project=pipeline.INSTANCE.configure().pubsub.project,
        trace=tracing.trace_from_headers(headers),
        execution_id=headers.get("Function-Execution-Id"),
    ):
        try:
            pipeline.handle(cloud_event)
        except pipeline.RetryLater as retry_later:
            # An expected "not yet": answer 503 (Pub/Sub redelivers with backoff) without the
            # framework's crash traceback; the worker already logged why. Other exceptions are
            # bugs or outages (database down) and keep their traceback.
            raise ServiceUnavailable(str(retry_later)) from None


@functions_framework.http
def handle_provider_event(request: Any) -> tuple[dict[str, Any], int]:
    """`POST …/<provider>`: verify, apply each event, answer (see worker/providers/webhook.py)."""
    from worker.providers import webhook  # the webhook path only

    provider = request.path.rstrip("/").rpartition("/")[2]
    # Its lines carry the request's trace and execution id too (no Pub/Sub project here: the
    # trace is named only when GOOGLE_CLOUD_PROJECT is set).
    with request_scope(
        project=os.environ.get("GOOGLE_CLOUD_PROJECT"),
        trace=tracing.trace_from_headers(request.headers),
        execution_id=request.headers.get("Function-Execution-Id"),
    ):
        answer = webhook.INSTANCE.get().handle(
            request.method,
            webhook.request_from(provider, request.url, request.headers, request.get_data()),
        )
    return dict(answer.body), answer.status


@functions_framework.http
def delivery_console(request: Any) -> Any:
    """The support console's pages and JSON API (GET only; see worker/console/app.py)."""
    from worker.console import app  # only this target loads the console

    return app.INSTANCE.get().handle(request)
