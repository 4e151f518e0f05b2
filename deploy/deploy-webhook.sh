#!/usr/bin/env bash
# Deploy the provider webhook (docs/webhooks.md): the same source as the worker, target
# handle_provider_event, as an HTTP function that anyone may call
# (--trigger-http --allow-unauthenticated): providers cannot present Google credentials, so
# authenticity is each request's signature (or Postmark's Basic credentials), checked by the
# function before it reads anything.
#
#   1. its own service account, which may read only the database URL and the enabled
#      providers' secrets;
#   2. one Secret Manager secret per provider credential (created empty if missing; add the
#      value with deploy/set-secret.sh), mounted with --set-secrets like the worker's
#      (SECRETS_VIA=worker: the function gets `..._SECRET` version names and reads them);
#   3. gcloud functions deploy --gen2 --trigger-http --allow-unauthenticated;
#   4. the URL to give each provider, printed (deploy/README.md says where it goes).
#
# Needs PROJECT_ID and WEBHOOK_PROVIDERS (comma-separated: sendgrid, mailgun, postmark,
# resend, ses); ses also needs SNS_TOPIC_ARNS. Run deploy/setup-project.sh once first.
set -euo pipefail
# shellcheck source=deploy/config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${WEBHOOK_FUNCTION_NAME:=email-webhooks}"
: "${WEBHOOK_SA:=email-webhook-runtime}"
: "${WEBHOOK_PROVIDERS:=}"
: "${WEBHOOK_TIMEOUT:=60s}"
: "${WEBHOOK_MEMORY:=256Mi}"
: "${WEBHOOK_MAX_INSTANCES:=10}"
: "${POSTMARK_WEBHOOK_USERNAME:=postmark}"
: "${SNS_TOPIC_ARNS:=}"
: "${SNS_CERT_HOSTS:=}"

USAGE="usage: $SCRIPT_NAME [--dry-run] [--help]

Deploys $WEBHOOK_FUNCTION_NAME (target handle_provider_event, HTTP, unauthenticated: each
request proves itself with the provider's signature) from SOURCE_DIR, with one secret per
provider credential. PROJECT_ID and WEBHOOK_PROVIDERS (e.g. sendgrid,postmark) are required;
ses also needs SNS_TOPIC_ARNS.
  --dry-run  print the gcloud commands, one a line, and run none of them"

parse_args "$@"
((${#POSITIONAL[@]} == 0)) || die_usage "unexpected argument: ${POSITIONAL[0]}"
load_config
require WEBHOOK_PROVIDERS
matches WEBHOOK_FUNCTION_NAME '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$' "a function name (lowercase letters, digits, hyphens)"
matches WEBHOOK_SA "$ID_RE" "a service account id (6-30 lowercase letters, digits, hyphens)"
int_in WEBHOOK_MAX_INSTANCES 1 1000
timeout=$(seconds_of WEBHOOK_TIMEOUT)
((timeout >= 1 && timeout <= 3600)) || die_config "WEBHOOK_TIMEOUT must be 1s..3600s, got '$WEBHOOK_TIMEOUT'"
[[ -d $SOURCE_DIR && -f $SOURCE_DIR/main.py ]] || die_config "SOURCE_DIR has no main.py: $SOURCE_DIR"
SOURCE_DIR=$(cd "$SOURCE_DIR" && pwd)

project=(--project="$PROJECT_ID")
webhook_sa_email="$WEBHOOK_SA@$PROJECT_ID.iam.gserviceaccount.com"

# Each provider: the setting the function reads, and the secret that holds it.
env_vars=(
  # Sizes the database pool; THREADS must match --concurrency (deploy-function.sh says why).
  "CONCURRENCY=$CONCURRENCY"
  "THREADS=$CONCURRENCY"
  "LOG_EXECUTION_ID=true"
)
secret_vars=(DATABASE_URL)
secret_ids=("$DATABASE_URL_SECRET_ID")
secrets=()
providers=()
IFS=, read -ra requested <<<"$WEBHOOK_PROVIDERS"
for provider in "${requested[@]}"; do
  provider=${provider// /}
  [[ -n $provider ]] || continue
  case $provider in
    sendgrid) pairs=("SENDGRID_WEBHOOK_PUBLIC_KEY email-webhook-sendgrid-public-key") ;;
    mailgun) pairs=("MAILGUN_WEBHOOK_SIGNING_KEY email-webhook-mailgun-signing-key") ;;
    postmark)
      matches POSTMARK_WEBHOOK_USERNAME '^[A-Za-z0-9._-]{1,64}$' "letters, digits, . _ - (it goes into a URL)"
      env_vars+=("POSTMARK_WEBHOOK_USERNAME=$POSTMARK_WEBHOOK_USERNAME")
      pairs=("POSTMARK_WEBHOOK_PASSWORD email-webhook-postmark-password")
      ;;
    resend) pairs=("RESEND_WEBHOOK_SECRET email-webhook-resend-secret") ;;
    ses)
      require SNS_TOPIC_ARNS
      env_vars+=("SNS_TOPIC_ARNS=$SNS_TOPIC_ARNS")
      [[ -z $SNS_CERT_HOSTS ]] || env_vars+=("SNS_CERT_HOSTS=$SNS_CERT_HOSTS")
      pairs=()
      ;;
    *) die_config "WEBHOOK_PROVIDERS: unknown provider '$provider' (sendgrid, mailgun, postmark, resend, ses)" ;;
  esac
  providers+=("$provider")
  for pair in ${pairs[@]+"${pairs[@]}"}; do
    read -r setting secret <<<"$pair"
    secret_vars+=("$setting")
    secret_ids+=("$secret")
    secrets+=("$secret")
  done
