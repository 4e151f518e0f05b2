#!/usr/bin/env bash
# Deploy the email worker (2nd gen Cloud Function on the delivery topic) and, on every deploy,
# the parts Eventarc's trigger does not keep by itself:
#
#   1. gcloud functions deploy --gen2 --trigger-topic --retry, with the worker's settings as
#      environment variables, CONCURRENCY requests per instance on CPU vCPUs, and the secrets
#      with --set-secrets (Cloud Run resolves `latest` when an instance starts and hands the
#      worker plain DATABASE_URL / SMTP_PASSWORD variables: no Secret Manager client at
#      start). SECRETS_VIA=worker passes DATABASE_URL_SECRET / SMTP_PASSWORD_SECRET instead,
#      which the worker reads itself (docs/reference.md; the slower cold start).
#   2. the trigger's subscription (created by Eventarc, looked up through the function's
#      eventTrigger.trigger) gets the Pub/Sub dead-letter policy and retry backoff;
#   3. the Pub/Sub service agent may forward to the dead-letter topic and ack on that
#      subscription (what a dead-letter policy needs), each on that one resource;
#   4. the trigger service account may invoke the function's Cloud Run service, nothing else.
#
# Run deploy/setup-project.sh once first. Needs PROJECT_ID, SMTP_HOST and EMAIL_FROM.
set -euo pipefail
# shellcheck source=deploy/config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

USAGE="usage: $SCRIPT_NAME [--dry-run] [--help]

Deploys the $FUNCTION_NAME function from SOURCE_DIR (default: the repository root) and sets
the trigger subscription's dead-letter policy and the IAM bindings that go with it.
Settings come from the environment (see deploy/config.sh); PROJECT_ID, SMTP_HOST and
EMAIL_FROM are required.
  --dry-run  print the gcloud commands, one a line, and run none of them
             (looked-up values appear as <project-number>, <trigger-subscription>, ...)"

