"""The operators' command line: `python -m worker COMMAND` (`--help` on each command).

Exit codes: 0 success, 1 failure (one clear line on stderr), 2 bad usage (argparse).
This module parses arguments and formats output; the logic lives in worker/ops/replay.py and
worker/store/reports.py. Nothing here imports google.cloud.pubsub: only a replay or a publish does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, TextIO

import psycopg

from worker.core.pubsub import PublishError
from worker.core.settings import (
    PubSubSettings,
    SettingsError,
    database_settings,
    pubsub_settings,
)
from worker.delivery import events
from worker.ops import enqueue, replay
from worker.store import migrations, reports
from worker.store.db import connection_kwargs, open_pool
from worker.store.ledger import (
    SKIP_CODES,
    SUPPRESSION_REASONS,
    Delivery,
    Ledger,
    Reason,
    Status,
    StatusChange,
)
from worker.store.relays import Circuits
from worker.store.reports import Reports
from worker.store.suppressions import InvalidAddress, Suppression, Suppressions, normalise

Command = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A failure the operator can act on; printed as one line, exit code 1."""


# --- commands -----------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply the sql/migrations that are not applied yet (or roll back with --down)."""
    url = database_settings().url
    if args.down:
        migrations.migrate_down(url, steps=args.steps)
    else:
        migrations.migrate_up(url)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Pull dead letters, requeue their ledger rows and republish them to DELIVERY_TOPIC
    (needs DATABASE_URL, GOOGLE_CLOUD_PROJECT, DELIVERY_TOPIC). A message is acked only once
    its republish is confirmed; messages that do not match the filters are left for later, and
    so are those whose validity end has passed (never republished; --drop-expired acks them)."""
    settings = _delivery_pubsub()
    options = replay.ReplayOptions(
        subscription=args.subscription,
        filters=replay.Filters(args.reason, args.workflow, args.delivery_id),
        limit=args.limit,
        dry_run=args.dry_run,
        wait_seconds=args.wait,
        drop_expired=args.drop_expired,
    )
    progress = _Progress(sys.stderr)
    printer = _ReplayPrinter(progress)
    with _ledger() as ledger:
        summary = replay.replay(
            ledger, settings, options, on_item=printer.item, on_progress=progress.show
        )
    progress.clear()
    print(_replay_summary(summary))
    if summary.failed:
        raise CommandError(f"{summary.failed} message(s) could not be replayed; run it again")
    if summary.too_large:
        raise CommandError(
            f"{summary.too_large} pull(s) of a single message could not be received (larger"
            " than the client's limit); the rest was handled"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """A delivery's ledger row, its status history and what providers reported about it
    (needs DATABASE_URL)."""
    with _ledger() as ledger:
        report = Reports(ledger.pool).delivery_report(args.delivery_id)
    if report is None:
        raise CommandError(f"no delivery with id {args.delivery_id!r}")
    if args.json:
        _print_json(
            {
                "delivery": _plain(report.delivery),
                "events": _plain(report.events),
                "provider_events": _plain(report.provider_events),
            }
        )
        return 0
    _print_delivery(report.delivery)
    print()
    print(
        _table(
            ["WHEN", "STATUS", "FROM", "ATTEMPT", "REASON", "ERROR"],
            [_status_change_row(e) for e in report.events],
        )
    )
    if report.provider_events:
        print()
        print(
            _table(
                ["OCCURRED", "RECEIVED", "PROVIDER", "EVENT", "BOUNCE_TYPE", "PROVIDER_EVENT_ID"],
                [
                    [
                        _when(e.occurred_at),
                        _when(e.received_at),
                        e.provider,
                        e.event_type,
                        e.bounce_type,
                        e.provider_event_id,
                    ]
                    for e in report.provider_events
                ],
            )
        )
    return 0


def _status_change_row(e: StatusChange) -> list[Any]:
    """A provider-status change (migration 002) shows as `provider: opened` beside the
    delivery status changes, with the provider that reported it as its reason."""
    if "provider_status" in e.payload:
        return [
            _when(e.created_at),
            f"provider: {e.payload['provider_status']}",
            e.payload.get("from"),
            e.attempt,
            e.payload.get("provider", "manual update"),
            None,
        ]
    return [
        _when(e.created_at),
        e.status,
        e.payload.get("from"),
        e.attempt,
        e.payload.get("reason"),
        _error(e.error_code, e.error_message),
    ]


def cmd_history(args: argparse.Namespace) -> int:
    """A recipient's deliveries, most recently changed first, and whether the address is
    suppressed (needs DATABASE_URL)."""
    try:
        # Either spelling of an IDN domain (U-label or xn--) finds the same rows.
        key = normalise(args.recipient)
    except InvalidAddress as error:
        raise CommandError(str(error)) from None
    with _ledger() as ledger:
        rows = Reports(ledger.pool).history(key, limit=args.limit)
        suppression = Suppressions(ledger.pool).get(key)
    if args.json:
        _print_json(
            {
                "recipient": args.recipient,
                "suppression": None if suppression is None else _plain(suppression),
                "deliveries": _plain(rows),
            }
        )
        return 0
    print(f"suppression: {_suppression_state(suppression)}")
    if not rows:
        print(f"no deliveries for {args.recipient}")
        return 0
    print(
        _table(
            ["UPDATED", "DELIVERY_ID", "WORKFLOW", "STATUS", "ATTEMPTS", "REPLAYS", "ERROR"],
            [_history_row(row) for row in rows],
        )
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Per workflow, over deliveries queued in the window: counts by status, success rate
    (sent / sent, failed or dead-lettered), the delivered, bounced and complained rates (over
    sent, as providers reported), mean attempts (finished rows), p50 and p95 seconds from
    queued to sent, and the time to send (publish to the relay's acceptance) at p50, p95 and
    p99 (needs DATABASE_URL)."""
    since: _Duration = args.since
    with _ledger() as ledger:
        rows = Reports(ledger.pool).stats(since=since.delta)
        relays = Reports(ledger.pool).relay_stats(since=since.delta)
    if args.json:
        _print_json(
            {
                "since": since.text,
                "since_seconds": since.delta.total_seconds(),
                "workflows": [row.as_json() for row in rows],
                "relays": [relay.as_json() for relay in relays],
            }
        )
        return 0
    if not rows:
        print(f"no deliveries queued in the last {since.text}")
        return 0
    print(f"deliveries queued in the last {since.text}")
    print(_table(_STATS_HEADERS, [_stats_row(row) for row in rows]))
    print()
    print(_table(_RELAY_STATS_HEADERS, [_relay_stats_row(relay) for relay in relays]))
    return 0


