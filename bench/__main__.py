"""`python -m bench [--quick] [--only a,b] [--skip c]`: run the benchmarks, print a table,
write JSON (bench/results/latest.json by default).

Benchmarks (in the order they run):
  inprocess  deliveries/s through worker.delivery.pipeline.handle vs plain smtplib, same sink
  dbcost     statements and protocol round trips per delivery
  claimcost  the claim with suppression and rate limits on vs off (migrations 004, 005)
  ledgercost worker vs its floor (sendmail + 2 durable statements) per email, fsync off/on
  http       deliveries/s through a functions-framework server (CloudEvent and push bodies)
  concurrency  one instance at CONCURRENCY 1/4/8/16, 50 ms relay, vs ideal and a no-op function
  outage     the primary relay down for the middle third, with and without the fallback relay
  memory     peak RSS of a functions-framework worker after N events
  coldstart  fresh process: import main + first event, lazy vs eager imports
  scaleout   1..8 functions-framework processes, each event delivered 3 times, 20 ms relay
  replay     N dead letters replayed from the emulator by `python -m worker replay`
  tracking   provider events applied per second; migration 002's stall on a live ledger

They print figures; none asserts a speed. Run on a shared machine: compare ratios.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    claimcost,
    coldstart,
    concurrency,
    dbcost,
    httpbench,
    inprocess,
    ledgercost,
    machine,
    memory,
    outage,
    replay,
    scaleout,
    tracking,
)
from bench.report import Section, table, write_json
from bench.services import ROOT, Stack


@dataclass(frozen=True)
class Sizes:
    inprocess_count: int
    inprocess_rounds: int
    dbcost_count: int
    ledgercost_rounds: int
    http_count: int
    http_concurrency: tuple[int, ...]
    concurrency_levels: tuple[int, ...]
    concurrency_seconds: float
    outage_third_seconds: float
    memory_count: int
    coldstart_reps: int
    scaleout_events: int
    scaleout_processes: tuple[int, ...]
    scaleout_delay_ms: float
    replay_count: int
    tracking_count: int
    tracking_ledger_rows: int


FULL = Sizes(
    inprocess_count=2000,
    inprocess_rounds=3,
    dbcost_count=500,
    ledgercost_rounds=25,
    http_count=1000,
    http_concurrency=(1, 4),
    concurrency_levels=(1, 4, 8, 16),
    concurrency_seconds=4.0,
    outage_third_seconds=25.0,
    memory_count=3000,
    coldstart_reps=7,
    scaleout_events=600,
    scaleout_processes=(1, 2, 4, 8),
    scaleout_delay_ms=20.0,
    replay_count=10_000,
    tracking_count=2000,
    tracking_ledger_rows=200_000,
)
QUICK = Sizes(
    inprocess_count=200,
    inprocess_rounds=2,
    dbcost_count=100,
    ledgercost_rounds=3,
    http_count=150,
    http_concurrency=(1, 4),
    concurrency_levels=(1, 8),
    concurrency_seconds=1.0,
    outage_third_seconds=6.0,
    memory_count=300,
    coldstart_reps=3,
    scaleout_events=100,
    scaleout_processes=(1, 2, 4, 8),
    scaleout_delay_ms=20.0,
    replay_count=1_000,
    tracking_count=200,
    tracking_ledger_rows=20_000,
)

Runner = Callable[[Stack, Sizes, Path], Section]

BENCHMARKS: dict[str, Runner] = {
    "inprocess": lambda stack, s, logs: inprocess.run(
        stack, count=s.inprocess_count, rounds=s.inprocess_rounds, log_dir=logs
    ),
    "dbcost": lambda stack, s, logs: dbcost.run(stack, count=s.dbcost_count, log_dir=logs),
    "claimcost": lambda stack, s, logs: claimcost.run(
        stack, count=s.dbcost_count * 2, ledger_rows=100_000, log_dir=logs
    ),
    "ledgercost": lambda stack, s, logs: ledgercost.run(
        stack, chunk=40, rounds=s.ledgercost_rounds, log_dir=logs
    ),
    "http": lambda stack, s, logs: httpbench.run(
        stack, count=s.http_count, concurrency=s.http_concurrency, log_dir=logs
    ),
    "concurrency": lambda stack, s, logs: concurrency.run(
        stack, levels=s.concurrency_levels, seconds=s.concurrency_seconds, log_dir=logs
    ),
    "outage": lambda stack, s, logs: outage.run(
        stack, third_seconds=s.outage_third_seconds, log_dir=logs
    ),
    "memory": lambda stack, s, logs: memory.run(stack, count=s.memory_count, log_dir=logs),
    "coldstart": lambda stack, s, logs: coldstart.run(
        stack, repetitions=s.coldstart_reps, log_dir=logs
    ),
    "scaleout": lambda stack, s, logs: scaleout.run(
        stack,
        events=s.scaleout_events,
        processes=s.scaleout_processes,
        delay_ms=s.scaleout_delay_ms,
        log_dir=logs,
    ),
    "replay": lambda stack, s, logs: replay.run(stack, count=s.replay_count, log_dir=logs),
    "tracking": lambda stack, s, logs: tracking.run(
        stack, count=s.tracking_count, ledger_rows=s.tracking_ledger_rows, log_dir=logs
    ),
}


def _names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", type=_names, help="comma-separated benchmarks to run")
    parser.add_argument("--skip", type=_names, default=[], help="comma-separated to leave out")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / "results" / "latest.json",
        help="where to write the results (default: bench/results/latest.json)",
    )
    parser.add_argument(
        "--replay-count", type=int, help="dead letters for the replay benchmark (overrides)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.replay_count:
        sizes = Sizes(**{**sizes.__dict__, "replay_count": args.replay_count})
    selected = [n for n in (args.only or list(BENCHMARKS)) if n not in args.skip]
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])

    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    log_dir = Path(tempfile.mkdtemp(prefix="email-bench-"))
    stack = Stack(log_dir)
    sections: list[Section] = []
    info: dict[str, object] = {}
    try:
        print(f"starting PostgreSQL (logs in {log_dir}) ...", file=sys.stderr, flush=True)
        stack.start_postgres()
        info = machine.describe(stack.server_version())
        for name in selected:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            began = time.monotonic()
            try:
                section = BENCHMARKS[name](stack, sizes, log_dir)
            except Exception as error:
                traceback.print_exc(file=sys.stderr)
                section = Section(name, name, error=f"{type(error).__name__}: {error}")
            section.data["wall_seconds"] = round(time.monotonic() - began, 1)
            sections.append(section)
            print(f"  {name} done in {section.data['wall_seconds']} s", file=sys.stderr, flush=True)
    finally:
        stack.close()

    payload = {
        "command": command,
        "started_at": started_at,
        "quick": args.quick,
        "sizes": sizes.__dict__,
        "machine": info,
        "logs": str(log_dir),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    write_json(args.json, payload, sections)
    print(table(info, sections, command))
    print(f"JSON: {args.json}   logs: {log_dir}")
    return 1 if any(section.error for section in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
