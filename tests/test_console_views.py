"""The console's pure parts: signed cursors, masking, the chart's geometry (no I/O)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.console import chart, views
from worker.console.cursors import MAX_CURSOR, BadCursor, Cursors, Listing

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
WHEN = datetime(2026, 11, 23, 9, 30, 15, 123456, tzinfo=UTC)
dates = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forge(payload: bytes, *, key: bytes = KEY, listing: str = "suppressions") -> str:
    """A cursor made from the format's definition (not the code's): HMAC-SHA256 over
    `v1 NUL list NUL payload`."""
    mac = hmac.new(key, b"v1\0" + listing.encode() + b"\0" + payload, hashlib.sha256).digest()
    return f"v1.{b64(payload)}.{b64(mac)}"


def refused(read: Callable[[str], object], cursor: str) -> None:
    with pytest.raises(BadCursor):
        read(cursor)


@given(when=dates, key=st.from_regex(r"[A-Za-z0-9._:@-]{1,200}", fullmatch=True))
def test_a_delivery_cursor_comes_back_as_it_went(when: datetime, key: str) -> None:
    cursors = Cursors(KEY)
    cursor = cursors.for_delivery({"created_at": when, "delivery_id": key})
    assert cursors.delivery_after(cursor) == (when, key)
    assert len(cursor) <= MAX_CURSOR


@given(when=dates, key=st.integers(min_value=1, max_value=2**63 - 1))
def test_a_suppression_cursor_comes_back_as_it_went(when: datetime, key: int) -> None:
    cursors = Cursors(KEY)
    cursor = cursors.for_suppression({"created_at": when, "id": key, "address": "a@b.example"})
    assert cursors.suppression_after(cursor) == (when, key)


def test_the_format_is_the_documented_one() -> None:
    """The code's cursor is the definition's: a version, the payload, the MAC."""
    cursor = Cursors(KEY).sign(Listing.SUPPRESSIONS, WHEN, 42)
    assert cursor == forge(b'["2026-11-23T09:30:15.123456+00:00",42]')


def test_a_changed_payload_with_the_old_mac_is_refused() -> None:
    cursors = Cursors(KEY)
    version, payload, mac = cursors.sign(Listing.SUPPRESSIONS, WHEN, 42).split(".")
    for changed in (
        b'["2026-11-23T09:30:15.123456+00:00",41]',
        b'["2027-01-01T00:00:00+00:00",42]',
    ):
        refused(cursors.suppression_after, f"{version}.{b64(changed)}.{mac}")
    # One bit of the payload is enough.
    flipped = bytearray(unb64(payload))
    flipped[-2] ^= 1
    refused(cursors.suppression_after, f"{version}.{b64(bytes(flipped))}.{mac}")


def test_a_valid_payload_with_another_keys_mac_is_refused() -> None:
    theirs = Cursors(OTHER_KEY).sign(Listing.SUPPRESSIONS, WHEN, 42)
    refused(Cursors(KEY).suppression_after, theirs)
    refused(Cursors(KEY).suppression_after, forge(b'["2026-11-23T09:30:15+00:00",42]', key=b""))
    # The same payload with our own key: taken (what made the others fail was the key).
    assert Cursors(KEY).suppression_after(forge(b'["2026-11-23T09:30:15+00:00",42]')) == (
        WHEN.replace(microsecond=0),
        42,
    )


def test_a_truncated_or_padded_mac_is_refused() -> None:
    cursors = Cursors(KEY)
    cursor = cursors.sign(Listing.DELIVERIES, WHEN, "c0001")
    version, payload, mac = cursor.split(".")
    for cut in (1, 2, 4, 22, 42, 43):
        refused(cursors.delivery_after, f"{version}.{payload}.{mac[:-cut]}")
    refused(cursors.delivery_after, f"{version}.{payload}")
    refused(cursors.delivery_after, f"{cursor}A")
    refused(cursors.delivery_after, f"{cursor}=")
    # The MAC's bytes cut short, spelled as base64 of their own.
    refused(cursors.delivery_after, f"{version}.{payload}.{b64(unb64(mac)[:16])}")
    assert cursors.delivery_after(cursor) == (WHEN, "c0001")


def test_a_cursor_of_one_list_is_refused_on_the_other() -> None:
    """The list's name is in the MAC: each payload here would be valid on either list."""
    cursors = Cursors(KEY)
    payload = b'["2026-11-23T09:30:15.123456+00:00",7]'
    refused(cursors.suppression_after, forge(payload, listing="deliveries"))
    assert cursors.suppression_after(forge(payload, listing="suppressions")) == (WHEN, 7)
    refused(cursors.suppression_after, cursors.sign(Listing.DELIVERIES, WHEN, 7))

    payload = b'["2026-11-23T09:30:15.123456+00:00","c0007"]'
    refused(cursors.delivery_after, forge(payload, listing="suppressions"))
    assert cursors.delivery_after(forge(payload, listing="deliveries")) == (WHEN, "c0007")


