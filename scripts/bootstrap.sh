#!/usr/bin/env bash
# Creates .venv (once) and installs into it, when they changed: requirements.txt (the deploy's
# lock, hash-checked: the very versions Cloud Functions installs), then requirements-dev.txt.
# Sourced or run by every other script, so a fresh machine needs nothing by hand.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# VENV and PYTHON choose another environment, e.g. the Cloud Functions runtime's Python 3.12.
venv="${VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/requirements.in" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  # Two steps: pip's hash-checking mode covers a whole install, and the dev tools have no
  # hashes. The second step finds the runtime's pins already satisfied and keeps them.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$root/requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements-dev.txt" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
