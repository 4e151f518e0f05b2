"""One delivery event, start to finish: decode, claim, render, send, record.

The order is what makes "one email per delivery_id" hold:
  1. the claim is durable in PostgreSQL before anything is sent (no claim, no email);
  2. the email is sent with the claim held (a lease, fenced by a claim token);
  3. the outcome is recorded with a statement guarded by that token.
A dead letter is published and confirmed before the ledger says so. Every failure either
returns (the event is finished, and the ledger says why) or raises `RetryLater`, so Pub/Sub
redelivers it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import tenacity

from worker import deadletter, events, smtp
from worker.db import shared_pool
from worker.deadletter import Reason
from worker.ledger import Claim, Failure, Ledger
from worker.logging import bind, bind_event, clear_event, get_logger
from worker.pubsub import PublishError
from worker.redact import mask_email, sanitise
from worker.rendering import Renderer, TemplateError
from worker.settings import Settings, load_settings

T = TypeVar("T")
# Slack between the last SMTP attempt's worst-case end and the lease's expiry.
LEASE_MARGIN_SECONDS = 1.0
log = get_logger()


class RetryLater(Exception):
    """Raised to Pub/Sub: nack, redeliver later. The ledger already says why."""


@dataclass
class Worker:
    """What one instance keeps between invocations."""

    settings: Settings
    ledger: Ledger
    sender: smtp.SmtpSender
    renderer: Renderer

    @classmethod
    def from_settings(cls, settings: Settings) -> Worker:
        return cls(
            settings=settings,
            ledger=Ledger(shared_pool(settings.database)),
            sender=smtp.SmtpSender(settings.smtp),
            renderer=Renderer(),
        )


_settings: Settings | None = None
_worker: Worker | None = None
_lock = threading.Lock()


def configure() -> Settings:
    """Parse the settings (raises `SettingsError`); opens no connection."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def instance() -> Worker:
    """The instance's worker, made on first use: the pool and SMTP connect lazily."""
    global _worker
    if _worker is None:
        with _lock:
            if _worker is None:
                _worker = Worker.from_settings(configure())
    return _worker


def handle(cloud_event: Any, worker: Worker | None = None) -> None:
    """The function body: returns when the event is finished, raises `RetryLater` if not."""
    worker = worker or instance()
    try:
        try:
            event = events.decode(cloud_event)
        except events.InvalidEvent as invalid:
            reject(worker, invalid)
            return
        bind_event(
            project=worker.settings.pubsub.project,
            trace=event.message.trace,
            delivery_id=event.delivery_id,
            workflow=event.workflow,
            recipient=mask_email(event.recipient),
            message_id=event.message.message_id,
        )
        deliver(worker, event)
    finally:
        clear_event()


# --- the happy path and its failures ------------------------------------------------------


def deliver(worker: Worker, event: events.DeliveryEvent) -> None:
    started = time.monotonic()
    retry = worker.settings.retry
    claim = worker.ledger.claim(
        delivery_id=event.delivery_id,
        workflow=event.workflow,
        recipient=event.recipient,
        locale=event.locale,
        metadata=event.metadata,
        source_message_id=event.message.message_id,
        lease_seconds=retry.lease_seconds,
    )
    if claim is None:
        settle_unclaimed(worker, event)
        return
    bind(attempt=claim.attempts)
    budget = retry.max_attempts - claim.attempts + 1
    if budget < 1:
        # Claims that never finished (lease expiries) used the budget up.
        failure = Failure("ATTEMPTS_EXHAUSTED", "no send attempts left", Reason.retries_exhausted)
        dead_letter(worker, event, claim, claim.attempts, failure)
        return

    try:
        rendered = worker.renderer.render(event)
    except TemplateError as template_error:
        failure = Failure("TEMPLATE_ERROR", sanitise(str(template_error)), Reason.permanent_failure)
        dead_letter(worker, event, claim, claim.attempts, failure)
        return

    message = smtp.build_message(
        worker.settings.smtp,
        delivery_id=event.delivery_id,
        recipient=event.recipient,
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
    )
    result = smtp.send_with_retry(
        worker.sender,
        message,
        tries=min(retry.tries_per_invocation, budget),
        initial_backoff=retry.initial_backoff_seconds,
        max_backoff=retry.max_backoff_seconds,
        on_retry=_log_retry(claim),
        deadline=_last_start_within_lease(worker, started),
    )
    attempts = claim.attempts + result.attempts - 1
    if result.error is None:
        record_sent(worker, claim, attempts, message.message_id, started)
        return

    error = result.error
    if not error.transient:
        failure = Failure(error.code, error.message, Reason.permanent_failure)
        dead_letter(worker, event, claim, attempts, failure)
    elif attempts >= retry.max_attempts:
        failure = Failure(error.code, error.message, Reason.retries_exhausted)
        dead_letter(worker, event, claim, attempts, failure)
    else:
        failure = Failure(error.code, error.message, "transient_failure")
        _durably(
            lambda: worker.ledger.set_retrying_if_claimed(claim, attempts=attempts, failure=failure)
        )
        log.warning(
            "delivery will be retried",
            attempts=attempts,
            error_code=error.code,
            error_message=error.message,
        )
        raise RetryLater(
            f"{error.code}: transient failure, attempt {attempts} of {retry.max_attempts}"
        )


