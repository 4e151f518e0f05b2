"""4. Cold start: a fresh interpreter, functions_framework already imported (untimed), then
`import main` + the first event to the sink, timed (bench/coldstart_child.py).

Two variants, interleaved, several repetitions each, medians reported:
  lazy   what main.py does (Pub/Sub, Secret Manager, grpc are never imported on this path);
  eager  google.cloud.pubsub_v1, google.cloud.secretmanager, grpc, psycopg_pool, jinja2,
         tenacity and structlog imported first, as a less careful worker would.
One more lazy run under `-X importtime` names the imports that cost the most.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import Section, median
from bench.services import ROOT, Stack
from bench.workload import worker_env

_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")


def _child(
    variant: str, delivery_id: str, env: dict[str, str], out: Path, log: Path, importtime: bool
) -> tuple[dict[str, Any], float, str]:
    command = [sys.executable]
    if importtime:
        command += ["-X", "importtime"]
    command += [
        "-m",
        "bench.coldstart_child",
        "--variant",
        variant,
        "--delivery-id",
        delivery_id,
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    with log.open("ab") as log_file:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    wall_ms = (time.perf_counter() - started) * 1000
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"cold start child failed ({done.returncode}): {stderr[-1500:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result, wall_ms, stderr


def top_imports(stderr: str, limit: int = 8) -> list[tuple[str, float]]:
    """The packages the timed part imports, by cumulative ms: for each top-level package
    (psycopg, jinja2, email, ...) the entries where it first appears in the import tree (the
    shallowest), summed. The worker's own modules and main are left out."""
    _, _, timed = stderr.partition("--- timed ---")
    entries: list[tuple[str, int, float]] = []
    for line in timed.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            root = match.group(4).split(".")[0]
            entries.append((root, len(match.group(3)) // 2, int(match.group(2)) / 1000))
    shallowest: dict[str, int] = {}
    for root, depth, _ms in entries:
        shallowest[root] = min(depth, shallowest.get(root, depth))
    totals: dict[str, float] = {}
    for root, depth, ms in entries:
        if root not in ("main", "worker") and depth == shallowest[root]:
            totals[root] = totals.get(root, 0.0) + ms
    return sorted(totals.items(), key=lambda item: item[1], reverse=True)[:limit]


def run(stack: Stack, *, repetitions: int, log_dir: Path) -> Section:
    section = Section("coldstart", "Cold start: import main + first event (fresh process)")
    sink = stack.sink
    name, url = stack.database()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "DATABASE_URL", "SMTP_"))
    }
    env.update(worker_env(database_url=url, smtp_port=sink.port))
    out = log_dir / "coldstart.json"
    log = log_dir / "coldstart-children.log"
    results: dict[str, list[dict[str, Any]]] = {"lazy": [], "eager": []}
    walls: dict[str, list[float]] = {"lazy": [], "eager": []}
    try:
        # Warm-up: writes bytecode caches and fills the page cache, as a deployed image has.
        for variant in ("lazy", "eager"):
            _child(variant, f"cold-warm-{variant}", env, out, log, importtime=False)
        for number in range(repetitions):
            order = ("lazy", "eager") if number % 2 == 0 else ("eager", "lazy")
            for variant in order:
                result, wall, _ = _child(
                    variant, f"cold-{variant}-{number}", env, out, log, importtime=False
                )
                results[variant].append(result)
                walls[variant].append(wall)
        _, _, profile = _child("lazy", "cold-importtime", env, out, log, importtime=True)

        def med(variant: str, key: str) -> float:
            return median([r[key] for r in results[variant]])

        lazy_total, eager_total = med("lazy", "total_ms"), med("eager", "total_ms")
        section.add(
            "lazy: import main + 1st event",
            lazy_total,
            "ms",
            f"target <= 250; median of {repetitions}",
        )
        section.add("  import main", med("lazy", "import_main_ms"), "ms")
        section.add("  first event", med("lazy", "first_event_ms"), "ms")
        for step in ("claim", "send", "set_sent_if_claimed"):
            values = [r["first_event_steps_ms"].get(step, 0.0) for r in results["lazy"]]
            label = {
                "claim": "DB connect + claim",
                "send": "SMTP connect + send",
                "set_sent_if_claimed": "DB set_sent",
            }[step]
            section.add(f"    of which {label}", median(values), "ms")
        section.add(
            "eager: imports + main + 1st event",
            eager_total,
            "ms",
            f"ratio eager/lazy {eager_total / lazy_total:.2f}",
        )
        section.add("  eager imports alone", med("eager", "eager_imports_ms"), "ms")
        section.add(
            "lazy path imports pubsub/grpc?",
            "yes" if any(r["pubsub_loaded"] or r["grpc_loaded"] for r in results["lazy"]) else "no",
        )
        section.add("framework import (untimed, ref.)", med("lazy", "framework_import_ms"), "ms")
        section.add("whole child process (wall)", median(walls["lazy"]), "ms", "lazy; reference")
        heavy = top_imports(profile)
        section.add(
            "costliest imports (lazy, -X importtime)",
            ", ".join(f"{mod} {ms:.0f}" for mod, ms in heavy[:6]),
            "ms",
        )
        section.data.update(
            repetitions=repetitions,
            lazy=results["lazy"],
            eager=results["eager"],
            wall_ms=walls,
            top_imports_ms=heavy,
        )
    finally:
        stack.drop(name)
    return section
