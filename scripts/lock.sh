#!/usr/bin/env bash
# Writes requirements.txt, the deploy's lock: every transitive dependency of requirements.in
# pinned with its hashes, resolved for the Cloud Functions runtime (python312 on x86_64
# Linux), from PyPI. `gcloud functions deploy` installs requirements.txt, and pip checks every
# hash because every line has one. scripts/check_lock.py (run by scripts/test.sh) fails when
# the lock no longer matches requirements.in.
#
#   bash scripts/lock.sh             # after editing requirements.in; keeps other pins
#   bash scripts/lock.sh --upgrade   # move every transitive dependency to its newest release
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
.venv/bin/uv pip compile requirements.in \
  --output-file requirements.txt \
  --python-version 3.12 \
  --python-platform x86_64-unknown-linux-gnu \
  --generate-hashes \
  --custom-compile-command "bash scripts/lock.sh" \
  --quiet \
  "$@"
.venv/bin/python scripts/check_lock.py
