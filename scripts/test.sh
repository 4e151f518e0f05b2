#!/usr/bin/env bash
# The test command (README, CI): venv, lint, types, then the whole suite against real
# PostgreSQL, the Pub/Sub emulator, aiosmtpd and a local Secret Manager gRPC server.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k ledger`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
. scripts/require-services.sh
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== lock"
.venv/bin/python scripts/check_lock.py
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -p no:cacheprovider "$@"