def record_sent(
    worker: Worker, claim: Claim, attempts: int, message_id: str, started: float
) -> None:
    won = _durably(
        lambda: worker.ledger.set_sent_if_claimed(
            claim, attempts=attempts, provider_message_id=message_id
        )
    )
    elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    if won:
        log.info(
            "delivery sent",
            attempts=attempts,
            provider_message_id=message_id,
            duration_ms=elapsed_ms,
        )
    else:
        # Our lease expired while we were sending and someone else claimed the row: the
        # email went out, but the ledger belongs to the newer claim now.
        log.error(
            "delivery sent but the claim was lost",
            attempts=attempts,
            provider_message_id=message_id,
            duration_ms=elapsed_ms,
        )


def settle_unclaimed(worker: Worker, event: events.DeliveryEvent) -> None:
    """The claim returned nothing: a finished delivery (ack) or a live claim (retry later)."""
    row = worker.ledger.get(event.delivery_id)
    if row is not None and row.status.finished:
        log.info("duplicate event skipped", status=row.status.value)
        return
    # Another worker holds a live lease. Acking could lose the email if that worker dies,
    # so let Pub/Sub bring this copy back; by then the row is finished or the lease expired.
    status = row.status.value if row is not None else "missing"
    log.info("delivery is being handled elsewhere", status=status)
    raise RetryLater(f"delivery {event.delivery_id} is {status} under another claim")


# --- dead letters -------------------------------------------------------------------------


def dead_letter(
    worker: Worker, event: events.DeliveryEvent, claim: Claim, attempts: int, failure: Failure
) -> None:
    """Publish the dead letter, then close the row: `failed` for a permanent failure,
    `dead_letter` when the attempts ran out (contract section 2)."""
    _publish_or_release(worker, event, claim, attempts, failure)
    ledger = worker.ledger
    close = (
        ledger.set_failed_if_claimed
        if failure.reason == Reason.permanent_failure
        else ledger.set_dead_letter_if_claimed
    )
    _durably(lambda: close(claim, attempts=attempts, failure=failure))
    log.error(
        "delivery dead-lettered",
        reason=failure.reason,
        attempts=attempts,
        error_code=failure.code,
        error_message=failure.message,
    )


def _publish_or_release(
    worker: Worker, event: events.DeliveryEvent, claim: Claim, attempts: int, failure: Failure
) -> None:
    """Publish the dead letter; if Pub/Sub cannot confirm it, hand the row back (`retrying`)
    so the redelivery can claim it at once, and raise."""
    attributes = deadletter.dead_letter_attributes(
        reason=Reason(failure.reason),
        error_code=failure.code,
        error_message=failure.message,
        attempts=attempts,
        source_message_id=event.message.message_id,
        delivery_id=event.delivery_id,
        workflow=event.workflow,
    )
    try:
        deadletter.publish_dead_letter(worker.settings.pubsub, event.message.data, attributes)
    except PublishError as error:
        worker.ledger.set_retrying_if_claimed(claim, attempts=attempts, failure=failure)
        log.error("dead-letter publish failed", error_message=str(error))
        raise RetryLater(f"dead-letter publish failed: {error}") from None


def reject(worker: Worker, invalid: events.InvalidEvent) -> None:
    """An event that can never succeed: dead-letter it, then record why when it has an id."""
    bind_event(delivery_id=invalid.delivery_id, workflow=invalid.workflow)
    message = invalid.message
    failure = Failure("INVALID_EVENT", sanitise(str(invalid)), Reason.invalid_event)
    attributes = deadletter.dead_letter_attributes(
        reason=Reason.invalid_event,
        error_code=failure.code,
        error_message=failure.message,
        attempts=0,
        source_message_id=message.message_id if message else "",
        delivery_id=invalid.delivery_id,
        workflow=invalid.workflow,
    )
    data = message.data if message else b""
    try:
        deadletter.publish_dead_letter(worker.settings.pubsub, data, attributes)
    except PublishError as error:
        log.error("dead-letter publish failed", error_message=str(error), error_code=failure.code)
        raise RetryLater(f"dead-letter publish failed: {error}") from None
    if invalid.delivery_id is not None:
        _durably(
            lambda: worker.ledger.set_failed_if_new_or_queued(
                delivery_id=invalid.delivery_id or "",
                workflow=invalid.workflow,
                recipient=None,
                source_message_id=message.message_id if message else None,
                failure=failure,
            )
        )
    log.warning(
        "invalid event dead-lettered", error_code=failure.code, error_message=failure.message
    )


# --- helpers --------------------------------------------------------------------------------


def _durably(record: Callable[[], T]) -> T:
    """Retry a ledger write through a dropped connection or a database restart.

    Every transition is guarded by the claim token, so repeating one is harmless. This
    narrows the window in which an email has gone out but the ledger cannot say so.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=0.25, max=2),
        retry=tenacity.retry_if_exception_type(
            (psycopg.OperationalError, psycopg_pool.PoolTimeout)
        ),
        reraise=True,
    )
    return retrying(record)


def _last_start_within_lease(worker: Worker, started: float) -> float:
    """Seconds from now in which another SMTP attempt may still start.

    An attempt must end inside the claim's lease: once the lease expires, a redelivered copy
    may claim the row and send, and a late attempt here would be a second email. One attempt
    takes at most about two command timeouts; `started` is taken before the claim, so the
    lease (which starts at the claim) is never overestimated.
    """
    elapsed = time.monotonic() - started
    attempt = 2 * worker.settings.smtp.timeout_seconds
    return worker.settings.retry.lease_seconds - elapsed - attempt - LEASE_MARGIN_SECONDS


def _log_retry(claim: Claim) -> Callable[[smtp.SmtpError, int], None]:
    def on_retry(error: smtp.SmtpError, attempt_number: int) -> None:
        log.warning(
            "transient SMTP failure, retrying",
            error_code=error.code,
            error_message=error.message,
            attempt=claim.attempts + attempt_number - 1,
        )

    return on_retry