def test_the_version_is_part_of_the_cursor_and_the_mac() -> None:
    cursors = Cursors(KEY)
    _version, payload, mac = cursors.sign(Listing.SUPPRESSIONS, WHEN, 42).split(".")
    refused(cursors.suppression_after, f"v2.{payload}.{mac}")
    refused(cursors.suppression_after, f"{payload}.{mac}")
    raw = unb64(payload)
    other = hmac.new(KEY, b"v2\0suppressions\0" + raw, hashlib.sha256).digest()
    refused(cursors.suppression_after, f"v1.{payload}.{b64(other)}")


def test_a_suppression_cursor_holds_no_address() -> None:
    row = {"created_at": WHEN, "id": 42, "address": "grace@example.com"}
    cursor = Cursors(KEY).for_suppression(row)
    _version, payload, _mac = cursor.split(".")
    assert json.loads(unb64(payload)) == ["2026-11-23T09:30:15.123456+00:00", 42]
    assert "grace" not in cursor and "@" not in unb64(payload).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "%%%",
        "[" * 2000,
        "v1." + "W" * 2000 + "." + "A" * 43,  # too long to be one
        "v1.bnVsbA.!!!",
        "v1.bnVsbA==." + "A" * 43,  # padded
        "v1.bn Vs." + "A" * 43,
        "v1.bnVsbB." + "A" * 43,  # not the canonical spelling of its bytes
        "WyIyMDI2LTExLTIzVDA5OjAwOjAwKzAwOjAwIiwiZ3JhY2VAZXhhbXBsZS5jb20iXQ",  # the old, unsigned
        "v1.\u0660\u0661\u0662\u0663." + "A" * 43,  # digits, but not ASCII ones
    ],
)
def test_malformed_cursors_are_refused(cursor: str) -> None:
    refused(Cursors(KEY).delivery_after, cursor)
    refused(Cursors(KEY).suppression_after, cursor)


@pytest.mark.parametrize(
    ("listing", "payload"),
    [
        ("suppressions", b"null"),
        ("suppressions", b"[1,2]"),
        ("suppressions", b'{"a":1,"b":2}'),
        ("suppressions", b'["2026-11-23T09:00:00",42]'),  # naive
        ("suppressions", b'["not a date",42]'),
        ("suppressions", b'["2026-11-23T09:00:00+00:00","42"]'),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",42.0]'),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",true]'),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",0]'),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",-1]'),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",9223372036854775808]'),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",' + b"9" * 300 + b"]"),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",1e999]'),
        ("suppressions", b"[" * 300 + b"]" * 300),
        ("suppressions", b'["2026-11-23T09:00:00+00:00",42,1]'),
        ("suppressions", b"\xff\xfe"),
        ("deliveries", b'["2026-11-23T09:00:00+00:00",7]'),
        ("deliveries", b'["2026-11-23T09:00:00+00:00","<script>"]'),
        ("deliveries", b'["2026-11-23T09:00:00+00:00",""]'),
        ("deliveries", b'["2026-11-23T09:00:00+00:00",null]'),
        ("deliveries", b'[["2026-11-23T09:00:00+00:00"],"c1"]'),
    ],
)
def test_a_signed_cursor_of_the_wrong_shape_is_refused(listing: str, payload: bytes) -> None:
    """Only the key's holder could make these; refused all the same, never an exception."""
    cursors = Cursors(KEY)
    read = cursors.suppression_after if listing == "suppressions" else cursors.delivery_after
    refused(read, forge(payload, listing=listing))


