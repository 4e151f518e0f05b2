#!/usr/bin/env bash
# The whole service on this machine, end to end (README quick start):
#   bash scripts/local-stack.sh [--keep-running] [--run-dir DIR] [--timeout SECONDS]
# PostgreSQL, the Pub/Sub emulator, an SMTP server that saves .eml files and main.py under
# functions-framework; publishes sample deliveries, prints the ledger, the dead letters and
# where the emails are, then stops everything. Outputs go to run/ (or $LOCAL_STACK_DIR).
# Exit 0 when every outcome is the expected one. See scripts/local_stack.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
. scripts/require-services.sh
# exec: Ctrl-C and SIGTERM go straight to the Python process, which stops what it started.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" "$root/scripts/local_stack.py" "$@"
