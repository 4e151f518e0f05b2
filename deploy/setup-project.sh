#!/usr/bin/env bash
# Set up a GCP project for the email worker, from nothing; safe to run again.
#
#   APIs; the delivery and dead-letter topics; the dead-letter topic's pull subscription for
#   `python -m worker replay`; the runtime and trigger service accounts; the two secrets
#   (empty: add their values with deploy/set-secret.sh); and the runtime service account's
#   least-privilege bindings, each on one resource, none on the project.
#   The bindings that need the function to exist are made by deploy-function.sh.
set -euo pipefail
# shellcheck source=deploy/config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

USAGE="usage: $SCRIPT_NAME [--dry-run] [--help]

Creates the topics, the dead-letter replay subscription, the service accounts and the
secrets, and grants the runtime service account access to exactly those it uses.
Settings come from the environment (see deploy/config.sh); PROJECT_ID is required.
  --dry-run  print the gcloud commands, one a line, and run none of them"

parse_args "$@"
((${#POSITIONAL[@]} == 0)) || die_usage "unexpected argument: ${POSITIONAL[0]}"
load_config

project=(--project="$PROJECT_ID")

note "APIs"
run gcloud services enable \
  cloudfunctions.googleapis.com \
  run.googleapis.com \
  eventarc.googleapis.com \
  pubsub.googleapis.com \
  secretmanager.googleapis.com \
  cloudbuild.googleapis.com \
  artifactregistry.googleapis.com \
  logging.googleapis.com \
  iam.googleapis.com \
  cloudresourcemanager.googleapis.com \
  "${project[@]}"

note "topics"
for topic in "$DELIVERY_TOPIC" "$DEAD_LETTER_TOPIC"; do
  ensure "topic $topic" \
    gcloud pubsub topics describe "$topic" "${project[@]}" -- \
    gcloud pubsub topics create "$topic" "${project[@]}"
done

# Created before anything can be dead-lettered: Pub/Sub keeps a message only for the
# subscriptions that exist when it is published. It never expires, even when nobody pulls.
note "dead-letter replay subscription"
ensure "subscription $DEAD_LETTER_SUBSCRIPTION" \
  gcloud pubsub subscriptions describe "$DEAD_LETTER_SUBSCRIPTION" "${project[@]}" -- \
  gcloud pubsub subscriptions create "$DEAD_LETTER_SUBSCRIPTION" \
  --topic="$DEAD_LETTER_TOPIC" \
  --message-retention-duration="$DEAD_LETTER_RETENTION" \
  --expiration-period=never \
  --ack-deadline=60 \
  "${project[@]}"

note "service accounts"
ensure "service account $RUNTIME_SA_EMAIL" \
  gcloud iam service-accounts describe "$RUNTIME_SA_EMAIL" "${project[@]}" -- \
  gcloud iam service-accounts create "$RUNTIME_SA" \
  --display-name="Email worker (runtime)" \
  --description="Identity of the $FUNCTION_NAME function: reads its two secrets, publishes dead letters" \
  "${project[@]}"
ensure "service account $TRIGGER_SA_EMAIL" \
  gcloud iam service-accounts describe "$TRIGGER_SA_EMAIL" "${project[@]}" -- \
  gcloud iam service-accounts create "$TRIGGER_SA" \
  --display-name="Email worker (trigger)" \
  --description="Identity Eventarc uses to invoke the $FUNCTION_NAME function" \
  "${project[@]}"

# Empty secrets; their values are added with deploy/set-secret.sh, never on a command line.
note "secrets"
for secret in "$DATABASE_URL_SECRET_ID" "$SMTP_PASSWORD_SECRET_ID"; do
  ensure "secret $secret" \
    gcloud secrets describe "$secret" "${project[@]}" -- \
    gcloud secrets create "$secret" --replication-policy=automatic "${project[@]}"
done

# Least privilege: each role on the one resource that needs it, never on the project.
note "runtime service account: its two secrets and the dead-letter topic, nothing else"
for secret in "$DATABASE_URL_SECRET_ID" "$SMTP_PASSWORD_SECRET_ID"; do
  bind gcloud secrets add-iam-policy-binding "$secret" \
    --member="serviceAccount:$RUNTIME_SA_EMAIL" \
    --role=roles/secretmanager.secretAccessor \
    "${project[@]}"
done
bind gcloud pubsub topics add-iam-policy-binding "$DEAD_LETTER_TOPIC" \
  --member="serviceAccount:$RUNTIME_SA_EMAIL" \
  --role=roles/pubsub.publisher \
  "${project[@]}"

note "done; next: deploy/set-secret.sh $DATABASE_URL_SECRET_ID (and $SMTP_PASSWORD_SECRET_ID), then deploy/deploy-function.sh"
