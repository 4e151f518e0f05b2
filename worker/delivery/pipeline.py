"""One delivery event, start to finish: decode, claim, render, send; decide; finish.

The order is what makes "one email per delivery_id" hold:
  1. the claim is durable in PostgreSQL before anything is sent (no claim, no email);
  2. the email is sent with the claim held (a lease, fenced by a claim token), and every SMTP
     attempt can end inside that lease (`settings.send_window`);
  3. what happened is turned into an `Outcome` by a pure function (worker/delivery/outcomes.py), and
     `finish` carries it out: the dead letter published and confirmed before the ledger says
     so, one guarded ledger write (retried through dropped connections by the ledger), one
     log line, and the answer to Pub/Sub: return (ack) or raise `RetryLater` (redeliver).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from worker.core.instance import Instance
from worker.core.logging import bind, bind_event, clear_event, get_logger
from worker.core.pubsub import PublishError
from worker.core.redact import mask_email, sanitise
from worker.delivery import events, smtp
from worker.delivery.config import Settings, load_settings, send_window
from worker.delivery.deadletter import DeadLetterPublisher, dead_letter_attributes
from worker.delivery.outcomes import Ending, Facts, Outcome, decide, send_tries
from worker.delivery.relays import FailoverSender, Route, plan, probe_seconds
from worker.delivery.rendering import Renderer, TemplateError
from worker.store.db import open_pool
from worker.store.ledger import Claim, Code, Failure, Ledger, Reason, Skipped, Unclaimed
from worker.store.relays import Circuits, Relay

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
    dead_letters: DeadLetterPublisher
    # The fallback relay's connections (FALLBACK_SMTP_HOST); None: one relay.
    fallback: smtp.SmtpSender | None = None
    # The relays' shared breaker; None: over the ledger's pool.
    circuits: Circuits | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Worker:
        """The instance's worker: its pool opens in the background, SMTP on first send."""
        ledger = Ledger(open_pool(settings.database))
        fallback = settings.fallback
        return cls(
            settings=settings,
            ledger=ledger,
            sender=smtp.SmtpSender(settings.smtp),
            renderer=Renderer(),
            dead_letters=DeadLetterPublisher(settings.pubsub),
            fallback=None if fallback is None else smtp.SmtpSender(fallback),
            circuits=Circuits(ledger.pool),
        )

    def routes(self) -> list[Route]:
        """The configured relays, primary first."""
        routes = [Route(Relay.PRIMARY, self.sender, self.settings.smtp.provider)]
        if self.fallback is not None:
            routes.append(Route(Relay.FALLBACK, self.fallback, self.fallback.settings.provider))
        return routes

    def breaker(self) -> Circuits:
        return self.circuits if self.circuits is not None else Circuits(self.ledger.pool)


# The delivery target's settings, parsed at import, and its worker, made on first use.
INSTANCE: Instance[Settings, Worker] = Instance(load_settings, Worker.from_settings)


@dataclass(frozen=True)
class Subject:
    """The event as `finish` needs it: which delivery, and the bytes a dead letter carries."""

    delivery_id: str | None
    workflow: str | None
    data: bytes
    source_message_id: str

    @classmethod
    def of(cls, event: events.DeliveryEvent) -> Subject:
        message = event.message
        return cls(event.delivery_id, event.workflow, message.data, message.message_id)

    @classmethod
    def of_invalid(cls, invalid: events.InvalidEvent) -> Subject:
        message = invalid.message
        data, message_id = (message.data, message.message_id) if message else (b"", "")
        return cls(invalid.delivery_id, invalid.workflow, data, message_id)


def handle(cloud_event: Any, worker: Worker | None = None) -> None:
    """The function body: returns when the event is finished, raises `RetryLater` if not."""
    worker = worker or INSTANCE.get()
    try:
        try:
            event = events.decode(cloud_event)
        except events.InvalidEvent as invalid:
            bind_event(delivery_id=invalid.delivery_id, workflow=invalid.workflow)
            outcome = decide(Facts(invalid=sanitise(str(invalid))), 0)
            finish(worker, Subject.of_invalid(invalid), None, outcome)
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