def cmd_relays(args: argparse.Namespace) -> int:
    """Each relay's circuit breaker: closed, open (deliveries go to the other relay until it
    reopens) or half-open (the cool-down is over: the next delivery tries it), its
    consecutive fail-over failures, when it reopens, and its last error (needs
    DATABASE_URL)."""
    with _ledger() as ledger:
        circuits = Circuits(ledger.pool).report()
    if args.json:
        _print_json({"relays": [circuit.as_json() for circuit in circuits]})
        return 0
    print(
        _table(
            ["RELAY", "STATE", "FAILURES", "REOPENS_AT", "LAST_ERROR"],
            [
                [
                    c.relay.value,
                    c.state.value,
                    c.consecutive_failures,
                    _when(c.reopens_at),
                    _error(c.last_error_code, c.last_error_message),
                ]
                for c in circuits
            ],
        )
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete finished deliveries (sent, failed, dead_letter, skipped) not updated for
    --older-than, with their events and provider events, and unmatched provider events received
    before it, in batches of short transactions (needs DATABASE_URL and a role that may delete:
    the table owner)."""
    older_than: _Duration = args.older_than
    with _ledger() as ledger:
        result = Reports(ledger.pool).prune(
            older_than=older_than.delta, batch_size=args.batch_size, dry_run=args.dry_run
        )
    scope = f"finished, last updated more than {older_than.text} ago"
    if result.dry_run:
        print(f"would delete {result.deliveries} deliveries and {result.events} events ({scope})")
    else:
        print(
            f"deleted {result.deliveries} deliveries and {result.events} events ({scope}) "
            f"in {result.batches} batch(es)"
        )
    if result.unmatched_events:
        verb = "would delete" if result.dry_run else "deleted"
        print(
            f"{verb} {result.unmatched_events} unmatched provider events "
            f"(received more than {older_than.text} ago)"
        )
    return 0


def cmd_suppressions_list(args: argparse.Namespace) -> int:
    """Suppressed addresses, newest first: live and expired entries (an expired one no
    longer stops an email). Needs DATABASE_URL (an email_reader login is enough)."""
    with _ledger() as ledger:
        listing = Suppressions(ledger.pool).listing(reason=args.reason, limit=args.limit)
    if args.json:
        _print_json({"total": listing.total, "suppressions": _plain(listing.entries)})
        return 0
    if not listing.entries:
        print("no suppressed addresses" + (f" with reason {args.reason}" if args.reason else ""))
        return 0
    print(
        _table(
            ["ADDRESS", "REASON", "STATE", "SINCE", "EXPIRES", "DELIVERY_ID"],
            [
                [
                    e.address,
                    e.reason,
                    "live" if e.live else "expired",
                    _when(e.created_at),
                    _when(e.expires_at) or "never",
                    e.delivery_id,
                ]
                for e in listing.entries
            ],
        )
    )
    if listing.total > len(listing.entries):
        print(f"({len(listing.entries)} of {listing.total}; --limit shows more)")
    return 0


def cmd_suppressions_add(args: argparse.Namespace) -> int:
    """Suppress an address: the worker skips every delivery to it (any letter case) while the
    entry is live. Idempotent: an address already suppressed keeps its entry (remove it first
    to change it). Needs DATABASE_URL (email_worker may add)."""
    expires: _Duration | None = args.expires
    with _ledger() as ledger:
        entry, created = Suppressions(ledger.pool).add(
            args.address, reason=args.reason, expires=None if expires is None else expires.delta
        )
    if args.json:
        _print_json({"suppression": _plain(entry), "created": created})
    elif created:
        print(f"suppressed {entry.address}: {_suppression_state(entry)}")
    else:
        print(
            f"{entry.address} was already suppressed: {_suppression_state(entry)} (unchanged;"
            " remove it first to change it)"
        )
    return 0


def cmd_suppressions_remove(args: argparse.Namespace) -> int:
    """Lift a suppression: the next delivery to the address is sent. Needs DATABASE_URL as
    an operator login that may delete (the owner of email.suppressions: the worker and reader
    roles cannot)."""
    with _ledger() as ledger:
        try:
            entry = Suppressions(ledger.pool).remove(args.address)
        except psycopg.errors.InsufficientPrivilege:
            raise CommandError(
                "permission denied: only the owner of email.suppressions may remove entries;"
                " run this as an operator login"
            ) from None
    if entry is None:
        raise CommandError(f"{args.address} is not suppressed")
    if args.json:
        _print_json({"removed": _plain(entry)})
    else:
        print(f"removed {entry.address} ({_suppression_state(entry)}); it will be sent to again")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Enqueue one delivery on DELIVERY_TOPIC, checked as the worker would check it (needs
    GOOGLE_CLOUD_PROJECT, DELIVERY_TOPIC). Prints the delivery id and the message id."""
    body: dict[str, Any] = {
        "delivery_id": args.delivery_id or enqueue.new_delivery_id(),
        "workflow": args.workflow,
        "recipient": args.recipient,
        "data": args.data,
    }
    if args.metadata is not None:
        body["metadata"] = args.metadata
    if args.locale is not None:
        body["locale"] = args.locale
    try:
        event = enqueue.check_delivery(body)  # refused here, not dead-lettered later
    except events.InvalidEvent as invalid:
        raise CommandError(f"invalid event: {invalid}") from None
    enqueued = enqueue.enqueue(_delivery_pubsub(), event)
    print(f"delivery_id {enqueued.delivery_id}")
    print(f"message_id {enqueued.message_id}")
    return 0


# --- the parser ---------------------------------------------------------------------------


# Upper bounds of the numeric options: far above any real use, and below what PostgreSQL's
# integer parameters (and its timestamps, for durations) can hold, so a typo is a usage error
# rather than a database error.
MAX_ROWS = 10_000


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _row_count(text: str) -> int:
    """A positive number of rows, at most MAX_ROWS."""
    value = _positive_int(text)
    if value > MAX_ROWS:
        raise argparse.ArgumentTypeError(f"{text!r} must be at most {MAX_ROWS}")
    return value


def _json_value(text: str) -> Any:
    """A JSON document; the nesting the event rules allow is checked later, with the event."""
    try:
        return json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    except RecursionError:  # nested deeper than the parser's stack
        raise argparse.ArgumentTypeError("not valid JSON: nested too deeply") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


@dataclasses.dataclass(frozen=True)
class _Duration:
    """A parsed duration and what the operator typed, for the output ("the last 24h")."""

    text: str
    delta: timedelta


def _duration(text: str) -> _Duration:
    try:
        return _Duration(text, reports.parse_duration(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add(commands: Any, name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help_text, description=handler.__doc__
    )
    parser.set_defaults(handler=handler)
    return parser


def _add_migrate(commands: Any) -> None:
    migrate = _add(commands, "migrate", cmd_migrate, "apply sql/migrations (DATABASE_URL)")
    migrate.add_argument(
        "--down", action="store_true", help="roll back instead: the newest migration(s)"
    )
    migrate.add_argument(
        "--steps", type=_positive_int, default=1, help="with --down: how many (default 1)"
    )


def _add_replay(commands: Any) -> None:
    p = _add(commands, "replay", cmd_replay, "republish dead letters to DELIVERY_TOPIC")
    p.add_argument(
        "--subscription",
        required=True,
        metavar="SUB",
        help="the dead-letter subscription: an id in GOOGLE_CLOUD_PROJECT or a full path",
    )
    p.add_argument("--limit", type=_positive_int, metavar="N", help="replay at most N")
    p.add_argument(
        "--reason",
        metavar="R",
        help="only this reason (permanent_failure, retries_exhausted, invalid_event, "
        f"{replay.POLICY_REASON})",
    )
    p.add_argument("--workflow", metavar="W", help="only this workflow")
    p.add_argument("--delivery-id", metavar="ID", help="only this delivery")
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be replayed; change nothing"
    )
    p.add_argument(
        "--drop-expired",
        action="store_true",
        help="ack (drop) the dead letters whose validity end has passed; without it they are "
        "left on the subscription (never republished either way)",
    )
    p.add_argument(
        "--wait",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="stop once the subscription has returned nothing for this long (default 2)",
    )


def _add_reads(commands: Any) -> None:
    status = _add(commands, "status", cmd_status, "one delivery and its history")
    status.add_argument("delivery_id", metavar="DELIVERY_ID")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    history = _add(commands, "history", cmd_history, "a recipient's deliveries, newest first")
    history.add_argument("--recipient", required=True, metavar="ADDRESS")
    history.add_argument(
        "--limit",
        type=_row_count,
        default=20,
        metavar="N",
        help=f"at most N rows, up to {MAX_ROWS} (default 20)",
    )
    history.add_argument("--json", action="store_true", help="machine-readable output")

    stats = _add(commands, "stats", cmd_stats, "per-workflow counts, success rate, latency")
    stats.add_argument(
        "--since",
        type=_duration,
        default="24h",
        metavar="DURATION",
        help="window by queued_at: 30m, 24h, 7d, 90d ... (default 24h)",
    )
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    relays = _add(commands, "relays", cmd_relays, "each relay's circuit breaker")
    relays.add_argument("--json", action="store_true", help="machine-readable output")


def _add_prune(commands: Any) -> None:
    p = _add(commands, "prune", cmd_prune, "delete old finished deliveries and their events")
    p.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        metavar="DURATION",
        help="last updated longer ago than this: 30m, 24h, 7d, 90d ...",
    )
    p.add_argument("--dry-run", action="store_true", help="count only; delete nothing")
    p.add_argument(
        "--batch-size",
        type=_row_count,
        default=1000,
        metavar="N",
        help=f"rows per transaction, up to {MAX_ROWS} (default 1000)",
    )


def _address(text: str) -> str:
    try:
        return normalise(text)
    except InvalidAddress as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _suppression_reason(text: str) -> Reason:
    reasons = {reason.value: reason for reason in SUPPRESSION_REASONS}
    if text not in reasons:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a suppression reason: {', '.join(reasons)}"
        )
    return reasons[text]


