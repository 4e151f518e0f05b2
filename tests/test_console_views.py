"""The console's pure parts: cursors, masking, the chart's geometry (no I/O)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.console import chart, views


@given(
    when=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    key=st.text(alphabet="abcXYZ019._:@-", min_size=1, max_size=200),
)
def test_a_cursor_comes_back_as_it_went(when: datetime, key: str) -> None:
    assert views.decode_cursor({"cursor": views.encode_cursor(when, key)}) == (when, key)


@pytest.mark.parametrize(
    "cursor",
    ["", "%%%", "bnVsbA", "WzEsMl0", "WyIyMDI2LTExLTIzVDA5OjAwOjAwIiwieCJd"],  # null, [1,2], naive
)
def test_a_forged_cursor_is_a_bad_parameter(cursor: str) -> None:
    with pytest.raises(views.BadParameter) as raised:
        views.decode_cursor({"cursor": cursor})
    assert raised.value.parameter == "cursor"


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
