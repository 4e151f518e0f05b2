#!/usr/bin/env bash
# Deploy the read-only support console (README "Support console"): the `delivery_console`
# target of main.py as a 2nd gen HTTP function that nobody may call without IAM.
#
#   1. its own service account and its own secret (the libpq URI of a LOGIN role granted
#      email_reader and nothing more), the account allowed to read that one secret;
#   2. gcloud functions deploy --trigger-http --no-allow-unauthenticated, with only its
#      database URL in its environment (no SMTP, no Pub/Sub): mounted with --set-secrets, or
#      with SECRETS_VIA=worker as CONSOLE_DATABASE_URL_SECRET for the console to read;
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

note "the console's service account and database secret"
ensure "service account $CONSOLE_SA_EMAIL" \
  gcloud iam service-accounts describe "$CONSOLE_SA_EMAIL" "${project[@]}" -- \
  gcloud iam service-accounts create "$CONSOLE_SA" \
  --display-name="Email support console (runtime)" \
  --description="Identity of the $CONSOLE_FUNCTION_NAME function: reads its database secret, nothing else" \
  "${project[@]}"
ensure "secret $CONSOLE_DATABASE_URL_SECRET_ID" \
  gcloud secrets describe "$CONSOLE_DATABASE_URL_SECRET_ID" "${project[@]}" -- \
  gcloud secrets create "$CONSOLE_DATABASE_URL_SECRET_ID" --replication-policy=automatic "${project[@]}"
bind gcloud secrets add-iam-policy-binding "$CONSOLE_DATABASE_URL_SECRET_ID" \
  --member="serviceAccount:$CONSOLE_SA_EMAIL" \
  --role=roles/secretmanager.secretAccessor \
  "${project[@]}"

# The console reads versions/latest when an instance starts; without one it would stop there.
note "preflight: the console's secret has an enabled latest version"
state=$(capture ENABLED gcloud secrets versions describe latest \
  --secret="$CONSOLE_DATABASE_URL_SECRET_ID" "${project[@]}" --format='value(state)') || state=MISSING
if [[ $state != ENABLED ]]; then
  die_config "secret $CONSOLE_DATABASE_URL_SECRET_ID has no enabled latest version ($state): add an email_reader login's URI with deploy/set-secret.sh $CONSOLE_DATABASE_URL_SECRET_ID"
fi

# Its one secret, as the worker's (SECRETS_VIA): mounted by Cloud Run as CONSOLE_DATABASE_URL,
# or passed as CONSOLE_DATABASE_URL_SECRET for the console to read itself. Each mode clears
# the other's, since the console refuses both set at once.
if [[ $SECRETS_VIA == env ]]; then
  secret_flag="--set-secrets=CONSOLE_DATABASE_URL=$CONSOLE_DATABASE_URL_SECRET_ID:latest"
  env_flag=--clear-env-vars
else
  secret_flag=--clear-secrets
  env_flag="--set-env-vars=CONSOLE_DATABASE_URL_SECRET=$CONSOLE_DATABASE_URL_SECRET"
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
  "$secret_flag" \
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
