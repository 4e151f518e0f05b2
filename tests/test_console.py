"""The support console's JSON API, served by functions-framework (`delivery_console`) as an
`email_reader` login against real PostgreSQL: lookups, pagination edges, bad parameters,
hostile stored text, the response headers, and a role that cannot write."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
import pytest

from tests.harness.console import (
    CURSOR_KEY,
    Console,
    ConsoleDb,
    Reply,
    provider_event,
    seed,
    suppress,
)
from tests.harness.function import ROOT, FunctionServer
from tests.harness.postgres import free_port
from worker.console.app import SECURITY_HEADERS
from worker.console.cursors import Cursors, Listing

XSS_WORKFLOW = '<img src=x onerror="window.__xss=1">'
XSS_ERROR = "<script>window.__xss=2</script> 550 rejected"
XSS_RECIPIENT = '"<svg/onload=window.__xss=3>"@example.com'
# A cursor that decodes to 2,000 nested lists: JSON's parser recurses once per `[`.
DEEP_CURSOR = base64.urlsafe_b64encode(b"[" * 2000).decode()


def api(console: Console, path: str, **params: Any) -> Reply:
    query = f"?{urlencode(params)}" if params else ""
    return console.get(path + query)


def ok(console: Console, path: str, **params: Any) -> Any:
    reply = api(console, path, **params)
    assert reply.status == 200, reply.text
    return reply.json()


def secured(reply: Reply) -> None:
    """The defence-in-depth headers, exactly as on every other response."""
    for name, value in SECURITY_HEADERS.items():
        assert reply.headers.get(name.lower()) == value, (name, reply.status, reply.headers)


def bad(console: Console, path: str, parameter: str, **params: Any) -> str:
    reply = api(console, path, **params)
    assert reply.status == 400, reply.text
    secured(reply)
    doc = reply.json()
    assert (doc["error"], doc["parameter"]) == ("bad_parameter", parameter)
    assert doc["message"].startswith(f"{parameter}: ")
    return str(doc["message"])


# --- one delivery ---------------------------------------------------------------------------


def test_a_delivery_with_its_events_in_order(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    delivery_id = seed(admin_conn, recipient="grace@example.com", transient_errors=2)
    doc = ok(console, f"/api/deliveries/{delivery_id}")
    delivery = doc["delivery"]
    assert delivery["delivery_id"] == delivery_id
    assert (delivery["status"], delivery["attempts"], delivery["workflow"]) == ("sent", 3, "invite")
    # Masked: this was a lookup by id, not a search for the address.
    assert (delivery["recipient"], delivery["recipient_masked"]) == ("g***@example.com", True)
    assert delivery["provider_message_id"] == f"<{delivery_id}@example.com>"
    assert delivery["sent_at"].endswith("Z") and delivery["last_error_code"] is None
    # No template data and no metadata: the console shows only the ledger's own columns.
    assert "metadata" not in delivery and "claim_token" not in delivery
    statuses = [(e["status"], e["attempt"], e["error_code"]) for e in doc["events"]]
    assert statuses == [
        ("in_progress", 1, None),
        ("retrying", 1, "SMTP_421"),
        ("in_progress", 2, None),
        ("retrying", 2, "SMTP_421"),
        ("in_progress", 3, None),
        ("sent", 3, None),
    ]
    assert [e["from"] for e in doc["events"]][:3] == [None, "in_progress", "retrying"]
    assert doc["events"] == sorted(doc["events"], key=lambda e: e["id"])
    assert set(doc) == {"delivery", "events", "provider_events", "suppression"}


def test_unknown_and_malformed_delivery_ids(console: Console) -> None:
    reply = api(console, "/api/deliveries/no-such-delivery")
    assert reply.status == 404
    assert reply.json() == {"error": "not_found", "message": "no delivery with id no-such-delivery"}
    # Not an id at all (the ledger's rule): 400, naming the parameter, never echoing the value.
    for hostile in ("<script>alert(1)</script>", "a" * 201, "x y"):
        reply = console.get(f"/api/deliveries/{quote(hostile, safe='')}")
        assert reply.status == 400, hostile
        doc = reply.json()
        assert doc["parameter"] == "delivery_id" and "<" not in reply.text
    assert bad(console, "/api/deliveries/c0001", "verbose", verbose="1")


def test_provider_events_in_the_order_they_happened_and_the_suppression(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    delivery_id = seed(admin_conn, recipient="Bounce.Me@example.com", created_ago=600)
    # The bounce arrives first; the earlier delivery report after it.
    diagnostic = "550 5.1.1 <Bounce.Me@example.com>: user unknown"
    assert (
        provider_event(
            admin_conn,
            delivery_id,
            "bounced",
            occurred_ago=60,
            bounce_type="Permanent/General",
            detail={"diagnostic": diagnostic},
        )
        == "applied"
    )
    assert provider_event(admin_conn, delivery_id, "delivered", occurred_ago=300) == "applied"

    doc = ok(console, f"/api/deliveries/{delivery_id}")
    delivery = doc["delivery"]
    assert (delivery["provider_status"], delivery["bounce_type"]) == (
        "bounced",
        "Permanent/General",
    )
    assert delivery["delivered_at"] < delivery["bounced_at"]
    events = doc["provider_events"]
    assert [(e["provider"], e["event_type"]) for e in events] == [
        ("ses", "delivered"),
        ("ses", "bounced"),
    ]
    # The diagnostic quotes the address: masked like the recipient.
    assert events[1]["detail"] == {"diagnostic": "550 5.1.1 <B***@example.com>: user unknown"}
    assert "Bounce.Me" not in json.dumps(doc)
    # The database's own audit rows say when the provider status changed.
    changes = [e["payload"].get("provider_status") for e in doc["events"]]
    assert [change for change in changes if change] == ["bounced"]
    suppression = doc["suppression"]
    assert suppression == {
        "address": "b***@example.com",
        "address_masked": True,
        "reason": "hard_bounce",
        "delivery_id": delivery_id,
        "created_at": suppression["created_at"],
        "expires_at": None,
        "active": True,
    }


def test_suppressions_newest_first_filtered_and_paged(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    suppress(admin_conn, "old-manual@example.net", created_ago=5000)
    suppress(admin_conn, "complainer@example.net", "complaint", created_ago=4000)
    suppress(admin_conn, "expired@example.net", created_ago=3000, expires_in=-60)
    suppress(admin_conn, "later@example.net", created_ago=2000, expires_in=86400)
    suppress(admin_conn, "Recent@Example.net", created_ago=1000)
    mine = [
        d
        for d in ok(console, "/api/suppressions", limit=200)["suppressions"]
        if d["address"].endswith("@example.net")
    ]
    assert [d["address"] for d in mine] == [
        "r***@example.net",
        "l***@example.net",
        "e***@example.net",
        "c***@example.net",
        "o***@example.net",
    ]
    assert [d["active"] for d in mine] == [True, True, False, True, True]

    exact = ok(console, "/api/suppressions", address="RECENT@example.net")["suppressions"]
    assert [(d["address"], d["address_masked"]) for d in exact] == [("recent@example.net", False)]
    complaints = ok(console, "/api/suppressions", reason="complaint")["suppressions"]
    assert "c***@example.net" in [d["address"] for d in complaints]
    assert all(d["reason"] == "complaint" for d in complaints)
    inactive = ok(console, "/api/suppressions", active="false")["suppressions"]
    assert [d["address"] for d in inactive] == ["e***@example.net"]

    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        doc = ok(console, "/api/suppressions", **params)
        assert len(doc["suppressions"]) <= 2
        seen += [d["address"] for d in doc["suppressions"]]
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    everything = [d["address"] for d in ok(console, "/api/suppressions", limit=200)["suppressions"]]
    assert seen == everything

    assert bad(console, "/api/suppressions", "reason", reason="spam")
    assert bad(console, "/api/suppressions", "active", active="yes")
    assert bad(console, "/api/suppressions", "address", address="nobody")


def test_a_skipped_delivery(console: Console, admin_conn: psycopg.Connection[Any]) -> None:
    delivery_id = seed(
        admin_conn,
        recipient="skip@example.com",
        outcome="skipped",
        error=("SUPPRESSED", "recipient is on the suppression list"),
    )
    found = ok(console, "/api/deliveries", recipient="skip@example.com", status="skipped")
    assert [d["delivery_id"] for d in found["deliveries"]] == [delivery_id]
    assert found["deliveries"][0]["last_error_code"] == "SUPPRESSED"


# --- searches and pagination ------------------------------------------------------------------


def test_search_by_recipient_shows_the_full_address_newest_first(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    older = seed(admin_conn, recipient="Ada.Lovelace@Example.com", created_ago=7200)
    newer = seed(admin_conn, recipient="ada.lovelace@example.com", created_ago=60)
    seed(admin_conn, recipient="someone-else@example.com", created_ago=30)
    # As stored, with the domain's case ignored, and all lower-case are the same address.
    doc = ok(console, "/api/deliveries", recipient="Ada.Lovelace@EXAMPLE.com")
    assert [d["delivery_id"] for d in doc["deliveries"]] == [newer, older]
    assert [d["recipient"] for d in doc["deliveries"]] == [
        "ada.lovelace@example.com",
        "Ada.Lovelace@Example.com",
    ]
    assert not any(d["recipient_masked"] for d in doc["deliveries"])
    assert doc["next_cursor"] is None
    # Without the address in the search, every recipient is masked.
    everyone = ok(console, "/api/deliveries", limit=200)["deliveries"]
    assert everyone and all(d["recipient_masked"] for d in everyone if d["recipient"])
    assert "ada.lovelace@example.com" not in json.dumps(everyone).lower()


def test_cursor_pagination_edges(console: Console, admin_conn: psycopg.Connection[Any]) -> None:
    recipient = "pages@example.com"
    ids = [seed(admin_conn, recipient=recipient, created_ago=1000 - n) for n in range(5)]
    # Two rows created in the same instant are ordered by id, and neither is lost at a cut.
    admin_conn.execute(
        "UPDATE email.deliveries SET created_at = (SELECT created_at FROM email.deliveries"
        " WHERE delivery_id = %s) WHERE delivery_id = %s",
        (ids[2], ids[3]),
    )
    expected = [ids[4], ids[3], ids[2], ids[1], ids[0]]  # ids[3] > ids[2] at the same instant

    def walk(limit: int) -> list[list[str]]:
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"recipient": recipient, "limit": limit}
            if cursor:
                params["cursor"] = cursor
            doc = ok(console, "/api/deliveries", **params)
            pages.append([d["delivery_id"] for d in doc["deliveries"]])
            cursor = doc["next_cursor"]
            if cursor is None:
                return pages

    assert walk(2) == [expected[0:2], expected[2:4], expected[4:5]]
    assert walk(1) == [[delivery_id] for delivery_id in expected]
    # Exactly one full page: no cursor to an empty page.
    assert walk(5) == [expected]
    assert walk(200) == [expected]

    # A delivery created after page 1 was read does not shift page 2.
    first = ok(console, "/api/deliveries", recipient=recipient, limit=2)
    seed(admin_conn, recipient=recipient, created_ago=0)
    second = ok(
        console, "/api/deliveries", recipient=recipient, limit=2, cursor=first["next_cursor"]
    )
    assert [d["delivery_id"] for d in second["deliveries"]] == expected[2:4]


def test_filters(console: Console, admin_conn: psycopg.Connection[Any]) -> None:
    recipient = "filters@example.com"
    sent = seed(admin_conn, recipient=recipient, workflow="password-reset", created_ago=100)
    failed = seed(admin_conn, recipient=recipient, workflow="password-reset", outcome="failed")
    old = seed(admin_conn, recipient=recipient, workflow="password-reset", created_ago=3 * 86400)
    base = {"recipient": recipient, "workflow": "password-reset"}

    def found(**params: Any) -> list[str]:
        return [
            d["delivery_id"] for d in ok(console, "/api/deliveries", **base, **params)["deliveries"]
        ]

    assert found() == [sent, failed, old]
    assert found(status="failed") == [failed]
    assert found(since="24h") == [sent, failed]
    assert found(status="sent", since="7d") == [sent, old]
    assert ok(console, "/api/deliveries", workflow="no-such-workflow")["deliveries"] == []


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"status": "delivered"}, "status"),
        ({"since": "yesterday"}, "since"),
        ({"since": "0h"}, "since"),
        ({"since": "400d"}, "since"),
        ({"recipient": "not-an-address"}, "recipient"),
        ({"recipient": "a b@example.com"}, "recipient"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": "WyJub3QtYS1kYXRlIiwieCJd"}, "cursor"),  # ["not-a-date","x"]
        ({"cursor": DEEP_CURSOR}, "cursor"),
        ({"cursor": "[" * 2000}, "cursor"),
        (
            {"cursor": base64.urlsafe_b64encode(b'["2026-01-01T00:00:00+00:00",1e999]').decode()},
            "cursor",
        ),
        (
            {
                "cursor": base64.urlsafe_b64encode(
                    b'["2026-01-01T00:00:00+00:00",' + b"9" * 5000 + b"]"
                ).decode()
            },
            "cursor",
        ),
        ({"cursor": "v1." + "W" * 5000 + "." + "A" * 43}, "cursor"),
        ({"cursor": "v1.%%%%.%%%%"}, "cursor"),
        ({"limit": "9" * 5000}, "limit"),  # int() of it would raise, not answer
        ({"limit": "1" + "0" * 400}, "limit"),
        ({"workflow": "in\0vite"}, "workflow"),  # PostgreSQL text cannot hold NUL
        ({"recipient": "a\0b@example.com"}, "recipient"),
        ({"recipeint": "ada@example.com"}, "recipeint"),
        ({"workflow": "w" * 101}, "workflow"),
    ],
)
def test_malformed_search_parameters_are_400_naming_the_parameter(
    console: Console, params: dict[str, str], parameter: str
) -> None:
    message = bad(console, "/api/deliveries", parameter, **params)
    # The rule, never the value (a long enough value would show if it were echoed).
    for value in params.values():
        assert len(value) < 4 or value not in message


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": DEEP_CURSOR},
        {"cursor": "[" * 2000},
        {"cursor": "v1.bnVsbA." + "A" * 43},
        {"limit": "9" * 5000},
        {"reason": "manual\0"},
        {"address": "x\0@example.com"},
    ],
)
def test_malformed_suppression_parameters_are_400_with_the_headers(
    console: Console, params: dict[str, str]
) -> None:
    bad(console, "/api/suppressions", next(iter(params)), **params)


def test_a_malformed_cursor_on_a_page_is_the_400_page_with_the_headers(console: Console) -> None:
    for cursor in (DEEP_CURSOR, "[" * 2000, "v1.bnVsbA." + "A" * 43, "%%%"):
        for query in ({"cursor": cursor}, {"q": "ada@example.com", "cursor": cursor}):
            reply = console.get("/?" + urlencode(query))
            assert reply.status == 400, reply.text
            assert reply.headers["content-type"].startswith("text/html")
            assert "cursor: must be" in reply.text and "[[[" not in reply.text
            secured(reply)
    reply = console.get("/?" + urlencode({"q": "x\0y"}))
    assert reply.status == 400 and "q: must not contain NUL" in reply.text
    secured(reply)


# --- signed cursors -------------------------------------------------------------------------


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def payload_of(cursor: str) -> Any:
    version, payload, _mac = cursor.split(".")
    assert version == "v1"
    return json.loads(unb64(payload))


def test_a_suppression_cursor_names_no_address(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    # The newest two entries of the list (other tests' entries are older).
    suppress(admin_conn, "grace@cursor.example", created_ago=-3600)
    suppress(admin_conn, "hopper@cursor.example", created_ago=-3599)
    doc = ok(console, "/api/suppressions", limit=1)
    assert doc["suppressions"][0]["address"] == "g***@cursor.example"
    cursor = doc["next_cursor"]
    # Every part of it decoded: nothing about whose entry it is.
    decoded = " ".join(unb64(part).decode(errors="replace") for part in cursor.split("."))
    assert "grace" not in decoded and "cursor.example" not in decoded, decoded
    # Its place in the list: when, and the row's id.
    assert "@" not in json.dumps(payload_of(cursor))
    when, key = payload_of(cursor)
    assert datetime.fromisoformat(when).tzinfo is not None and isinstance(key, int)
    following = ok(console, "/api/suppressions", limit=1, cursor=cursor)
    assert following["suppressions"][0]["address"] == "h***@cursor.example"


def test_suppressions_created_in_one_instant_page_by_id(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    for name in ("tie-b", "tie-a", "tie-c"):
        suppress(admin_conn, f"{name}@tie.example", created_ago=0)
    admin_conn.execute(
        "UPDATE email.suppressions SET created_at = '2001-02-03T04:05:06Z'"
        " WHERE address LIKE '%%@tie.example'"
    )
    rows = admin_conn.execute(
        "SELECT address FROM email.suppressions WHERE address LIKE '%%@tie.example' ORDER BY id"
    ).fetchall()
    newest_first = [f"{address[0]}***@tie.example" for (address,) in reversed(rows)]
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 1, "active": "true"}
        if cursor:
            params["cursor"] = cursor
        doc = ok(console, "/api/suppressions", **params)
        seen += [d["address"] for d in doc["suppressions"]]
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert seen[-3:] == newest_first


def test_only_a_cursor_the_console_signed_for_that_list_is_taken(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    suppress(admin_conn, "first@signed.example", created_ago=20)
    suppress(admin_conn, "second@signed.example", created_ago=21)
    # The old attack: a cursor of one's choosing, unsigned (as cursors used to be) or with the
    # MAC of another cursor, or signed with another key: all refused.
    guess = json.dumps(["2026-01-01T00:00:00+00:00", "grace@example.com"]).encode()
    bad(console, "/api/suppressions", "cursor", cursor=base64.urlsafe_b64encode(guess).decode())
    cursor = ok(console, "/api/suppressions", limit=1)["next_cursor"]
    when, key = payload_of(cursor)
    version, _payload, mac = cursor.split(".")
    moved = base64.urlsafe_b64encode(json.dumps([when, key + 1]).encode()).decode().rstrip("=")
    bad(console, "/api/suppressions", "cursor", cursor=f"{version}.{moved}.{mac}")
    theirs = Cursors(b"someone-else's-key-of-32-bytes!!").sign(
        Listing.SUPPRESSIONS, datetime.fromisoformat(when), key
    )
    bad(console, "/api/suppressions", "cursor", cursor=theirs)
    bad(console, "/api/suppressions", "cursor", cursor=cursor[:-1])
    # The console's own signature on another list's cursor does not carry over.
    seed(admin_conn, recipient="lists@signed.example", created_ago=30)
    seed(admin_conn, recipient="lists@signed.example", created_ago=31)
    deliveries = ok(console, "/api/deliveries", recipient="lists@signed.example", limit=1)
    bad(console, "/api/suppressions", "cursor", cursor=deliveries["next_cursor"])
    bad(console, "/api/deliveries", "cursor", cursor=cursor)
    reused = Cursors(CURSOR_KEY).sign(Listing.DELIVERIES, datetime.fromisoformat(when), str(key))
    assert ok(console, "/api/deliveries", cursor=reused)["deliveries"] is not None
    bad(console, "/api/suppressions", "cursor", cursor=reused)
    # And the genuine one still works.
    assert ok(console, "/api/suppressions", limit=1, cursor=cursor)["suppressions"]


# --- stats ----------------------------------------------------------------------------------


def test_stats_match_the_cli_and_count_the_window(
    console_db: ConsoleDb, console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    seed(admin_conn, workflow="password-reset", recipient="stats@example.com", send_seconds=4)
    seed(admin_conn, workflow="invite", recipient="stats@example.com", outcome="dead_letter")
    seed(
        admin_conn,
        recipient="stats@example.com",
        outcome="skipped",
        error=("SUPPRESSED", "recipient is on the suppression list"),
    )
    doc = ok(console, "/api/stats", since="7d")
    assert (doc["since"], doc["since_seconds"]) == ("7d", 7 * 86400.0)
    assert len(doc["timeline"]) == 24
    rows = {row["workflow"]: row for row in doc["workflows"]}
    total = rows.pop("all")
    assert total["is_total"] and total["total"] == sum(row["total"] for row in rows.values())
    assert (
        sum(sum(v for k, v in s.items() if k != "start") for s in doc["timeline"]) == total["total"]
    )
    assert total["counts"]["sent"] == sum(s["sent"] for s in doc["timeline"])

    # What `python -m worker stats --json` prints, field for field, for the same window.
    cli = subprocess.run(
        [sys.executable, "-m", "worker", "stats", "--since", "7d", "--json"],
        env={**os.environ, "DATABASE_URL": console_db.reader_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for printed in json.loads(cli.stdout)["workflows"]:
        shown = total if printed["is_total"] else rows[printed["workflow"]]
        assert {key: shown[key] for key in printed} == printed
    assert bad(console, "/api/stats", "since", since="forever")


def test_stats_show_the_time_to_send_from_the_publish_time(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    """Only these rows have a publish time (the seeds of the other tests have none), so the
    percentiles are theirs, interpolated between 4 s and 14 s."""
    for lag in (4, 14):
        delivery_id = seed(admin_conn, workflow="verification-code", recipient="tts@example.com")
        admin_conn.execute(
            "UPDATE email.deliveries SET published_at = sent_at - %s * interval '1 second'"
            " WHERE delivery_id = %s",
            (lag, delivery_id),
        )
    doc = ok(console, "/api/stats")
    rows = {row["workflow"]: row for row in doc["workflows"]}
    expected = {"p50_seconds": 9.0, "p95_seconds": 13.5, "p99_seconds": 13.9}
    for row in (rows["verification-code"], rows["all"]):
        assert row["time_to_send"] == {k: pytest.approx(v) for k, v in expected.items()}
    page = console.get("/stats")
    assert page.status == 200
    workflows_table = page.text.split("<h2>Relays</h2>")[0]
    headers = re.findall(r"<th>([^<]*)</th>", workflows_table)
    assert headers[-3:] == ["Time to send p50", "Time to send p95", "Time to send p99"]
    [row_html] = [r for r in page.text.split("<tr") if "<td>verification-code</td>" in r]
    assert re.findall(r'<td class="num">([^<]*)</td>', row_html)[-3:] == [
        "9.0 s",
        "13.5 s",
        "13.9 s",
    ]


def test_stats_show_each_relay_like_the_cli(
    console_db: ConsoleDb, console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    for relay, smtp_ms in [("primary", 20), ("fallback", 120), ("fallback", 140)]:
        delivery_id = seed(admin_conn, workflow="invite", recipient="relay@example.com")
        admin_conn.execute(
            "UPDATE email.deliveries SET relay = %s, smtp_ms = %s WHERE delivery_id = %s",
            (relay, smtp_ms, delivery_id),
        )
    admin_conn.execute(
        "INSERT INTO email.delivery_events (delivery_id, status, attempt, error_code, payload)"
        " VALUES (%s, 'in_progress', 1, 'CONN_REFUSED', '{\"relay\": \"primary\","
        ' "attempt_failed": true, "transient": true}\')',
        (delivery_id,),
    )
    doc = ok(console, "/api/stats", since="7d")
    relays = {r["relay"]: r for r in doc["relays"]}
    assert (relays["primary"]["sent"], relays["primary"]["transient_failures"]) == (1, 1)
    assert relays["fallback"]["sent"] == 2
    assert relays["fallback"]["smtp_p50_ms"] == pytest.approx(130.0)
    cli = subprocess.run(
        [sys.executable, "-m", "worker", "stats", "--since", "7d", "--json"],
        env={**os.environ, "DATABASE_URL": console_db.reader_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(cli.stdout)["relays"] == doc["relays"]
    page = console.get("/stats?since=7d")
    [relay_table] = re.findall(r"<h2>Relays</h2>(.*?)</table>", page.text, re.S)
    [fallback_row] = [r for r in relay_table.split("<tr") if "<td>fallback</td>" in r]
    assert re.findall(r'<td class="num">([^<]*)</td>', fallback_row) == [
        "2",
        "0",
        "0",
        "130 ms",
        "139 ms",
    ]


# --- hostile stored text, headers, no write path -----------------------------------------------


def test_hostile_stored_text_comes_back_as_data(
    console: Console, admin_conn: psycopg.Connection[Any]
) -> None:
    delivery_id = seed(
        admin_conn,
        workflow=XSS_WORKFLOW,
        recipient=XSS_RECIPIENT,
        outcome="failed",
        error=("SMTP_550", XSS_ERROR),
    )
    reply = console.get(f"/api/deliveries/{delivery_id}")
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-content-type-options"] == "nosniff"
    delivery = reply.json()["delivery"]
    assert (delivery["workflow"], delivery["last_error_message"]) == (XSS_WORKFLOW, XSS_ERROR)


def test_every_response_carries_the_security_headers(console: Console) -> None:
    for path in ("/", "/stats", "/api/stats", "/api/deliveries/nope", "/nowhere", "/api/x"):
        headers = console.get(path).headers
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp, path
        assert "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-store"
    head = console.get("/api/stats", method="HEAD")
    assert (head.status, head.body) == (200, b"")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_there_is_no_write_path(console: Console, method: str) -> None:
    for path in ("/api/deliveries/c0001", "/api/deliveries", "/api/suppressions", "/"):
        reply = console.get(path, method=method)
        assert reply.status == 405, (method, path)
        assert reply.headers["allow"] == "GET, HEAD"


def test_unknown_paths_are_404_json_under_api(console: Console) -> None:
    reply = console.get("/api/nothing-here")
    assert reply.status == 404 and reply.json()["error"] == "not_found"
    assert console.get("/nothing-here").headers["content-type"].startswith("text/html")


def test_the_console_role_cannot_write(console_db: ConsoleDb) -> None:
    from worker.console.config import console_database_settings
    from worker.store.db import open_pool

    settings = console_database_settings({"CONSOLE_DATABASE_URL": console_db.reader_url})
    pool = open_pool(settings, "email-console")
    try:
        with pool.connection() as conn:
            assert conn.execute("SELECT count(*) FROM email.deliveries").fetchone()
            for statement in (
                "UPDATE email.deliveries SET attempts = attempts + 1",
                "DELETE FROM email.delivery_events",
                "INSERT INTO email.deliveries (delivery_id, status) VALUES ('w', 'queued')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    finally:
        pool.close()


def test_an_unreachable_database_is_503_with_a_message() -> None:
    nowhere = f"postgresql://reader@127.0.0.1:{free_port()}/none"
    env = {
        "CONSOLE_DATABASE_URL": nowhere,
        "CONSOLE_CURSOR_KEY": CURSOR_KEY.decode(),
        "DB_TIMEOUT_SECONDS": "1",
        "DATABASE_URL": "",
    }
    server = FunctionServer(env, target="delivery_console", signature_type="http").start()
    try:
        console = Console(server)
        reply = console.get("/api/deliveries/c0001")
        assert reply.status == 503
        assert reply.json() == {
            "error": "unavailable",
            "message": "the ledger database is unreachable",
        }
        page = console.get("/stats")
        assert page.status == 503 and "the ledger database is unreachable" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
    finally:
        server.stop()


def test_an_unexpected_failure_is_a_500_with_the_headers_and_no_traceback(
    empty_database_url: str,
) -> None:
    """A console pointed at a database nobody migrated: every query fails in a way no route
    expects. The answer is still the console's own, and the details are in its log only."""
    env = {
        "CONSOLE_DATABASE_URL": empty_database_url,
        "CONSOLE_CURSOR_KEY": CURSOR_KEY.decode(),
        "DATABASE_URL": "",
    }
    server = FunctionServer(env, target="delivery_console", signature_type="http").start()
    try:
        console = Console(server)
        replies = {
            path: console.get(path)
            for path in ("/api/stats", "/api/suppressions", "/api/deliveries/c0001", "/stats", "/")
        }
        logs = server.logs()
    finally:
        server.stop()
    for path, reply in replies.items():
        assert reply.status == 500, (path, reply.text)
        secured(reply)
        for leak in ("Traceback", "psycopg", "UndefinedTable", "email.", 'File "'):
            assert leak not in reply.text, (path, reply.text)
        if path.startswith("/api/"):
            assert reply.json() == {
                "error": "internal",
                "message": "the console failed on this request; its log says why",
            }
        else:
            assert reply.headers["content-type"].startswith("text/html")
            assert "the console failed on this request" in reply.text
    failures = [line for line in logs.splitlines() if "email-console: internal error" in line]
    assert len(failures) == len(replies), logs
    assert "on /api/stats: UndefinedTable:" in failures[0] and "reports.py:" in failures[0]


