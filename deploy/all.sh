#!/usr/bin/env bash
# Set up the project, then deploy the function: deploy/setup-project.sh, then
# deploy/deploy-function.sh, then (when WEBHOOK_PROVIDERS is set) deploy/deploy-webhook.sh,
# then (when CONSOLE_INVOKERS is set) deploy/deploy-console.sh,
# with --dry-run passed through. Every setting is checked before anything is changed.
set -euo pipefail
# shellcheck source=deploy/config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

USAGE="usage: $SCRIPT_NAME [--dry-run] [--help]

Runs setup-project.sh, then deploy-function.sh, then deploy-webhook.sh when
WEBHOOK_PROVIDERS is set, then deploy-console.sh when CONSOLE_INVOKERS is set.
Settings come from the environment (see deploy/config.sh);
PROJECT_ID, SMTP_HOST and EMAIL_FROM are required.
  --dry-run  print the gcloud commands, one a line, and run none of them"

parse_args "$@"
((${#POSITIONAL[@]} == 0)) || die_usage "unexpected argument: ${POSITIONAL[0]}"
# Fail on a missing setting now, not halfway, after the project was already changed.
load_function_config
if [[ -n $CONSOLE_INVOKERS ]]; then
  load_console_config
fi

flags=()
if ((DRY_RUN)); then
  flags+=(--dry-run)
fi
"$DEPLOY_DIR/setup-project.sh" ${flags[@]+"${flags[@]}"}
"$DEPLOY_DIR/deploy-function.sh" ${flags[@]+"${flags[@]}"}
if [[ -n ${WEBHOOK_PROVIDERS:-} ]]; then
  "$DEPLOY_DIR/deploy-webhook.sh" ${flags[@]+"${flags[@]}"}
fi
if [[ -n $CONSOLE_INVOKERS ]]; then
  "$DEPLOY_DIR/deploy-console.sh" ${flags[@]+"${flags[@]}"}
fi