def deliver(worker: Worker, event: events.DeliveryEvent) -> None:
    """Claim (or skip), attempt, decide, finish."""
    started = time.monotonic()
    result = worker.ledger.claim_or_skip(
        delivery_id=event.delivery_id,
        workflow=event.workflow,
        recipient=event.recipient,
        locale=event.locale,
        metadata=event.metadata,
        source_message_id=event.message.message_id,
        lease_seconds=worker.settings.retry.lease_seconds,
        rate_limit=worker.settings.rate_limits.get(event.workflow),
        # The claim ends the row `skipped` (EXPIRED) at or after the validity end.
        published_at=event.message.published_at,
        not_after=event.valid_until,
    )
    claim = result if isinstance(result, Claim) else None
    match result:
        case Claim():
            bind(attempt=result.attempts)
            facts = attempt(worker, event, result, started)
        case Skipped():
            facts = Facts(skipped=result)
        case Unclaimed():
            facts = Facts(found=result.found)
    outcome = decide(facts, worker.settings.retry.max_attempts)
    finish(worker, Subject.of(event), claim, outcome, started=started)


def attempt(worker: Worker, event: events.DeliveryEvent, claim: Claim, started: float) -> Facts:
    """Render and send under the claim, unless its attempt budget is spent; what happened."""
    facts = Facts(claimed=claim.attempts)
    tries = send_tries(claim.attempts, worker.settings.retry)
    if tries < 1:
        return facts
    try:
        rendered = worker.renderer.render(event)
    except TemplateError as template_error:
        return replace(facts, template_error=sanitise(str(template_error)))
    message = smtp.build_message(
        worker.settings.smtp,
        delivery_id=event.delivery_id,
        recipient=event.recipient,
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
    )
    retry = worker.settings.retry
    timeout = worker.settings.smtp.timeout_seconds
    # `started` is taken before the claim, so the lease is never overestimated.
    window = send_window(retry.lease_seconds, timeout, elapsed=time.monotonic() - started)
    circuits = worker.breaker()
    sender = FailoverSender(
        plan(
            worker.routes(),
            claim,
            lambda relay: circuits.claim_probe(relay, seconds=probe_seconds(timeout)),
        ),
        claim,
        circuits,
        worker.settings.breaker,
        event.delivery_id,
        # The tries after a failover must fit in the lease like any other attempt.
        deadline_at=time.monotonic() + window,
    )
    result = smtp.send_with_retry(
        sender,
        message,
        tries=tries,
        initial_backoff=retry.initial_backoff_seconds,
        max_backoff=retry.max_backoff_seconds,
        on_retry=_log_retry(claim),
        deadline=window,
    )
    return replace(
        facts,
        send=result,
        message_id=message.message_id,
        relay=sender.accepted_by,
        smtp_ms=sender.smtp_ms,
    )


# --- the one place an outcome is carried out ----------------------------------------------


def finish(
    worker: Worker,
    subject: Subject,
    claim: Claim | None,
    outcome: Outcome,
    *,
    started: float | None = None,
) -> None:
    """Dead letter first (confirmed), then the ledger, the log line, the answer to Pub/Sub."""
    if outcome.publishes_dead_letter:
        try:
            worker.dead_letters.publish(subject.data, _attributes(subject, outcome))
        except PublishError as error:
            log.error(
                "dead-letter publish failed",
                error_message=str(error),
                error_code=outcome.failure.code if outcome.failure else None,
            )
            outcome = outcome.unpublished()
    recorded = record(worker.ledger, subject, claim, outcome)
    _log(outcome, recorded, started)
    if not outcome.acks:
        raise RetryLater(_retry_later_message(worker, subject, outcome))


