#!/usr/bin/env bash
# One command for the benchmarks: bash bench/run.sh [--quick] [--only a,b] [--skip c] [--json PATH]
# Installs what it needs (the venv; Postfix for smtp-sink), starts PostgreSQL, the sinks and
# the Pub/Sub emulator itself, stops them at the end, prints a table, writes JSON.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
if ! command -v smtp-sink >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-sink ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench: smtp-sink (Debian package postfix) is missing and we are not root" >&2
    exit 1
  fi
  echo "bench: installing postfix for smtp-sink ..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
export PATH="$PATH:/usr/sbin"
exec "$root/.venv/bin/python" -m bench "$@"
