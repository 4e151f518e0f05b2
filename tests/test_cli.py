"""`python -m worker status|history|stats|prune|publish`, usage and exit codes, against a real
PostgreSQL and the Pub/Sub emulator. Commands run in-process through `cli.main`, plus a few
real subprocesses."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness.postgres import free_port
from tests.harness.pubsub import PubSubNamespace
from worker.ops import cli
from worker.store.ledger import Failure, Ledger, Reason, Status

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    "migrate",
    "replay",
    "status",
    "history",
    "stats",
    "relays",
    "prune",
    "publish",
    "suppressions",
]
_ids = (f"cli-{n}" for n in itertools.count())


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = run(capsys, *args)
    assert (code, err) == (0, ""), out
    return out


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = run(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


# --- usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m worker {command}")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["replay"],
        ["replay", "--subscription", "s", "--limit", "0"],
        ["status"],
        ["history"],
        ["history", "--recipient", "a@example.com", "--limit", "x"],
        ["stats", "--since", "0d"],
        ["stats", "--since", "5y"],
        ["stats", "--since", "24"],
        ["prune"],
        ["prune", "--older-than", "90d", "--batch-size", "-1"],
        ["publish", "--workflow", "invite", "--recipient", "a@example.com"],
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("argv", "rule"),
    [
        (["history", "--recipient", "a@example.com", "--limit", "99999999999999999999"], "10000"),
        (["history", "--recipient", "a@example.com", "--limit", "10001"], "at most 10000"),
        (["suppressions", "list", "--limit", "99999999999999999999"], "at most 10000"),
        (["prune", "--older-than", "90d", "--batch-size", "10001"], "at most 10000"),
        (["prune", "--older-than", "999999w"], "longer than 36500d"),
        (["prune", "--older-than", "36501d"], "longer than 36500d"),
        (["stats", "--since", "999999w"], "longer than 36500d"),
        (["suppressions", "add", "a@example.com", "--expires", "999999w"], "longer than 36500d"),
        (["migrate", "--down", "--steps", "-1"], "must be at least 1"),
        (["migrate", "--down", "--steps", "0"], "must be at least 1"),
        (
            ["publish", "--workflow", "invite", "--recipient", "a@example.com", "--data", DEEP],
            "argument --data: not valid JSON: nested too deeply",
        ),
        (
            [
                *("publish", "--workflow", "invite", "--recipient", "a@example.com"),
                *("--data", "{}", "--metadata", DEEP),
            ],
            "argument --metadata: not valid JSON: nested too deeply",
        ),
        (
            ["publish", "--workflow", "invite", "--recipient", "a@example.com", "--data", "{x"],
            "argument --data: not valid JSON: Expecting property name",
        ),
        (
            [
                *("publish", "--workflow", "invite", "--recipient", "a@example.com"),
                *("--data", "{}", "--metadata", "[1"),
            ],
            "argument --metadata: not valid JSON: ",
        ),
    ],
    ids=lambda value: " ".join(value)[:60] if isinstance(value, list) else "",
)
def test_out_of_range_arguments_are_usage_errors(
    argv: list[str], rule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused while parsing, before any database or Pub/Sub: exit 2, the usage and one
    error line naming the rule, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    [error] = [line for line in err.splitlines() if "error:" in line]
    assert rule in error and err.rstrip("\n").endswith(error)


def test_the_largest_arguments_allowed_work(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "history", "--recipient", "a@example.com", "--limit", "10000")
    ok(capsys, "suppressions", "list", "--limit", "10000")
    ok(capsys, "prune", "--older-than", "36500d", "--batch-size", "10000", "--dry-run")
    ok(capsys, "stats", "--since", "36500d")
    out = ok(capsys, "suppressions", "add", "a@example.com", "--expires", "36500d")
    assert out.startswith("suppressed a@example.com")


def test_bad_duration_names_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["prune", "--older-than", "3 months"])
    assert "is not a duration like 30m, 24h, 7d or 90d" in capsys.readouterr().err


# --- status and history ---------------------------------------------------------------------


def replayed_delivery(ledger: Ledger, recipient: str = "ada@example.com") -> str:
    """A delivery that failed permanently and was requeued: four status changes."""
    delivery_id = next(_ids)
    claim = ledger.claim(
        delivery_id=delivery_id,
        workflow="invite",
        recipient=recipient,
        locale="en",
        metadata={"tenant": "acme"},
        source_message_id="m-1",
        lease_seconds=60,
    )
    assert claim is not None
    failure = Failure("SMTP_550", "5.1.1 no such user", Reason.PERMANENT_FAILURE)
    assert ledger.set_failed_if_claimed(claim, attempts=1, failure=failure)
    assert ledger.set_queued_if_finished(delivery_id)
    return delivery_id


def test_status_shows_the_row_and_its_events(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    delivery_id = replayed_delivery(ledger)
    out = ok(capsys, "status", delivery_id)
    pairs = [re.split(r"\s{2,}", line, maxsplit=1) for line in out.split("\n\n")[0].splitlines()]
    fields = {pair[0]: pair[1] for pair in pairs}
    assert fields["delivery_id"] == delivery_id
    assert (fields["status"], fields["workflow"], fields["replays"]) == (
        "queued (replay)",
        "invite",
        "1",
    )
    assert (fields["sent at"], fields["source message id"]) == ("-", "m-1")
    assert '{"tenant": "acme"}' in out and "SMTP_550: 5.1.1 no such user" in out
    events = out.split("\n\n")[1].splitlines()
    assert events[0].split() == ["WHEN", "STATUS", "FROM", "ATTEMPT", "REASON", "ERROR"]
    assert [line.split()[2] for line in events[1:]] == ["in_progress", "failed", "queued"]
    assert "permanent_failure" in events[2] and "replay" in events[3]


def test_status_json(ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    delivery_id = replayed_delivery(ledger)
    doc = json.loads(ok(capsys, "status", delivery_id, "--json"))
    delivery = doc["delivery"]
    assert (delivery["delivery_id"], delivery["status"], delivery["replays"]) == (
        delivery_id,
        "queued",
        1,
    )
    assert delivery["metadata"] == {"tenant": "acme"} and delivery["claim_token"] is None
    assert delivery["queued_at"].endswith("+00:00")
    assert [e["status"] for e in doc["events"]] == ["in_progress", "failed", "queued"]
    assert doc["events"][1]["error_code"] == "SMTP_550"
    assert doc["events"][2]["payload"] == {
        "from": "failed",
        "reason": "replay",
        "replays": 1,
        "source_message_id": "m-1",
    }


def test_status_of_an_unknown_delivery_is_one_line(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert one_line_error(capsys, "status", "nope") == "error: no delivery with id 'nope'"


def test_history_newest_first(ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    mine = [replayed_delivery(ledger) for _ in range(3)]
    replayed_delivery(ledger, recipient="grace@example.com")

    suppression, *lines = ok(capsys, "history", "--recipient", "ada@example.com").splitlines()
    assert suppression == "suppression: none"
    assert lines[0].split()[:4] == ["UPDATED", "DELIVERY_ID", "WORKFLOW", "STATUS"]
    assert [line.split()[2] for line in lines[1:]] == list(reversed(mine))
    assert all("invite" in line and "queued" in line for line in lines[1:])

    doc = json.loads(
        ok(capsys, "history", "--recipient", "ada@example.com", "--limit", "2", "--json")
    )
    assert [d["delivery_id"] for d in doc["deliveries"]] == [mine[2], mine[1]]
    assert (doc["recipient"], doc["suppression"]) == ("ada@example.com", None)
    assert ok(capsys, "history", "--recipient", "x@example.com") == (
        "suppression: none\nno deliveries for x@example.com\n"
    )
    assert json.loads(ok(capsys, "history", "--recipient", "x@example.com", "--json")) == {
        "recipient": "x@example.com",
        "suppression": None,
        "deliveries": [],
    }


def test_history_ignores_the_letter_case(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """Addresses compare case-insensitively, as the suppression list does (docs/operating.md)."""
    spelled = [
        replayed_delivery(ledger, recipient=r) for r in ("Ada@Example.com", "ADA@example.com")
    ]
    replayed_delivery(ledger, recipient="ada@example.org")

    for asked in ("ada@example.com", "aDa@EXAMPLE.com"):
        doc = json.loads(ok(capsys, "history", "--recipient", asked, "--json"))
        assert [d["delivery_id"] for d in doc["deliveries"]] == list(reversed(spelled))
        assert [d["recipient"] for d in doc["deliveries"]] == ["ADA@example.com", "Ada@Example.com"]


# --- stats ----------------------------------------------------------------------------------


def insert(
    conn: psycopg.Connection[Any],
    workflow: str,
    status: Status,
    *,
    queued_ago: float = 3600,
    send_seconds: float | None = None,
    attempts: int = 1,
) -> str:
    """A row that reached `status` through legal transitions, queued `queued_ago` s ago."""
    delivery_id = next(_ids)
    start = Status.FAILED if status is Status.FAILED else Status.IN_PROGRESS
    if status in (Status.QUEUED, Status.RETRYING):
        start = Status.QUEUED
    conn.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status, attempts,"
        " queued_at, claim_token, lease_expires_at) VALUES (%(id)s, %(workflow)s,"
        " 'ada@example.com', %(start)s, %(attempts)s, now() - %(ago)s * interval '1 second',"
        " CASE WHEN %(claimed)s THEN gen_random_uuid() END,"
        " CASE WHEN %(claimed)s THEN now() + interval '1 hour' END)",
        {
            "id": delivery_id,
            "workflow": workflow,
            "start": start.value,
            "attempts": attempts,
            "ago": queued_ago,
            "claimed": start is Status.IN_PROGRESS,
        },
    )
    if status is Status.RETRYING:
        conn.execute(
            "UPDATE email.deliveries SET status = 'in_progress', claim_token = gen_random_uuid(),"
            " lease_expires_at = now() + interval '1 hour' WHERE delivery_id = %s",
            (delivery_id,),
        )
    if status in (Status.SENT, Status.DEAD_LETTER, Status.RETRYING):
        conn.execute(
            "UPDATE email.deliveries SET status = %(status)s, claim_token = NULL,"
            " lease_expires_at = NULL,"
            " sent_at = queued_at + %(send)s * interval '1 second' WHERE delivery_id = %(id)s",
            {"status": status.value, "send": send_seconds, "id": delivery_id},
        )
    return delivery_id


def percentile_cont(values: list[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_stats_per_workflow(
    admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    invite_seconds = [2.0, 3.5, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0, 95.0, 120.0]
    for index, seconds in enumerate(invite_seconds):
        insert(admin, "invite", Status.SENT, send_seconds=seconds, attempts=1 + index % 3)
    insert(admin, "invite", Status.FAILED, attempts=1)
    insert(admin, "invite", Status.DEAD_LETTER, attempts=5)
    insert(admin, "invite", Status.QUEUED, attempts=0)
    reset_seconds = [1.0, 4.0]
    for seconds in reset_seconds:
        insert(admin, "password-reset", Status.SENT, send_seconds=seconds, attempts=2)
    insert(admin, "password-reset", Status.RETRYING, attempts=1)
    insert(admin, "password-reset", Status.IN_PROGRESS, attempts=1)
    # Queued two days ago: outside --since 24h.
    insert(admin, "invite", Status.SENT, queued_ago=2 * 86400, send_seconds=1000.0)
    insert(admin, "verification-code", Status.FAILED, queued_ago=2 * 86400)

    doc = json.loads(ok(capsys, "stats", "--json"))
    assert (doc["since"], doc["since_seconds"]) == ("24h", 86400.0)
    by_workflow = {row["workflow"]: row for row in doc["workflows"]}
    assert list(by_workflow) == ["invite", "password-reset", "all"]

    invite = by_workflow["invite"]
    assert invite["counts"] == {
        "queued": 1,
        "in_progress": 0,
        "sent": 10,
        "retrying": 0,
        "failed": 1,
        "dead_letter": 1,
        "skipped": 0,
    }
    assert (invite["total"], invite["finished"]) == (13, 12)
    assert invite["success_rate"] == pytest.approx(10 / 12)
    invite_attempts = [1 + i % 3 for i in range(10)] + [1, 5]
    assert invite["mean_attempts"] == pytest.approx(sum(invite_attempts) / 12)
    assert invite["p50_seconds"] == pytest.approx(percentile_cont(invite_seconds, 0.5))
    assert invite["p95_seconds"] == pytest.approx(percentile_cont(invite_seconds, 0.95))

    reset = by_workflow["password-reset"]
    assert (reset["total"], reset["success_rate"], reset["mean_attempts"]) == (4, 1.0, 2.0)
    assert reset["counts"]["retrying"] == 1 and reset["counts"]["in_progress"] == 1
    assert reset["p95_seconds"] == pytest.approx(percentile_cont(reset_seconds, 0.95))

    total = by_workflow["all"]
    assert total["is_total"] and total["total"] == 17
    everything = invite_seconds + reset_seconds
    assert total["p50_seconds"] == pytest.approx(percentile_cont(everything, 0.5))

    week = json.loads(ok(capsys, "stats", "--since", "7d", "--json"))
    assert [row["workflow"] for row in week["workflows"]] == [
        "invite",
        "password-reset",
        "verification-code",
        "all",
    ]
    assert week["workflows"][-1]["total"] == 19

    # The per-workflow table; the per-relay one follows after a blank line.
    lines = ok(capsys, "stats").split("\n\n")[0].splitlines()
    assert lines[0] == "deliveries queued in the last 24h"
    assert lines[1].split()[:2] == ["WORKFLOW", "TOTAL"]
    invite_line = lines[2].split()
    assert lines[1].split()[2:9] == [s.value.upper() for s in Status]
    assert invite_line[:9] == ["invite", "13", "1", "0", "10", "0", "1", "1", "0"]
    # skipped, by code
    assert lines[1].split()[9:12] == ["SUPPRESSED", "RATE_LIMITED", "EXPIRED"]
    assert invite_line[9:12] == ["0", "0", "0"]
    assert invite_line[12] == "83.3%" and lines[-1].split()[0] == "all"


def test_stats_time_to_send_from_the_publish_time(
    admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """published_at -> sent_at at p50, p95 and p99 per workflow; rows without a publish time
    (written before migration 010) are left out; expired skips are counted by their code."""
    code_seconds = [0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 40.0, 300.0]
    for seconds in code_seconds:
        delivery_id = insert(admin, "verification-code", Status.SENT, send_seconds=1.0)
        admin.execute(
            "UPDATE email.deliveries SET published_at = sent_at - %s * interval '1 second'"
            " WHERE delivery_id = %s",
            (seconds, delivery_id),
        )
    insert(admin, "verification-code", Status.SENT, send_seconds=9999.0)  # no publish time
    admin.execute(
        "INSERT INTO email.deliveries (delivery_id, workflow, recipient, status,"
        " status_reason, last_error_code) VALUES ('gone', 'verification-code',"
        " 'ada@example.com', 'skipped', 'expired', 'EXPIRED')"
    )

    doc = json.loads(ok(capsys, "stats", "--json"))
    [code, total] = doc["workflows"]
    assert code["workflow"] == "verification-code"
    assert code["skipped_by_code"] == {"SUPPRESSED": 0, "RATE_LIMITED": 0, "EXPIRED": 1}
    expected = {
        f"p{n}_seconds": pytest.approx(percentile_cont(code_seconds, n / 100)) for n in (50, 95, 99)
    }
    assert code["time_to_send"] == expected
    assert total["time_to_send"] == expected
    # The queued -> sent figures are still there, over every sent row.
    assert code["p50_seconds"] == pytest.approx(1.0)

    lines = ok(capsys, "stats").splitlines()
    headers = lines[1].split()
    assert headers[-3:] == ["SEND_P50", "SEND_P95", "SEND_P99"]
    row = dict(zip(headers, lines[2].split(), strict=True))
    assert (row["EXPIRED"], row["SEND_P50"], row["SEND_P95"], row["SEND_P99"]) == (
        "1",
        f"{percentile_cont(code_seconds, 0.5):.1f}s",
        f"{percentile_cont(code_seconds, 0.95):.1f}s",
        f"{percentile_cont(code_seconds, 0.99):.1f}s",
    )


def test_stats_per_relay(
    admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Emails each relay accepted with the p50/p95 of that SMTP exchange, and its failed send
    attempts by kind (the audit rows marked attempt_failed)."""
    for relay, smtp_ms in [("primary", 10), ("primary", 30), ("primary", 50), ("fallback", 200)]:
        delivery_id = insert(admin, "verification-code", Status.SENT, send_seconds=1.0)
        admin.execute(
            "UPDATE email.deliveries SET relay = %s, smtp_ms = %s WHERE delivery_id = %s",
            (relay, smtp_ms, delivery_id),
        )
    for relay, transient in [("primary", True), ("primary", True), ("primary", False)]:
        admin.execute(
            "INSERT INTO email.delivery_events (delivery_id, status, attempt, error_code, payload)"
            " VALUES (%s, 'in_progress', 1, 'SMTP_421', jsonb_build_object('relay', %s::text,"
            " 'attempt_failed', true, 'transient', %s))",
            (delivery_id, relay, transient),
        )
    doc = json.loads(ok(capsys, "stats", "--json"))
    assert doc["relays"] == [
        {
            "relay": "primary",
            "sent": 3,
            "transient_failures": 2,
            "permanent_failures": 1,
            "smtp_p50_ms": pytest.approx(30.0),
            "smtp_p95_ms": pytest.approx(48.0),
        },
        {
            "relay": "fallback",
            "sent": 1,
            "transient_failures": 0,
            "permanent_failures": 0,
            "smtp_p50_ms": pytest.approx(200.0),
            "smtp_p95_ms": pytest.approx(200.0),
        },
    ]
    text = ok(capsys, "stats")
    relay_lines = text.split("\n\n")[1].splitlines()
    assert relay_lines[0].split() == [
        "RELAY", "SENT", "TRANSIENT_FAILURES", "PERMANENT_FAILURES", "SMTP_P50", "SMTP_P95"
    ]  # fmt: skip
    assert relay_lines[1].split() == ["primary", "3", "2", "1", "30ms", "48ms"]
    assert relay_lines[2].split() == ["fallback", "1", "0", "0", "200ms", "200ms"]