parse_args "$@"
((${#POSITIONAL[@]} == 0)) || die_usage "unexpected argument: ${POSITIONAL[0]}"
load_function_config

project=(--project="$PROJECT_ID")

# The worker's environment: always the topics, the secrets and the retry budget; the optional
# SMTP settings only when set, so the worker's own defaults apply otherwise.
env_vars=(
  "GOOGLE_CLOUD_PROJECT=$PROJECT_ID"
  "DELIVERY_TOPIC=$DELIVERY_TOPIC"
  "DEAD_LETTER_TOPIC=$DEAD_LETTER_TOPIC"
  "MAX_ATTEMPTS=$MAX_ATTEMPTS"
  "LEASE_SECONDS=$LEASE_SECONDS"
  # Sizes the worker's pools; THREADS is functions-framework's gunicorn thread count, which
  # must match Cloud Run's --concurrency or requests queue inside the instance.
  "CONCURRENCY=$CONCURRENCY"
  "THREADS=$CONCURRENCY"
  # functions-framework adds the execution id (labels) and span id to every JSON line.
  "LOG_EXECUTION_ID=true"
)
for name in SMTP_HOST SMTP_PORT SMTP_SECURITY SMTP_USERNAME SMTP_TIMEOUT_SECONDS SMTP_PROVIDER EMAIL_FROM EMAIL_REPLY_TO \
  FALLBACK_SMTP_HOST FALLBACK_SMTP_PORT FALLBACK_SMTP_SECURITY FALLBACK_SMTP_USERNAME FALLBACK_SMTP_PROVIDER \
  RELAY_TRIP_AFTER RELAY_COOLDOWN_SECONDS; do
  if [[ -n ${!name} ]]; then
    env_vars+=("$name=${!name}")
  fi
done

# The secrets: ENV=SECRET:latest for --set-secrets, or the version names for the worker.
secret_ids=("$DATABASE_URL_SECRET_ID")
secret_vars=(DATABASE_URL)
if [[ -n $SMTP_USERNAME ]]; then
  secret_ids+=("$SMTP_PASSWORD_SECRET_ID")
  secret_vars+=(SMTP_PASSWORD)
fi
if [[ -n $FALLBACK_SMTP_HOST && -n $FALLBACK_SMTP_USERNAME ]]; then
  secret_ids+=("$FALLBACK_SMTP_PASSWORD_SECRET_ID")
  secret_vars+=(FALLBACK_SMTP_PASSWORD)
fi
mount_secrets

optional_flags=()
if [[ -n $VPC_CONNECTOR ]]; then
  # All egress through the connector, so the relay sees Cloud NAT's static address.
  optional_flags+=("--vpc-connector=$VPC_CONNECTOR" --egress-settings=all)
fi
if [[ -n $BUILD_SERVICE_ACCOUNT ]]; then
  build_sa=$BUILD_SERVICE_ACCOUNT
  [[ $build_sa == projects/* ]] || build_sa="projects/$PROJECT_ID/serviceAccounts/$build_sa"
  optional_flags+=("--build-service-account=$build_sa")
fi

join_env_vars

preflight_secrets "${secret_ids[@]}"

note "function $FUNCTION_NAME from $SOURCE_DIR"
run gcloud functions deploy "$FUNCTION_NAME" \
  --gen2 \
  --runtime=python312 \
  --region="$REGION" \
  --source="$SOURCE_DIR" \
  --entry-point=handle_delivery \
  --trigger-topic="$DELIVERY_TOPIC" \
  --retry \
  --service-account="$RUNTIME_SA_EMAIL" \
  --trigger-service-account="$TRIGGER_SA_EMAIL" \
  --ingress-settings="$INGRESS_SETTINGS" \
  --timeout="$FUNCTION_TIMEOUT" \
  --concurrency="$CONCURRENCY" \
  --cpu="$CPU" \
  --memory="$MEMORY" \
  --max-instances="$MAX_INSTANCES" \
  --set-env-vars="$joined" \
  "${secret_flags[@]}" \
  ${optional_flags[@]+"${optional_flags[@]}"} \
  "${project[@]}"

note "lookups"
project_number=$(capture '<project-number>' \
  gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)')
trigger=$(capture '<trigger>' \
  gcloud functions describe "$FUNCTION_NAME" --v2 --region="$REGION" "${project[@]}" \
  --format='value(eventTrigger.trigger)')
# projects/P/subscriptions/eventarc-REGION-...: Eventarc recreates it when the trigger changes,
# which is why the policy below is set again on every deploy.
subscription=$(capture '<trigger-subscription>' \
  gcloud eventarc triggers describe "$trigger" "${project[@]}" \
  --format='value(transport.pubsub.subscription)')
subscription=${subscription##*/}
pubsub_agent="serviceAccount:service-$project_number@gcp-sa-pubsub.iam.gserviceaccount.com"

note "the Pub/Sub service agent: forward to the dead-letter topic, ack on the trigger subscription"
bind gcloud pubsub topics add-iam-policy-binding "$DEAD_LETTER_TOPIC" \
  --member="$pubsub_agent" \
  --role=roles/pubsub.publisher \
  "${project[@]}"
bind gcloud pubsub subscriptions add-iam-policy-binding "$subscription" \
  --member="$pubsub_agent" \
  --role=roles/pubsub.subscriber \
  "${project[@]}"
# Lets Pub/Sub sign the push's OIDC token as the trigger service account; granted by default
# only in projects whose Pub/Sub agent was created after 2021-04-08.
bind gcloud iam service-accounts add-iam-policy-binding "$TRIGGER_SA_EMAIL" \
  --member="$pubsub_agent" \
  --role=roles/iam.serviceAccountTokenCreator \
  "${project[@]}"

note "dead-letter policy on the trigger subscription (the worker dead-letters itself at MAX_ATTEMPTS=$MAX_ATTEMPTS first)"
run gcloud pubsub subscriptions update "$subscription" \
  --dead-letter-topic="$DEAD_LETTER_TOPIC" \
  --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS" \
  --min-retry-delay="$MIN_RETRY_DELAY" \
  --max-retry-delay="$MAX_RETRY_DELAY" \
  --ack-deadline="$ACK_DEADLINE" \
  "${project[@]}"

# A 2nd gen function runs as the Cloud Run service of the same name.
note "the trigger service account: invoke this function's service, nothing else"
bind gcloud run services add-iam-policy-binding "$FUNCTION_NAME" \
  --region="$REGION" \
  --member="serviceAccount:$TRIGGER_SA_EMAIL" \
  --role=roles/run.invoker \
  "${project[@]}"

note "done"
