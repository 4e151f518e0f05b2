#!/usr/bin/env bash
# Add a new version to a secret, the value read from standard input.
#
#   printf '%s' "$NEW_PASSWORD" | deploy/set-secret.sh email-smtp-password
#   deploy/set-secret.sh email-database-url < database-url.txt
#   deploy/set-secret.sh email-smtp-password          # on a terminal: asks, without echo
#
# The value never appears on a command line (so never in shell history or `ps`) and is never
# printed, not even with --dry-run. Trailing newlines are removed. This is also how the SMTP
# password is rotated: see deploy/README.md.
set -euo pipefail
# shellcheck source=deploy/config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

USAGE="usage: $SCRIPT_NAME [--dry-run] [--help] SECRET_ID < value

Adds a version holding the value on standard input to the secret SECRET_ID
(e.g. $DATABASE_URL_SECRET_ID or $SMTP_PASSWORD_SECRET_ID). PROJECT_ID is required.
  --dry-run  print the gcloud command (never the value) and run nothing"

parse_args "$@"
((${#POSITIONAL[@]} == 1)) || die_usage "expected one SECRET_ID, got ${#POSITIONAL[@]} arguments"
secret=${POSITIONAL[0]}
load_config
[[ $secret =~ $SECRET_RE ]] || die_usage "not a secret id: $secret"

value=
if [[ -t 0 ]]; then
  if ((!DRY_RUN)); then
    read -rsp "value for $secret (not echoed): " value
    printf '\n' >&2
  fi
else
  value=$(cat)
fi
if [[ -z $value && ! (-t 0 && $DRY_RUN -eq 1) ]]; then
  die_config "no value on standard input for $secret"
fi

show gcloud secrets versions add "$secret" --data-file=- --project="$PROJECT_ID"
if ((!DRY_RUN)); then
  # printf is a builtin: the value goes down the pipe without being an argument of a process.
  printf '%s' "$value" | gcloud secrets versions add "$secret" --data-file=- --project="$PROJECT_ID"
fi
value=
