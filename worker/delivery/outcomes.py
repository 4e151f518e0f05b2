"""How a delivery ends: the outcome values and the pure function that decides them.

`decide()` looks only at what happened to one event (was it valid, did the claim succeed or
which row stopped it, did the template render, what did the SMTP sends report, how much of
the attempt budget is left) and returns an `Outcome`. It does no I/O, so the documented
outcome table (section 2) is tested as a table against it (tests/test_outcomes.py).
`pipeline.finish` is the one place that carries an outcome out: the dead letter first,
then the ledger write, the log line, and the answer to Pub/Sub (return, or `RetryLater`).

Each `Ending` has one rule (`RULES`): the ledger status it writes, whether it publishes a dead
letter, whether the handler acks. A new ending is a rule, a constructor, and a ledger call in
`finish`. `skipped` (issue 11) is decided in the database, at claim time: the claim itself
(`email.claim_delivery()`, one statement) ends the row `skipped` with the code (`EXPIRED`,
`SUPPRESSED`, `RATE_LIMITED`) as `last_error_code` and the reason (`expired`, the suppression
entry's, or `rate_limit`) as `status_reason`, so `Ending.SKIPPED`'s ledger write is that claim and
`finish` adds none; the rule is `(Status.SKIPPED, dead letter: no, acks: yes)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from worker.store.ledger import Code, Failure, Reason, Skipped, Status
from worker.store.relays import Relay

if TYPE_CHECKING:
    from worker.delivery.config import RetrySettings
    from worker.delivery.smtp import SendResult


class Ending(StrEnum):
    SENT = "sent"
    ALREADY_FINISHED = "already_finished"  # a duplicate of a finished delivery
    HELD_ELSEWHERE = "held_elsewhere"  # another worker holds a live lease on it
    RETRYING = "retrying"  # transient failure with attempts left
    FAILED = "failed"  # permanent failure
    DEAD_LETTER = "dead_letter"  # transient failures used the attempt budget up
    REJECTED = "rejected"  # the event is invalid
    # deliberately not sent: validity end passed, suppressed recipient, rate limit reached
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Rule:
    status: Status | None  # what the ledger row becomes; None: the row is not ours to touch
    dead_letter: bool  # publish the original bytes to the dead-letter topic first
    acks: bool  # the handler returns; False: it raises `RetryLater` (503) and Pub/Sub redelivers


RULES: dict[Ending, Rule] = {
    Ending.SENT: Rule(Status.SENT, dead_letter=False, acks=True),
    Ending.ALREADY_FINISHED: Rule(None, dead_letter=False, acks=True),
    # Acking could lose the email if that worker dies: let Pub/Sub bring this copy back; by
    # then the row is finished or its lease has expired.
    Ending.HELD_ELSEWHERE: Rule(None, dead_letter=False, acks=False),
    Ending.RETRYING: Rule(Status.RETRYING, dead_letter=False, acks=False),
    Ending.FAILED: Rule(Status.FAILED, dead_letter=True, acks=True),
    Ending.DEAD_LETTER: Rule(Status.DEAD_LETTER, dead_letter=True, acks=True),
    # `failed` only when a delivery_id could be read, and only a new or `queued` row.
    Ending.REJECTED: Rule(Status.FAILED, dead_letter=True, acks=True),
    # Final: no email, no dead letter (nothing to replay: the skip was the decision).
    Ending.SKIPPED: Rule(Status.SKIPPED, dead_letter=False, acks=True),
}


@dataclass(frozen=True)
class Outcome:
    """How one event ends. Build it with the constructors below (or `decide`)."""

    ending: Ending
    attempts: int = 0  # send attempts so far, across invocations
    failure: Failure | None = None
    provider_message_id: str | None = None  # SENT: the email's Message-ID
    relay_message_id: str | None = None  # SENT: the relay's own id, when its 250 named one
    found: Status | None = None  # ALREADY_FINISHED, HELD_ELSEWHERE: the row's status
    relay: Relay | None = None  # SENT: the relay that accepted the email
    smtp_ms: int | None = None  # SENT: how long that relay's SMTP exchange took

    @classmethod
    def sent(
        cls,
        attempts: int,
        provider_message_id: str,
        relay_message_id: str | None = None,
        relay: Relay | None = None,
        smtp_ms: int | None = None,
    ) -> Outcome:
        return cls(
            Ending.SENT,
            attempts,
            provider_message_id=provider_message_id,
            relay_message_id=relay_message_id,
            relay=relay,
            smtp_ms=smtp_ms,
        )

    @classmethod
    def already_finished(cls, found: Status) -> Outcome:
        return cls(Ending.ALREADY_FINISHED, found=found)

    @classmethod
    def held_elsewhere(cls, found: Status | None) -> Outcome:
        return cls(Ending.HELD_ELSEWHERE, found=found)

    @classmethod
    def retrying(cls, attempts: int, code: str, message: str) -> Outcome:
        return cls(Ending.RETRYING, attempts, Failure(code, message, Reason.TRANSIENT_FAILURE))

    @classmethod
    def failed(cls, attempts: int, code: str, message: str) -> Outcome:
        return cls(Ending.FAILED, attempts, Failure(code, message, Reason.PERMANENT_FAILURE))

    @classmethod
    def dead_letter(cls, attempts: int, code: str, message: str) -> Outcome:
        failure = Failure(code, message, Reason.RETRIES_EXHAUSTED)
        return cls(Ending.DEAD_LETTER, attempts, failure)

    @classmethod
    def rejected(cls, message: str) -> Outcome:
        return cls(Ending.REJECTED, 0, Failure(Code.INVALID_EVENT, message, Reason.INVALID_EVENT))

    @classmethod
    def skipped(cls, skip: Skipped) -> Outcome:
        return cls(Ending.SKIPPED, 0, Failure(skip.code, skip.message, skip.reason))

    def unpublished(self) -> Outcome:
        """The dead letter was not confirmed: nothing may say `failed`/`dead_letter` yet.
        The claim is handed back (`retrying`) so the redelivery can finish it at once."""
        assert self.failure is not None, "only outcomes with a failure publish dead letters"
        failure = replace(self.failure, reason=Reason.DEAD_LETTER_PUBLISH_FAILED)
        return Outcome(Ending.RETRYING, self.attempts, failure)

    @property
    def rule(self) -> Rule:
        return RULES[self.ending]

    @property
    def status(self) -> Status | None:
        return self.rule.status

    @property
    def publishes_dead_letter(self) -> bool:
        return self.rule.dead_letter

    @property
    def acks(self) -> bool:
        return self.rule.acks

    @property
    def reason(self) -> Reason | None:
        return None if self.failure is None else self.failure.reason


@dataclass(frozen=True)
class Facts:
    """What happened to one event, as far as it got."""

    invalid: str | None = None  # decoding failed: why (sanitised)
    claimed: int | None = None  # the claim's attempt number; None: the claim returned nothing
    found: Status | None = None  # not claimed: the status of the row (None: no row)
    skipped: Skipped | None = None  # the claim ended the row `skipped` (no claim, no email)
    template_error: str | None = None  # rendering failed: why (sanitised)
    send: SendResult | None = None  # what send_with_retry reported
    message_id: str = ""  # the email's Message-ID, when one was built
    relay: Relay | None = None  # the relay that accepted it
    smtp_ms: int | None = None  # how long that relay's SMTP exchange took


def attempts_left(claimed: int, max_attempts: int) -> int:
    """Send attempts this claim may still make; the claim counts as the first of them."""
    return max_attempts - claimed + 1


def send_tries(claimed: int, retry: RetrySettings) -> int:
    """Attempts for this invocation: its share, within what the budget has left."""
    return min(retry.tries_per_invocation, attempts_left(claimed, retry.max_attempts))


def decide(facts: Facts, max_attempts: int) -> Outcome:
    """The ending, from what happened. Pure: no I/O, no clock."""
    if facts.invalid is not None:
        return Outcome.rejected(facts.invalid)
    if facts.skipped is not None:
        return Outcome.skipped(facts.skipped)
    if facts.claimed is None:
        if facts.found is not None and facts.found.finished:
            return Outcome.already_finished(facts.found)
        return Outcome.held_elsewhere(facts.found)
    claimed = facts.claimed
    if attempts_left(claimed, max_attempts) < 1:
        # Claims that never finished (lease expiries: a worker died mid-send) used it up.
        return Outcome.dead_letter(claimed, Code.ATTEMPTS_EXHAUSTED, "no send attempts left")
    if facts.template_error is not None:
        return Outcome.failed(claimed, Code.TEMPLATE_ERROR, facts.template_error)
    if facts.send is None:
        raise ValueError("a claim with attempts left must render or send before it ends")
    attempts = claimed + facts.send.attempts - 1
    error = facts.send.error
    if error is None:
        return Outcome.sent(
            attempts, facts.message_id, facts.send.relay_message_id, facts.relay, facts.smtp_ms
        )
    if not error.transient:
        return Outcome.failed(attempts, error.code, error.message)
    if attempts >= max_attempts:
        return Outcome.dead_letter(attempts, error.code, error.message)
    return Outcome.retrying(attempts, error.code, error.message)