def record(ledger: Ledger, subject: Subject, claim: Claim | None, outcome: Outcome) -> bool:
    """The outcome's one ledger write; False when its guard did not hold, or it has none.
    Every write is retried through a dropped connection by the ledger itself."""
    match outcome.ending:
        case Ending.ALREADY_FINISHED | Ending.HELD_ELSEWHERE:
            return False  # another claim's row, or a finished one: not ours to touch
        case Ending.SKIPPED:
            return True  # the claim wrote it: one statement decided and recorded the skip
        case Ending.REJECTED:
            return subject.delivery_id is not None and ledger.set_failed_if_new_or_queued(
                delivery_id=subject.delivery_id,
                workflow=subject.workflow,
                recipient=None,
                source_message_id=subject.source_message_id or None,
                failure=_failure(outcome),
            )
    if claim is None:
        return False  # a rejected event whose dead letter failed: nothing was claimed
    match outcome.ending:
        case Ending.SENT:
            return ledger.set_sent_if_claimed(
                claim,
                attempts=outcome.attempts,
                provider_message_id=outcome.provider_message_id or "",
                relay_message_id=outcome.relay_message_id,
                relay=outcome.relay,
                smtp_ms=outcome.smtp_ms,
            )
        case Ending.RETRYING:
            setter = ledger.set_retrying_if_claimed
        case Ending.FAILED:
            setter = ledger.set_failed_if_claimed
        case Ending.DEAD_LETTER:
            setter = ledger.set_dead_letter_if_claimed
        case _:
            raise AssertionError(f"unhandled ending {outcome.ending}")
    return setter(claim, attempts=outcome.attempts, failure=_failure(outcome))


def _failure(outcome: Outcome) -> Failure:
    assert outcome.failure is not None, f"{outcome.ending} carries a failure"
    return outcome.failure


def _attributes(subject: Subject, outcome: Outcome) -> dict[str, str]:
    failure = _failure(outcome)
    return dead_letter_attributes(
        reason=failure.reason,
        error_code=failure.code,
        error_message=failure.message,
        attempts=outcome.attempts,
        source_message_id=subject.source_message_id,
        delivery_id=subject.delivery_id,
        workflow=subject.workflow,
    )


def _log(outcome: Outcome, recorded: bool, started: float | None) -> None:
    failure = outcome.failure
    error = (
        {} if failure is None else {"error_code": failure.code, "error_message": failure.message}
    )
    found = None if outcome.found is None else outcome.found.value
    match outcome.ending:
        case Ending.SENT:
            elapsed_ms = None if started is None else round((time.monotonic() - started) * 1000, 1)
            fields = {
                "attempts": outcome.attempts,
                "provider_message_id": outcome.provider_message_id,
                "relay_message_id": outcome.relay_message_id,
                "relay": None if outcome.relay is None else outcome.relay.value,
                "smtp_ms": outcome.smtp_ms,
                "duration_ms": elapsed_ms,
            }
            if recorded:
                log.info("delivery sent", **fields)
            else:
                # Our lease expired while we were sending and someone else claimed the row:
                # the email went out, but the ledger belongs to the newer claim now.
                log.error("delivery sent but the claim was lost", **fields)
        case Ending.SKIPPED:
            # Why, never to whom: the recipient is bound masked for every line of the event.
            level = log.warning if failure and failure.code == Code.RATE_LIMITED else log.info
            level("delivery skipped", reason=outcome.reason, **error)
        case Ending.ALREADY_FINISHED:
            log.info("duplicate event skipped", status=found)
        case Ending.HELD_ELSEWHERE:
            log.info("delivery is being handled elsewhere", status=found or "missing")
        case Ending.RETRYING:
            log.warning(
                "delivery will be retried",
                reason=outcome.reason,
                attempts=outcome.attempts,
                **error,
            )
        case Ending.FAILED | Ending.DEAD_LETTER:
            log.error(
                "delivery dead-lettered", reason=outcome.reason, attempts=outcome.attempts, **error
            )
        case Ending.REJECTED:
            log.warning("invalid event dead-lettered", **error)


def _retry_later_message(worker: Worker, subject: Subject, outcome: Outcome) -> str:
    failure = outcome.failure
    if outcome.ending is Ending.HELD_ELSEWHERE or failure is None:
        status = outcome.found.value if outcome.found else "missing"
        return f"delivery {subject.delivery_id} is {status} under another claim"
    if failure.reason is Reason.DEAD_LETTER_PUBLISH_FAILED:
        return f"dead-letter publish failed ({failure.code})"
    max_attempts = worker.settings.retry.max_attempts
    return f"{failure.code}: transient failure, attempt {outcome.attempts} of {max_attempts}"


def _log_retry(claim: Claim) -> Callable[[smtp.SmtpError, int], None]:
    def on_retry(error: smtp.SmtpError, attempt_number: int) -> None:
        log.warning(
            "transient SMTP failure, retrying",
            error_code=error.code,
            error_message=error.message,
            attempt=claim.attempts + attempt_number - 1,
        )

    return on_retry
