"""The operators' command line: `python -m worker COMMAND`.

Exit codes: 0 success, 1 failure (one clear line on stderr), 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import psycopg

from worker import migrations
from worker.settings import SettingsError, database_settings

Command = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A failure the operator can act on; printed as one line, exit code 1."""


def cmd_migrate(args: argparse.Namespace) -> int:
    url = database_settings().url
    if args.down:
        migrations.migrate_down(url, steps=args.steps)
    else:
        migrations.migrate_up(url)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser(
        "migrate", help="apply sql/migrations (DATABASE_URL)", description=cmd_migrate.__doc__
    )
    migrate.add_argument(
        "--down", action="store_true", help="roll back instead: the newest migration(s)"
    )
    migrate.add_argument("--steps", type=int, default=1, help="with --down: how many (default 1)")
    migrate.set_defaults(handler=cmd_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Command = args.handler
    try:
        return handler(args)
    except (SettingsError, CommandError) as error:
        print(f"error: {error}", file=sys.stderr)
    except psycopg.Error as error:
        print(f"error: database: {str(error).strip().splitlines()[0]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return 1