def test_a_bad_cursor_parameter_names_the_parameter_not_the_value() -> None:
    cursors = Cursors(KEY)
    for search in (
        lambda p: views.delivery_search(p, WHEN, cursors),
        lambda p: views.suppression_search(p, cursors),
    ):
        with pytest.raises(views.BadParameter) as raised:
            search({"cursor": "[" * 2000})
        assert raised.value.parameter == "cursor" and "[" not in str(raised.value)


def test_addresses_are_shown_only_to_whoever_searched_for_them() -> None:
    assert views.shown_address("Ada@Example.com", None) == ("A***@Example.com", True)
    assert views.shown_address("Ada@Example.com", "ada@example.com") == ("Ada@Example.com", False)
    assert views.shown_address("Ada@Example.com", "ad@example.com") == ("A***@Example.com", True)
    assert views.shown_address(None, "ada@example.com") == (None, False)


def test_stored_json_is_masked_all_the_way_down() -> None:
    row = {
        "provider": "ses",
        "provider_event_id": "e1",
        "event_type": "bounced",
        "occurred_at": datetime(2026, 11, 23, 9, tzinfo=UTC),
        "received_at": datetime(2026, 11, 23, 9, 1, tzinfo=UTC),
        "bounce_type": "Permanent",
        "detail": {"diagnostic": ["550 <ada@example.com> unknown", {"to": "bob@example.org"}]},
    }
    shown = views.provider_event_json(row)
    assert shown["detail"] == {
        "diagnostic": ["550 <a***@example.com> unknown", {"to": "b***@example.org"}]
    }
    assert shown["occurred_at"] == "2026-11-23T09:00:00Z"


def test_the_chart_scales_to_a_round_top_and_stacks_each_slice() -> None:
    start = datetime(2026, 11, 23, tzinfo=UTC)
    counts = [
        {"sent": 5, "failed": 2, "skipped": 0, "in_flight": 1},
        {"sent": 0, "failed": 0, "skipped": 0, "in_flight": 0},
        {"sent": 9, "failed": 0, "skipped": 1, "in_flight": 0},
    ]
    drawn = chart.stacked_bars(counts, [start + timedelta(hours=i) for i in range(3)], "%H:%M")
    assert [tick.label for tick in drawn.y_ticks] == ["0", "5", "10", "15", "20"]
    assert len(drawn.rects) == 5  # one per non-zero outcome
    first = [rect for rect in drawn.rects if rect.title.startswith("00:00")]
    # Stacked from the baseline up: each segment ends where the next begins.
    assert first[0].y + first[0].height == pytest.approx(drawn.baseline)
    for lower, upper in itertools.pairwise(first):
        assert upper.y + upper.height == pytest.approx(lower.y)
    plot = drawn.baseline - chart.TOP
    assert sum(rect.height for rect in first) == pytest.approx(plot * 8 / 20)
    assert first[1].title == "00:00: 2 failed or dead letter"
    assert not drawn.empty
    assert chart.stacked_bars(counts[1:2], [start], "%H:%M").empty


@pytest.mark.parametrize(("peak", "top"), [(0, 4), (4, 4), (5, 8), (9, 20), (21, 40), (81, 200)])
def test_axis_tops_divide_by_four(peak: int, top: int) -> None:
    assert chart._nice_ceiling(peak) == top
    assert top % 4 == 0