def _add_suppressions(commands: Any) -> None:
    group: argparse.ArgumentParser = commands.add_parser(
        "suppressions",
        help="the suppression list: list, add, remove",
        description="Addresses the worker never sends to while their entry is live (hard "
        "bounces and complaints add themselves). Exit codes as for every command.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    reasons = ", ".join(reason.value for reason in SUPPRESSION_REASONS)

    listing = _add(actions, "list", cmd_suppressions_list, "suppressed addresses")
    listing.add_argument(
        "--reason", type=_suppression_reason, metavar="R", help=f"only this reason: {reasons}"
    )
    listing.add_argument(
        "--limit",
        type=_row_count,
        default=100,
        metavar="N",
        help=f"at most N, up to {MAX_ROWS} (default 100)",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    add = _add(actions, "add", cmd_suppressions_add, "suppress an address (idempotent)")
    add.add_argument("address", type=_address, metavar="ADDRESS")
    add.add_argument(
        "--reason",
        type=_suppression_reason,
        default=Reason.MANUAL,
        metavar="R",
        help=f"{reasons} (default manual)",
    )
    add.add_argument(
        "--expires",
        type=_duration,
        metavar="DURATION",
        help="lift it automatically after 30m, 24h, 30d ... (default: never)",
    )
    add.add_argument("--json", action="store_true", help="machine-readable output")

    remove = _add(actions, "remove", cmd_suppressions_remove, "lift a suppression")
    remove.add_argument("address", type=_address, metavar="ADDRESS")
    remove.add_argument("--json", action="store_true", help="machine-readable output")


def _add_publish(commands: Any) -> None:
    p = _add(commands, "publish", cmd_publish, "enqueue one delivery on DELIVERY_TOPIC")
    p.add_argument("--workflow", required=True, metavar="W")
    p.add_argument("--recipient", required=True, metavar="R")
    p.add_argument(
        "--data", required=True, type=_json_value, metavar="JSON", help="the template variables"
    )
    p.add_argument("--delivery-id", metavar="ID", help="default: cli_<random hex>")
    p.add_argument(
        "--metadata", type=_json_value, metavar="JSON", help="stored with the ledger row"
    )
    p.add_argument("--locale", metavar="L", help="default: en")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Operate the email worker. Exit codes: 0 success, 1 failure (one line on "
        "stderr), 2 bad usage. Settings come from the environment (DATABASE_URL, "
        "GOOGLE_CLOUD_PROJECT, DELIVERY_TOPIC, ...).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_migrate,
        _add_replay,
        _add_reads,
        _add_prune,
        _add_suppressions,
        _add_publish,
    ):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Command = args.handler
    try:
        return handler(args)
    except (SettingsError, CommandError, replay.ReplayError, PublishError) as error:
        print(f"error: {error}", file=sys.stderr)
    except psycopg.Error as error:
        print(f"error: database: {_first_line(error)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return 1


# --- plumbing -----------------------------------------------------------------------------


@contextmanager
def _ledger() -> Iterator[Ledger]:
    settings = database_settings()
    # Connect once directly first: the pool would hide why a connection failed behind a
    # timeout, and log its retries to stderr.
    psycopg.connect(settings.url, **connection_kwargs(settings)).close()
    pool = open_pool(settings)
    try:
        yield Ledger(pool)
    finally:
        pool.close()


def _delivery_pubsub() -> PubSubSettings:
    settings = pubsub_settings()
    if settings.delivery_topic is None:
        raise SettingsError("DELIVERY_TOPIC is required but not set")
    return settings


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- output -------------------------------------------------------------------------------


class _Progress:
    """One self-overwriting line on a terminal; nothing when stderr is a file or pipe."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.shown = False

    def show(self, summary: replay.Summary) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[K{_replay_summary(summary, progress=True)}")
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


class _ReplayPrinter:
    COLUMNS = ("OUTCOME", "DELIVERY_ID", "WORKFLOW", "REASON", "ERROR_CODE", "DECISION")
    WIDTHS = (13, 28, 18, 26, 14)

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        self.header_shown = False

    def item(self, item: replay.Item) -> None:
        self.progress.clear()
        if not self.header_shown:
            print(self._line(self.COLUMNS))
            self.header_shown = True
        letter = item.letter
        decision = item.action.description if item.action else ""
        detail = "; ".join(part for part in (decision, item.detail) if part)
        cells = (
            item.outcome,
            letter.delivery_id,
            letter.workflow,
            letter.reason,
            letter.error_code,
            detail,
        )
        print(self._line(tuple(_cell(cell) for cell in cells)))

    def _line(self, cells: tuple[str, ...]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, self.WIDTHS, strict=False)]
        return "  ".join([*padded, cells[-1]]).rstrip()


def _replay_summary(summary: replay.Summary, *, progress: bool = False) -> str:
    verb = "would replay" if summary.dry_run else "replayed"
    text = f"{verb} {summary.replayed}, skipped {summary.skipped}, failed {summary.failed}"
    text += f", left for later {summary.left}"
    if summary.too_large:
        text += f", too large to receive {summary.too_large}"
    if summary.expired:
        dropped = summary.dropped_expired
        text += f", expired {summary.expired} ({'dropped' if dropped else 'left'})"
    if progress:
        return f"replay: pulled {summary.pulled}, {text}"
    return text + (" (dry run: nothing changed)" if summary.dry_run else "")


def _print_delivery(d: Delivery) -> None:
    fields = [
        ("delivery_id", d.delivery_id),
        ("status", f"{d.status}" + (f" ({d.status_reason})" if d.status_reason else "")),
        ("workflow", d.workflow),
        ("recipient", d.recipient),
        ("locale", d.locale),
        ("attempts", d.attempts),
        ("replays", d.replays),
        ("last error", _error(d.last_error_code, d.last_error_message)),
        ("queued at", _when(d.queued_at)),
        ("last attempted at", _when(d.last_attempted_at)),
        ("sent at", _when(d.sent_at)),
        ("lease expires at", _when(d.lease_expires_at)),
        ("provider status", d.provider_status),
        ("delivered at", _when(d.delivered_at)),
        ("first opened at", _when(d.opened_at)),
        ("first clicked at", _when(d.clicked_at)),
        ("bounced at", _when(d.bounced_at)),
        ("bounce type", d.bounce_type),
        ("complained at", _when(d.complained_at)),
        ("provider message id", d.provider_message_id),
        ("relay message id", d.relay_message_id),
        ("source message id", d.source_message_id),
        ("metadata", None if d.metadata is None else json.dumps(d.metadata, sort_keys=True)),
        ("created at", _when(d.created_at)),
        ("updated at", _when(d.updated_at)),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name.ljust(width)}  {_cell(value)}")


def _history_row(d: Delivery) -> list[Any]:
    return [
        _when(d.updated_at),
        d.delivery_id,
        d.workflow,
        d.status,
        d.attempts,
        d.replays,
        _error(d.last_error_code, None),
    ]


_STATS_HEADERS = [
    "WORKFLOW",
    "TOTAL",
    *(status.value.upper() for status in Status),  # the order of WorkflowStats.counts
    *(code.value for code in SKIP_CODES),  # the skipped ones by code
    "SUCCESS",
    "DELIVERED",
    "BOUNCED",
    "COMPLAINED",
    "MEAN_ATTEMPTS",
    "P50",
    "P95",
    # Time to send: from the first publish to the relay's acceptance.
    "SEND_P50",
    "SEND_P95",
    "SEND_P99",
]


def _stats_row(row: reports.WorkflowStats) -> list[Any]:
    rate = _rate(row.success_rate)
    return [
        row.workflow,
        row.total,
        *row.counts.values(),
        *(row.skipped_by_code.get(code, 0) for code in SKIP_CODES),
        rate,
        _rate(row.delivered_rate),
        _rate(row.bounce_rate),
        _rate(row.complaint_rate),
        _number(row.mean_attempts, "{:.2f}"),
        _number(row.p50_seconds, "{:.1f}s"),
        _number(row.p95_seconds, "{:.1f}s"),
        _number(row.send_p50_seconds, "{:.1f}s"),
        _number(row.send_p95_seconds, "{:.1f}s"),
        _number(row.send_p99_seconds, "{:.1f}s"),
    ]


_RELAY_STATS_HEADERS = [
    "RELAY",
    "SENT",
    "TRANSIENT_FAILURES",
    "PERMANENT_FAILURES",
    "SMTP_P50",
    "SMTP_P95",
]


def _relay_stats_row(row: reports.RelayStats) -> list[Any]:
    return [
        row.relay,
        row.sent,
        row.transient_failures,
        row.permanent_failures,
        _number(row.smtp_p50_ms, "{:.0f}ms"),
        _number(row.smtp_p95_ms, "{:.0f}ms"),
    ]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(headers), *[[_cell(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _rate(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


def _number(value: float | None, template: str) -> str | None:
    return None if value is None else template.format(value)


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(sep=" ", timespec="seconds")


def _error(code: str | None, message: str | None) -> str | None:
    if code is None:
        return message
    return f"{code}: {message}" if message else code


def _suppression_state(entry: Suppression | None) -> str:
    if entry is None:
        return "none"
    origin = f", from delivery {entry.delivery_id}" if entry.delivery_id else ""
    since = f"{entry.reason} since {_when(entry.created_at)}{origin}"
    if entry.expires_at is None:
        return f"{since}, never expires"
    if entry.live:
        return f"{since}, expires {_when(entry.expires_at)}"
    return f"expired at {_when(entry.expires_at)} ({since}): no longer suppressed"


def _plain(value: Any) -> Any:
    """Dataclasses (and lists of them) as JSON-ready dicts."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return dataclasses.asdict(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
