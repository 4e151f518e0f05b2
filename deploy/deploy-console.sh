#!/usr/bin/env bash
# Deploy the read-only support console (README "Support console"): the `delivery_console`
# target of main.py as a 2nd gen HTTP function that nobody may call without IAM.
#
#   1. its own service account and its own two secrets, the account allowed to read those
#      alone: the libpq URI of a LOGIN role granted email_reader and nothing more, and the key
#      that signs its page cursors (at least 32 random bytes);
#   2. gcloud functions deploy --trigger-http --no-allow-unauthenticated, with only those two
#      in its environment (no SMTP, no Pub/Sub): mounted with --set-secrets as
#      CONSOLE_DATABASE_URL and CONSOLE_CURSOR_KEY, or with SECRETS_VIA=worker as
#      CONSOLE_DATABASE_URL_SECRET and CONSOLE_CURSOR_KEY_SECRET for the console to read;
#   3. roles/run.invoker on its Cloud Run service for each member of CONSOLE_INVOKERS (a
#      support group), nothing on the project.
#
# Run deploy/setup-project.sh once first (the APIs). Needs PROJECT_ID and CONSOLE_INVOKERS.
set -euo pipefail
# shellcheck source=deploy/config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

USAGE="usage: $SCRIPT_NAME [--dry-run] [--help]

Deploys the support console ($CONSOLE_FUNCTION_NAME, entry point delivery_console) from
SOURCE_DIR (default: the repository root), private to the IAM members in CONSOLE_INVOKERS.
Settings come from the environment (see deploy/config.sh); PROJECT_ID and CONSOLE_INVOKERS
(e.g. group:support@acme.example) are required.
  --dry-run  print the gcloud commands, one a line, and run none of them"

parse_args "$@"
((${#POSITIONAL[@]} == 0)) || die_usage "unexpected argument: ${POSITIONAL[0]}"
load_console_config

project=(--project="$PROJECT_ID")

# Its settings held in secrets: the reader login's URI, and the key that signs page cursors.
secret_vars=(CONSOLE_DATABASE_URL CONSOLE_CURSOR_KEY)
secret_ids=("$CONSOLE_DATABASE_URL_SECRET_ID" "$CONSOLE_CURSOR_KEY_SECRET_ID")

note "the console's service account and its secrets"
ensure "service account $CONSOLE_SA_EMAIL" \
  gcloud iam service-accounts describe "$CONSOLE_SA_EMAIL" "${project[@]}" -- \
  gcloud iam service-accounts create "$CONSOLE_SA" \
  --display-name="Email support console (runtime)" \
  --description="Identity of the $CONSOLE_FUNCTION_NAME function: reads its own secrets, nothing else" \
  "${project[@]}"
for secret in "${secret_ids[@]}"; do
  ensure "secret $secret" \
    gcloud secrets describe "$secret" "${project[@]}" -- \
    gcloud secrets create "$secret" --replication-policy=automatic "${project[@]}"
  bind gcloud secrets add-iam-policy-binding "$secret" \
    --member="serviceAccount:$CONSOLE_SA_EMAIL" \
    --role=roles/secretmanager.secretAccessor \
    "${project[@]}"
done

# The console reads versions/latest of each when an instance starts; without one it would stop
# there, so stop the deploy instead, saying what to add.
# has_version SECRET_ID WHAT-TO-ADD
has_version() {
  local state
  state=$(capture ENABLED gcloud secrets versions describe latest \
    --secret="$1" "${project[@]}" --format='value(state)') || state=MISSING
  [[ $state == ENABLED ]] || die_config "secret $1 has no enabled latest version ($state): $2"
}
note "preflight: the console's secrets have an enabled latest version"
has_version "$CONSOLE_DATABASE_URL_SECRET_ID" \
  "add an email_reader login's URI with deploy/set-secret.sh $CONSOLE_DATABASE_URL_SECRET_ID"
has_version "$CONSOLE_CURSOR_KEY_SECRET_ID" \
  "add a random key with: openssl rand -base64 48 | deploy/set-secret.sh $CONSOLE_CURSOR_KEY_SECRET_ID"

# As the worker's (SECRETS_VIA): mounted by Cloud Run as CONSOLE_DATABASE_URL and
# CONSOLE_CURSOR_KEY, or passed as ..._SECRET version names for the console to read itself.
# Each mode clears the other's, since the console refuses both set at once.
env_vars=()
mount_secrets
if ((${#env_vars[@]})); then
  join_env_vars
  env_flag="--set-env-vars=$joined"
else
  env_flag=--clear-env-vars
fi

note "function $CONSOLE_FUNCTION_NAME from $SOURCE_DIR (private: IAM invokers only)"
run gcloud functions deploy "$CONSOLE_FUNCTION_NAME" \
  --gen2 \
  --runtime=python312 \
  --region="$REGION" \
  --source="$SOURCE_DIR" \
  --entry-point=delivery_console \
  --trigger-http \
  --no-allow-unauthenticated \
  --service-account="$CONSOLE_SA_EMAIL" \
  --ingress-settings="$CONSOLE_INGRESS_SETTINGS" \
  --timeout="$CONSOLE_TIMEOUT" \
  --memory="$CONSOLE_MEMORY" \
  --max-instances="$CONSOLE_MAX_INSTANCES" \
  "$env_flag" \
  "${secret_flags[@]}" \
  "${project[@]}"

# A 2nd gen function runs as the Cloud Run service of the same name.
note "who may open the console: roles/run.invoker on its service, nothing else"
for member in "${CONSOLE_INVOKER_LIST[@]}"; do
  bind gcloud run services add-iam-policy-binding "$CONSOLE_FUNCTION_NAME" \
    --region="$REGION" \
    --member="$member" \
    --role=roles/run.invoker \
    "${project[@]}"
done

note "open it: gcloud run services proxy $CONSOLE_FUNCTION_NAME --region=$REGION --project=$PROJECT_ID --port=8080, then http://localhost:8080/"
note "done"