def test_relays_shows_each_circuit(
    admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    admin.execute(
        "UPDATE email.relay_circuits SET consecutive_failures = 5, opened_at = now(),"
        " reopens_at = now() + interval '30 seconds', last_error_code = 'SMTP_421',"
        " last_error_message = '421 4.3.2 busy' WHERE relay = 'primary'"
    )
    admin.execute(
        "UPDATE email.relay_circuits SET consecutive_failures = 7,"
        " opened_at = now() - interval '1 minute', reopens_at = now() - interval '1 second'"
        " WHERE relay = 'fallback'"
    )
    doc = json.loads(ok(capsys, "relays", "--json"))
    assert [
        (r["relay"], r["state"], r["consecutive_failures"], r["last_error_code"])
        for r in doc["relays"]
    ] == [("primary", "open", 5, "SMTP_421"), ("fallback", "half-open", 7, None)]
    assert doc["relays"][0]["reopens_at"] is not None
    lines = ok(capsys, "relays").splitlines()
    assert lines[0].split() == ["RELAY", "STATE", "FAILURES", "REOPENS_AT", "LAST_ERROR"]
    assert lines[1].startswith("primary") and "open" in lines[1]
    assert lines[1].endswith("SMTP_421: 421 4.3.2 busy")
    assert lines[2].split()[:3] == ["fallback", "half-open", "7"]

    admin.execute(
        "UPDATE email.relay_circuits SET consecutive_failures = 0, opened_at = NULL,"
        " reopens_at = NULL"
    )
    doc = json.loads(ok(capsys, "relays", "--json"))
    assert [r["state"] for r in doc["relays"]] == ["closed", "closed"]


def test_stats_of_an_empty_window(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert ok(capsys, "stats", "--since", "30m") == "no deliveries queued in the last 30m\n"
    assert json.loads(ok(capsys, "stats", "--json"))["workflows"] == []


# --- prune ----------------------------------------------------------------------------------


def age(conn: psycopg.Connection[Any], delivery_id: str, days: int) -> None:
    """Backdate updated_at, which the transition trigger otherwise always sets to now()."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # no triggers
        conn.execute(
            "UPDATE email.deliveries SET updated_at = now() - %s * interval '1 day'"
            " WHERE delivery_id = %s",
            (days, delivery_id),
        )


def remaining(conn: psycopg.Connection[Any]) -> tuple[set[str], set[str]]:
    deliveries = {r for (r,) in conn.execute("SELECT delivery_id FROM email.deliveries")}
    events = {r for (r,) in conn.execute("SELECT DISTINCT delivery_id FROM email.delivery_events")}
    return deliveries, events


def test_prune_deletes_only_old_finished_rows_and_their_events(
    admin: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    old_finished = [
        insert(admin, "invite", Status.SENT, send_seconds=1.0),  # 2 events
        insert(admin, "invite", Status.FAILED),  # 1 event
        insert(admin, "invite", Status.DEAD_LETTER),  # 2 events
    ]
    old_unfinished = [
        insert(admin, "invite", Status.QUEUED),
        insert(admin, "invite", Status.IN_PROGRESS),
        insert(admin, "invite", Status.RETRYING),
    ]
    recent = [
        insert(admin, "invite", Status.SENT, send_seconds=1.0),
        insert(admin, "x", Status.FAILED),
    ]
    for delivery_id in old_finished + old_unfinished:
        age(admin, delivery_id, 91)
    age(admin, recent[0], 89)
    everything = set(old_finished + old_unfinished + recent)
    assert remaining(admin) == (everything, everything)

    out = ok(capsys, "prune", "--older-than", "90d", "--dry-run")
    assert out == (
        "would delete 3 deliveries and 5 events (finished, last updated more than 90d ago)\n"
    )
    assert remaining(admin) == (everything, everything)

    out = ok(capsys, "prune", "--older-than", "90d", "--batch-size", "2")
    assert out == (
        "deleted 3 deliveries and 5 events (finished, last updated more than 90d ago)"
        " in 2 batch(es)\n"
    )
    kept = everything - set(old_finished)
    assert remaining(admin) == (kept, kept)
    assert ok(capsys, "prune", "--older-than", "90d").startswith("deleted 0 deliveries")


# --- publish --------------------------------------------------------------------------------


def test_publish_enqueues_one_checked_event(
    pubsub: PubSubNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ok(
        capsys,
        "publish",
        "--workflow",
        "verification-code",
        "--recipient",
        "ada@example.com",
        "--data",
        '{"code": "739154", "expires_in_minutes": 10}',
        "--delivery-id",
        "signup:42",
        "--metadata",
        '{"tenant": "acme"}',
        "--locale",
        "fr",
    )
    lines = out.splitlines()
    assert lines[0] == "delivery_id signup:42"
    [received] = pubsub.deliveries(timeout=5)
    assert lines[1] == f"message_id {received.message.message_id}"
    assert json.loads(received.message.data) == {
        "delivery_id": "signup:42",
        "workflow": "verification-code",
        "recipient": "ada@example.com",
        "data": {"code": "739154", "expires_in_minutes": 10},
        "metadata": {"tenant": "acme"},
        "locale": "fr",
    }

    out = ok(
        capsys,
        "publish",
        "--workflow",
        "password-reset",
        "--recipient",
        "b@example.com",
        "--data",
        '{"reset_url": "https://app.example.com/r/1"}',
    )
    generated = out.splitlines()[0].split()[1]
    assert generated.startswith("cli_") and len(generated) == 36
    [received] = pubsub.deliveries(timeout=5)
    assert json.loads(received.message.data)["delivery_id"] == generated


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", '{"code": "1"}'], "error: invalid event: data.code: required: "),
        (
            ["--data", "{}", "--recipient", "Ada <a@example.com>"],
            "error: invalid event: recipient: ",
        ),
        (["--data", "{}", "--workflow", "newsletter"], "error: invalid event: workflow: required"),
    ],
    ids=["bad variable", "display name", "unknown workflow"],
)
def test_publish_refuses_a_bad_event_locally(
    pubsub: PubSubNamespace,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    base = {"--workflow": "verification-code", "--recipient": "ada@example.com"}
    overrides = dict(zip(args[::2], args[1::2], strict=True))
    argv = [item for pair in ({**base, **overrides}).items() for item in pair]
    assert one_line_error(capsys, "publish", *argv).startswith(expected)
    assert pubsub.deliveries(timeout=0.5) == []


# --- failures and real processes --------------------------------------------------------------


def test_unreachable_database_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("DB_TIMEOUT_SECONDS", "2")
    error = one_line_error(capsys, "history", "--recipient", "a@example.com")
    assert error.startswith("error: database: ") and "refused" in error


def cli_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_real_processes(ledger: Ledger, database_url: str) -> None:
    delivery_id = replayed_delivery(ledger)
    done = cli_process("-m", "worker", "status", delivery_id, env={"DATABASE_URL": database_url})
    assert done.returncode == 0 and done.stderr == ""
    assert "queued (replay)" in done.stdout

    done = cli_process("-m", "worker", "status", "nope", env={"DATABASE_URL": database_url})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "error: no delivery with id 'nope'\n"

    # The CLI (and replay, until it runs) must not pay for the Pub/Sub client library.
    check = (
        "import sys, worker.ops.cli, worker.ops.replay;"
        " print('google.cloud.pubsub_v1' in sys.modules)"
    )
    done = cli_process("-c", check, env={})
    assert done.stdout.strip() == "False", done.stderr
