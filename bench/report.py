"""What a benchmark returns, the printed table and the JSON file."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    metric: str
    value: float | int | str
    unit: str = ""
    note: str = ""


@dataclass
class Section:
    """One benchmark: printed rows and everything measured (for the JSON)."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def add(self, metric: str, value: float | int | str, unit: str = "", note: str = "") -> None:
        self.rows.append(Row(metric, value, unit, note))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def fmt(value: float | int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(machine: dict[str, Any], sections: Sequence[Section], command: str) -> str:
    lines = [
        f"gcp-email-service benchmarks — {command}",
        (
            f"machine: {machine.get('cpu_model')} x{machine.get('cpus')} cpus,"
            f" {machine.get('memory_gib')} GiB; Python {machine.get('python')};"
            f" PostgreSQL {machine.get('postgresql')}; {machine.get('kernel')}"
        ),
        (
            "Shared, noisy 2-core machine: compare RATIOS within one run, not absolute rates "
            "across runs."
        ),
        "",
    ]
    width_metric = max([len(row.metric) for section in sections for row in section.rows] + [20])
    for section in sections:
        lines.append(f"[{section.key}] {section.title}")
        if section.error:
            lines.append(f"  ERROR: {section.error}")
        for row in section.rows:
            value = f"{fmt(row.value)} {row.unit}".rstrip()
            note = f"  {row.note}" if row.note else ""
            lines.append(f"  {row.metric:<{width_metric}}  {value:>18}{note}")
        lines.append("")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any], sections: Sequence[Section]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **payload,
        "benchmarks": {
            section.key: {
                "title": section.title,
                "error": section.error,
                "rows": [asdict(row) for row in section.rows],
                "data": section.data,
            }
            for section in sections
        },
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
