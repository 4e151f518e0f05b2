"""The stats page's chart: deliveries per slice of the window, stacked by outcome, as plain
geometry that `templates/stats.html` draws as inline SVG. Server-side and script-free, so
the page works with no internet and under a Content-Security-Policy with no script source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

WIDTH = 720
HEIGHT = 220
LEFT = 44  # room for the y-axis labels
BOTTOM = 24  # room for the x-axis labels
TOP = 8
# Outcome (a column of stats_timeline), label and colour; the stacking order and the legend
# carry the meaning too, for readers who cannot tell the green from the red.
SERIES = (
    ("sent", "sent", "#2e7d32"),
    ("failed", "failed or dead letter", "#c62828"),
    ("skipped", "skipped", "#7e57c2"),
    ("in_flight", "in flight", "#9e9e9e"),
)


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    fill: str
    title: str


@dataclass(frozen=True)
class Tick:
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    rects: list[Rect]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    legend: list[tuple[str, str]]
    baseline: float
    left: int
    empty: bool


def stacked_bars(counts: Sequence[dict[str, int]], starts: Sequence[datetime], fmt: str) -> Chart:
    """One bar per slice; `starts[i]` is when slice i begins (UTC)."""
    plot_height = HEIGHT - TOP - BOTTOM
    peak = max((sum(c.values()) for c in counts), default=0)
    scale_top = _nice_ceiling(peak)
    slot = (WIDTH - LEFT) / max(len(counts), 1)
    rects: list[Rect] = []
    for index, slice_counts in enumerate(counts):
        y = float(TOP + plot_height)
        when = starts[index].strftime(fmt)
        for key, label, colour in SERIES:
            value = slice_counts.get(key, 0)
            if value == 0:
                continue
            height = plot_height * value / scale_top
            y -= height
            rects.append(
                Rect(
                    x=round(LEFT + index * slot + slot * 0.1, 2),
                    y=round(y, 2),
                    width=round(slot * 0.8, 2),
                    height=round(height, 2),
                    fill=colour,
                    title=f"{when}: {value} {label}",
                )
            )
    y_ticks = [
        Tick(LEFT - 6, round(TOP + plot_height * (1 - step / 4), 2), str(scale_top * step // 4))
        for step in range(5)
    ]
    every = max(1, len(counts) // 6)
    x_ticks = [
        Tick(round(LEFT + (index + 0.5) * slot, 2), HEIGHT - 6, starts[index].strftime(fmt))
        for index in range(0, len(counts), every)
    ]
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        rects=rects,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        legend=[(label, colour) for _key, label, colour in SERIES],
        baseline=TOP + plot_height,
        left=LEFT,
        empty=peak == 0,
    )


def _nice_ceiling(peak: int) -> int:
    """The axis top: 4, 8, 20, 40, 80, 200, ...: divisible by 4, so the ticks are whole."""
    top = 4
    while top < peak:
        top = top * 5 // 2 if str(top)[0] == "8" else top * 2
    return top