# --- settings ---------------------------------------------------------------------------------


def import_main(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "DATABASE_URL"))}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, main; print(sorted(m for m in sys.modules"
            " if m.startswith('worker.console')))",
        ],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_console_target_needs_only_its_own_settings() -> None:
    missing = import_main({"FUNCTION_TARGET": "delivery_console"})
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "email-worker: configuration error: CONSOLE_DATABASE_URL or CONSOLE_DATABASE_URL_SECRET"
        " is required but not set"
    ]
    url = "postgresql://reader@127.0.0.1:1/none"
    env = {"FUNCTION_TARGET": "delivery_console", "CONSOLE_DATABASE_URL": url}
    no_key = import_main(env)
    assert no_key.returncode == 1
    assert no_key.stderr.strip().splitlines() == [
        "email-worker: configuration error: CONSOLE_CURSOR_KEY or CONSOLE_CURSOR_KEY_SECRET"
        " is required but not set (at least 32 random bytes, e.g. `openssl rand -base64 48`)"
    ]
    short = import_main({**env, "CONSOLE_CURSOR_KEY": "too-short-a-secret"})
    assert short.returncode == 1
    assert short.stderr.strip().splitlines() == [
        "email-worker: configuration error: CONSOLE_CURSOR_KEY must be at least 32 bytes, got 18"
        " (e.g. `openssl rand -base64 48`)"
    ]
    assert "too-short-a-secret" not in short.stderr
    started = import_main({**env, "CONSOLE_CURSOR_KEY": CURSOR_KEY.decode()})
    assert started.returncode == 0, started.stderr


def test_the_delivery_path_never_loads_the_console() -> None:
    env = {
        "DATABASE_URL": "postgresql://worker@127.0.0.1:1/none",
        "SMTP_HOST": "127.0.0.1",
        "EMAIL_FROM": "no-reply@example.com",
        "GOOGLE_CLOUD_PROJECT": "p",
        "DELIVERY_TOPIC": "t",
        "DEAD_LETTER_TOPIC": "d",
    }
    loaded = import_main(env)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
