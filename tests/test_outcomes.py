"""The outcome table (docs/reference.md) as a table, against the pure `decide`.

No database, no emulator, no SMTP server: milliseconds. tests/test_pipeline.py runs the same
rows against the real components.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.delivery.config import RetrySettings
from worker.delivery.outcomes import RULES, Ending, Facts, decide, send_tries
from worker.delivery.smtp import SendResult, SmtpError
from worker.store.ledger import (
    DEAD_LETTER_REASONS,
    SUPPRESSION_REASONS,
    Code,
    Reason,
    Skipped,
    Status,
)

ROOT = Path(__file__).resolve().parents[1]
MAX = 5  # MAX_ATTEMPTS
TRANSIENT = SmtpError("SMTP_451", "451 4.3.0 try again later", transient=True)
PERMANENT = SmtpError("SMTP_550", "550 5.1.1 no such user", transient=False)


@dataclass(frozen=True)
class Row:
    """One row of the table: what happened, and what must follow."""

    facts: Facts
    ending: Ending
    status: Status | None  # the ledger write; None: the row is left alone
    dead_letter: bool
    acks: bool  # False: RetryLater, 503, Pub/Sub redelivers
    attempts: int = 0
    reason: Reason | None = None
    code: str | None = None


def sent(claimed: int, tries: int) -> Facts:
    return Facts(claimed=claimed, send=SendResult(tries, None), message_id="<d@example.com>")


def failed(claimed: int, tries: int, error: SmtpError) -> Facts:
    return Facts(claimed=claimed, send=SendResult(tries, error), message_id="<d@example.com>")


TABLE: dict[str, Row] = {
    "valid, SMTP accepts": Row(
        sent(1, 1), Ending.SENT, Status.SENT, dead_letter=False, acks=True, attempts=1
    ),
    "accepted after retries in this and earlier invocations": Row(
        sent(3, 2), Ending.SENT, Status.SENT, dead_letter=False, acks=True, attempts=4
    ),
    **{
        f"again, already {found}": Row(
            Facts(found=found), Ending.ALREADY_FINISHED, None, dead_letter=False, acks=True
        )
        for found in (Status.SENT, Status.FAILED, Status.DEAD_LETTER, Status.SKIPPED)
    },
    "again, while another worker's lease is live": Row(
        Facts(found=Status.IN_PROGRESS),
        Ending.HELD_ELSEWHERE,
        None,
        dead_letter=False,
        acks=False,
    ),
    # The claim lost to a copy that has handed the row back meanwhile: come back later.
    "again, the other claim just handed it back": Row(
        Facts(found=Status.RETRYING), Ending.HELD_ELSEWHERE, None, dead_letter=False, acks=False
    ),
    "again, but the row is gone (pruned)": Row(
        Facts(found=None), Ending.HELD_ELSEWHERE, None, dead_letter=False, acks=False
    ),
    "transient failure, attempts left": Row(
        failed(1, 2, TRANSIENT),
        Ending.RETRYING,
        Status.RETRYING,
        dead_letter=False,
        acks=False,
        attempts=2,
        reason=Reason.TRANSIENT_FAILURE,
        code="SMTP_451",
    ),
    "transient failures reach MAX_ATTEMPTS": Row(
        failed(4, 2, TRANSIENT),
        Ending.DEAD_LETTER,
        Status.DEAD_LETTER,
        dead_letter=True,
        acks=True,
        attempts=MAX,
        reason=Reason.RETRIES_EXHAUSTED,
        code="SMTP_451",
    ),
    "expired claims used the budget up": Row(
        Facts(claimed=MAX + 1),
        Ending.DEAD_LETTER,
        Status.DEAD_LETTER,
        dead_letter=True,
        acks=True,
        attempts=MAX + 1,
        reason=Reason.RETRIES_EXHAUSTED,
        code="ATTEMPTS_EXHAUSTED",
    ),
    "permanent failure": Row(
        failed(1, 1, PERMANENT),
        Ending.FAILED,
        Status.FAILED,
        dead_letter=True,
        acks=True,
        attempts=1,
        reason=Reason.PERMANENT_FAILURE,
        code="SMTP_550",
    ),
    "permanent failure on the last attempt": Row(
        failed(MAX, 1, PERMANENT),
        Ending.FAILED,
        Status.FAILED,
        dead_letter=True,
        acks=True,
        attempts=MAX,
        reason=Reason.PERMANENT_FAILURE,
        code="SMTP_550",
    ),
    "missing template": Row(
        Facts(claimed=2, template_error="no template invite/en"),
        Ending.FAILED,
        Status.FAILED,
        dead_letter=True,
        acks=True,
        attempts=2,
        reason=Reason.PERMANENT_FAILURE,
        code="TEMPLATE_ERROR",
    ),
    # Contract section 2's two skipped rows (section 7): the claim itself ended the row
    # `skipped`; nothing is sent, nothing dead-lettered, the handler acks.
    **{
        f"recipient on the suppression list ({reason})": Row(
            Facts(skipped=Skipped("d", Code.SUPPRESSED, reason, f"recipient suppressed: {reason}")),
            Ending.SKIPPED,
            Status.SKIPPED,
            dead_letter=False,
            acks=True,
            reason=reason,
            code="SUPPRESSED",
        )
        for reason in SUPPRESSION_REASONS
    },
    "the recipient's rate limit for this workflow is reached": Row(
        Facts(
            skipped=Skipped("d", Code.RATE_LIMITED, Reason.RATE_LIMIT, "rate limit: 5 per 3600 s")
        ),
        Ending.SKIPPED,
        Status.SKIPPED,
        dead_letter=False,
        acks=True,
        reason=Reason.RATE_LIMIT,
        code="RATE_LIMITED",
    ),
    "invalid event": Row(
        Facts(invalid="recipient: must be one address"),
        Ending.REJECTED,
        Status.FAILED,
        dead_letter=True,
        acks=True,
        attempts=0,
        reason=Reason.INVALID_EVENT,
        code="INVALID_EVENT",
    ),
}


@pytest.mark.parametrize("situation", list(TABLE), ids=str)
def test_the_outcome_table(situation: str) -> None:
    row = TABLE[situation]
    outcome = decide(row.facts, MAX)
    assert outcome.ending is row.ending
    assert outcome.status is row.status
    assert outcome.publishes_dead_letter is row.dead_letter
    assert outcome.acks is row.acks
    assert outcome.attempts == row.attempts
    assert outcome.reason is row.reason
    assert (outcome.failure.code if outcome.failure else None) == row.code
    if outcome.ending is Ending.SENT:
        assert outcome.provider_message_id == "<d@example.com>"
        assert outcome.failure is None


@pytest.mark.parametrize("situation", [s for s, row in TABLE.items() if row.dead_letter], ids=str)
def test_an_unconfirmed_dead_letter_hands_the_row_back_and_is_redelivered(situation: str) -> None:
    """Contract: "dead-letter publish fails: not marked until the publish is confirmed;
    raises". The claim goes back to `retrying`, failure kept, so the redelivery finishes it."""
    outcome = decide(TABLE[situation].facts, MAX)
    assert outcome.reason in DEAD_LETTER_REASONS
    released = outcome.unpublished()
    assert (released.ending, released.status) == (Ending.RETRYING, Status.RETRYING)
    assert (released.publishes_dead_letter, released.acks) == (False, False)
    assert released.reason is Reason.DEAD_LETTER_PUBLISH_FAILED
    assert released.attempts == outcome.attempts
    assert released.failure is not None and outcome.failure is not None
    assert released.failure.code == outcome.failure.code