done
((${#providers[@]})) || die_config "WEBHOOK_PROVIDERS names no provider"

mount_secrets

join_env_vars

note "the webhook's own service account: reads its secrets and the database URL, nothing else"
ensure "service account $WEBHOOK_SA" \
  gcloud iam service-accounts describe "$webhook_sa_email" "${project[@]}" -- \
  gcloud iam service-accounts create "$WEBHOOK_SA" \
  --display-name="email provider webhooks" "${project[@]}"

note "one secret per provider credential (values: deploy/set-secret.sh SECRET_ID < value)"
for secret in ${secrets[@]+"${secrets[@]}"}; do
  ensure "secret $secret" \
    gcloud secrets describe "$secret" "${project[@]}" -- \
    gcloud secrets create "$secret" --replication-policy=automatic "${project[@]}"
done
for secret in "$DATABASE_URL_SECRET_ID" ${secrets[@]+"${secrets[@]}"}; do
  bind gcloud secrets add-iam-policy-binding "$secret" \
    --member="serviceAccount:$webhook_sa_email" \
    --role=roles/secretmanager.secretAccessor \
    "${project[@]}"
done

preflight_secrets "${secret_ids[@]}"

note "function $WEBHOOK_FUNCTION_NAME from $SOURCE_DIR (providers: ${providers[*]})"
run gcloud functions deploy "$WEBHOOK_FUNCTION_NAME" \
  --gen2 \
  --runtime=python312 \
  --region="$REGION" \
  --source="$SOURCE_DIR" \
  --entry-point=handle_provider_event \
  --trigger-http \
  --allow-unauthenticated \
  --service-account="$webhook_sa_email" \
  --ingress-settings=all \
  --timeout="$WEBHOOK_TIMEOUT" \
  --concurrency="$CONCURRENCY" \
  --cpu="$CPU" \
  --memory="$WEBHOOK_MEMORY" \
  --max-instances="$WEBHOOK_MAX_INSTANCES" \
  --set-env-vars="$joined" \
  "${secret_flags[@]}" \
  "${project[@]}"

url=$(capture '<function-url>' \
  gcloud functions describe "$WEBHOOK_FUNCTION_NAME" --gen2 --region="$REGION" "${project[@]}" \
  --format='value(serviceConfig.uri)')
note "point each provider at its URL (deploy/README.md, 'Provider webhooks'):"
for provider in "${providers[@]}"; do
  if [[ $provider == postmark ]]; then
    note "  postmark: https://$POSTMARK_WEBHOOK_USERNAME:<password>@${url#https://}/postmark"
  else
    note "  $provider: $url/$provider"
  fi
done
note "done"
