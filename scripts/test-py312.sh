#!/usr/bin/env bash
# The runtime path's tests again on Python 3.12, the Cloud Functions runtime (python312):
# decoding, rendering, SMTP, settings, the ledger, the pipeline, the end-to-end push and the
# trace/execution-id fallback through functions-framework, and the SES webhook adapter (SNS
# signatures).
# Lint and the operators' tools run once, on the main interpreter (scripts/test.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py312="$(command -v python3.12 2>/dev/null || true)"
if [ -z "$py312" ] || ! "$py312" --version >/dev/null 2>&1; then
  py312="$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1 || true)"
fi
if [ -z "$py312" ]; then
  echo "Python 3.12 (the Cloud Functions runtime) is required for this check" >&2
  exit 1
fi
VENV="$root/.venv-py312" PYTHON="$py312" bash scripts/bootstrap.sh
. scripts/require-services.sh
echo "== pytest on $("$root/.venv-py312/bin/python" --version)"
"$root/.venv-py312/bin/python" -m pytest -p no:cacheprovider \
  tests/test_events.py tests/test_rendering.py tests/test_smtp.py tests/test_settings.py \
  tests/test_ledger.py tests/test_pipeline.py tests/test_end_to_end.py tests/test_tracing.py \
  tests/test_claim.py tests/test_skipping.py tests/test_provider_ses.py "$@"