def test_every_ending_has_one_rule_and_the_table_covers_it() -> None:
    assert set(RULES) == set(Ending)
    assert {row.ending for row in TABLE.values()} == set(Ending)
    # Only endings that close the row publish a dead letter; only they and sent/duplicates ack.
    for ending, rule in RULES.items():
        assert rule.dead_letter == (rule.status in (Status.FAILED, Status.DEAD_LETTER)), ending
        assert rule.acks == (ending not in (Ending.RETRYING, Ending.HELD_ELSEWHERE)), ending


def test_a_claim_with_attempts_left_cannot_end_without_trying() -> None:
    with pytest.raises(ValueError, match="must render or send"):
        decide(Facts(claimed=1), MAX)


@pytest.mark.parametrize(
    ("claimed", "tries"), [(1, 3), (3, 3), (4, 2), (5, 1), (6, 0), (9, -3)], ids=str
)
def test_each_invocation_tries_its_share_within_the_budget(claimed: int, tries: int) -> None:
    retry = RetrySettings(max_attempts=MAX, tries_per_invocation=3)
    assert send_tries(claimed, retry) == tries
    # No tries left is exactly when decide dead-letters without sending.
    spent = decide(Facts(claimed=claimed), MAX) if tries < 1 else None
    assert (spent is not None and spent.ending is Ending.DEAD_LETTER) == (tries < 1)


@given(
    claimed=st.integers(1, MAX),
    tries=st.integers(1, 3),
    error=st.sampled_from([None, TRANSIENT, PERMANENT]),
)
def test_attempts_add_up_and_nothing_is_sent_twice_or_lost(
    claimed: int, tries: int, error: SmtpError | None
) -> None:
    outcome = decide(Facts(claimed=claimed, send=SendResult(tries, error)), MAX)
    assert outcome.attempts == claimed + tries - 1
    # Every ending of a claimed delivery writes its row: never zero without a record.
    assert outcome.status is not None
    # A failure either comes back (retrying) or is dead-lettered: never silently acked.
    if error is not None:
        assert outcome.acks == outcome.publishes_dead_letter
    assert (outcome.ending is Ending.RETRYING) == (error is TRANSIENT and claimed + tries - 1 < MAX)


def test_no_reason_is_spelled_in_sql() -> None:
    """One vocabulary: the statements get every reason as a parameter from `Reason`."""
    queries = (ROOT / "sql" / "queries.sql").read_text()
    for reason in Reason:
        assert f"'{reason.value}'" not in queries, reason
