# shellcheck shell=bash
# deploy/config.sh: the settings and helpers every deploy script shares. Sourced, never run.
#
# Every setting below has a default that the environment overrides, for example
#   PROJECT_ID=acme-mail REGION=europe-west1 deploy/all.sh --dry-run
# Only PROJECT_ID is always required; deploy-function.sh also needs SMTP_HOST and EMAIL_FROM.
#
# Every script takes --dry-run: it then prints each gcloud command it would run, one a line,
# prefixed with "+ " and shell-quoted so it can be pasted, and runs nothing at all (lookups
# print their command and stand in a placeholder such as <trigger-subscription>).
# Without --dry-run each command is printed the same way and then run.

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$DEPLOY_DIR/.." && pwd)
SCRIPT_NAME=$(basename "$0")

# --- where and what -------------------------------------------------------------------------
: "${PROJECT_ID:=}"
: "${REGION:=us-central1}"
: "${FUNCTION_NAME:=email-worker}"
# The directory uploaded by `gcloud functions deploy`; it must hold main.py, requirements.txt
# and a .gcloudignore that keeps tests/, bench/ and .venv/ out of the upload.
: "${SOURCE_DIR:=$REPO_ROOT}"
: "${DELIVERY_TOPIC:=email-deliveries}"
: "${DEAD_LETTER_TOPIC:=email-deliveries-dead-letter}"
# Pull subscription on the dead-letter topic, read by `python -m worker replay`.
: "${DEAD_LETTER_SUBSCRIPTION:=email-deliveries-dead-letter-replay}"
: "${DEAD_LETTER_RETENTION:=7d}"  # Pub/Sub allows 10m..31d
# Service account ids (the part before @); the emails are derived below.
: "${RUNTIME_SA:=email-worker-runtime}"  # the function's identity
: "${TRIGGER_SA:=email-worker-trigger}"  # Eventarc's identity when it invokes the function
# Secret Manager secret ids, always read at `latest`.
: "${DATABASE_URL_SECRET_ID:=email-database-url}"
: "${SMTP_PASSWORD_SECRET_ID:=email-smtp-password}"
# The fallback relay's password, mounted only when FALLBACK_SMTP_USERNAME is set.
: "${FALLBACK_SMTP_PASSWORD_SECRET_ID:=email-fallback-smtp-password}"
# How the function gets them:
#   env     (default) --set-secrets: Cloud Run resolves each secret when an instance starts and
#           hands it over as the plain DATABASE_URL / SMTP_PASSWORD environment variables, so
#           the worker imports no Secret Manager client and makes no RPC (the fast cold start);
#   worker  DATABASE_URL_SECRET / SMTP_PASSWORD_SECRET name the versions and the worker reads
#           them itself at start (google-cloud-secret-manager; ~300 ms more per cold start).
: "${SECRETS_VIA:=env}"

# --- the worker's own settings (docs/reference.md); empty ones are not passed --------------
: "${SMTP_HOST:=}"
: "${SMTP_PORT:=}"
: "${SMTP_SECURITY:=}"
: "${SMTP_USERNAME:=}"  # when set, SMTP_PASSWORD_SECRET is passed too
: "${SMTP_TIMEOUT_SECONDS:=}"
# The email service behind SMTP_HOST (ses, sendgrid, mailgun, postmark, resend, none): which
# header carries the delivery id back in its webhooks (README, "Provider webhooks").
: "${SMTP_PROVIDER:=}"
# An optional second relay (docs/reliability.md): FALLBACK_SMTP_HOST enables it; a different
# provider from SMTP_HOST's, with the domain's SPF and DKIM set up for it too.
: "${FALLBACK_SMTP_HOST:=}"
: "${FALLBACK_SMTP_PORT:=}"
: "${FALLBACK_SMTP_SECURITY:=}"
: "${FALLBACK_SMTP_USERNAME:=}"  # when set, FALLBACK_SMTP_PASSWORD_SECRET is passed too
: "${FALLBACK_SMTP_PROVIDER:=}"
# The relays' shared circuit breaker; the worker's defaults (5 failures, 30 s) when empty.
: "${RELAY_TRIP_AFTER:=}"
: "${RELAY_COOLDOWN_SECONDS:=}"
: "${EMAIL_FROM:=}"
: "${EMAIL_REPLY_TO:=}"
# Send attempts, across invocations, before the worker dead-letters a delivery itself.
: "${MAX_ATTEMPTS:=5}"
# The Pub/Sub dead-letter policy on the trigger's subscription. It must be higher than
# MAX_ATTEMPTS: the worker counts its own send attempts and dead-letters itself (with a reason
# and the ledger updated) at MAX_ATTEMPTS, and every invocation makes at least one attempt, so
# it always gets there first. Pub/Sub's policy is only the backstop for events the worker can't
# even record, e.g. while the database is down: after this many deliveries Pub/Sub forwards the
# message to the same dead-letter topic (attributes CloudPubSubDeadLetter*) instead of dropping
# it when the subscription's retention runs out. Pub/Sub allows 5..100.
: "${MAX_DELIVERY_ATTEMPTS:=10}"
# Pub/Sub's backoff between redeliveries of a failed event.
: "${MIN_RETRY_DELAY:=10s}"
: "${MAX_RETRY_DELAY:=600s}"

# --- the function's resources ---------------------------------------------------------------
: "${FUNCTION_TIMEOUT:=120s}"
# Requests one instance serves at once (Cloud Run's --concurrency). A delivery spends most of
# its time waiting for the relay (50-200 ms) and ~3 ms of the instance's CPU (bench/
# concurrency, README Performance), so one vCPU sustains ~300 deliveries/s: 8 at once at
# 50 ms (160/s) use about half of it, 16 would saturate it. Cloud Run's own default for a
# function is 1 request per instance, one billed instance per 5-20 emails a second. gunicorn
# gets as many threads (THREADS), and the worker sizes its database pool and kept SMTP
# connections from it.
: "${CONCURRENCY:=8}"
# More than one request per instance needs at least one whole vCPU (Cloud Run's rule).
: "${CPU:=1}"
: "${MEMORY:=512Mi}"
: "${MAX_INSTANCES:=20}"
# Optional: a Serverless VPC Access connector (projects/P/locations/R/connectors/C or its
# name) through which all egress goes, for a static egress IP with Cloud NAT (deploy/README.md).
: "${VPC_CONNECTOR:=}"
# Optional: the service account Cloud Build runs the function's build as
# (projects/P/serviceAccounts/EMAIL, or an email), for projects without the default build
# service account's permissions.
: "${BUILD_SERVICE_ACCOUNT:=}"
# Only Google-internal traffic (Eventarc's Pub/Sub push) reaches the function; IAM still
# requires the trigger service account's token on top of that.
: "${INGRESS_SETTINGS:=internal-only}"
# How long a claim on a delivery lasts. It must exceed FUNCTION_TIMEOUT, or a slow but live
# invocation could be overtaken by a redelivery and the email sent twice.
: "${LEASE_SECONDS:=300}"
# The trigger subscription's ack deadline: Pub/Sub redelivers a push not answered within it,
# so it must be at least FUNCTION_TIMEOUT (600 is Pub/Sub's maximum).
: "${ACK_DEADLINE:=600}"

DRY_RUN=0
POSITIONAL=()
shopt -s inherit_errexit

# Command lines are printed on file descriptor 3, a copy of the original stdout, so that a
# lookup run inside $(...) still prints where the operator sees it.
exec 3>&1

# --- errors -----------------------------------------------------------------------------------

# A missing or malformed setting: one line on stderr, exit 2.
die_config() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$1" >&2
  exit 2
}

# A bad command line: the reason and the usage on stderr, exit 2.
die_usage() {
  printf '%s: %s\n%s\n' "$SCRIPT_NAME" "$1" "$USAGE" >&2
  exit 2
}

# --- the command line -------------------------------------------------------------------------

# parse_args "$@": --dry-run, --help, and positional arguments into POSITIONAL.
# The calling script sets USAGE first.
parse_args() {
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        printf '%s\n' "$USAGE"
        exit 0
        ;;
      --)
        shift
        POSITIONAL+=("$@")
        break
        ;;
      -*) die_usage "unknown option: $1" ;;
      *) POSITIONAL+=("$1") ;;
    esac
    shift
  done
  if ((!DRY_RUN)); then
    # Never wait for an answer on a terminal nobody watches.
    export CLOUDSDK_CORE_DISABLE_PROMPTS=1
  fi
}

# --- checking settings ------------------------------------------------------------------------

require() {
  local name
  for name in "$@"; do
    [[ -n ${!name} ]] || die_config "$name is required but not set"
  done
}

# matches NAME REGEX RULE: the setting NAME must match REGEX, else "NAME must be RULE".
matches() {
  [[ ${!1} =~ $2 ]] || die_config "$1 must be $3, got '${!1}'"
}

# int_in NAME LOW HIGH
int_in() {
  local value=${!1}
  if ! [[ $value =~ ^[0-9]{1,9}$ ]] || ((10#$value < $2 || 10#$value > $3)); then
    die_config "$1 must be an integer $2..$3, got '$value'"
  fi
}

# seconds_of NAME: the duration in NAME (120, 120s, 2m, 1h) in seconds, on stdout.
seconds_of() {
  local value=${!1}
  [[ $value =~ ^([0-9]{1,6})([smh]?)$ ]] || die_config "$1 must be a duration like 120s or 2m, got '$value'"
  local number=$((10#${BASH_REMATCH[1]}))
  case ${BASH_REMATCH[2]} in
    m) number=$((number * 60)) ;;
    h) number=$((number * 3600)) ;;
    *) ;;
  esac
  printf '%s\n' "$number"
}

readonly ID_RE='^[a-z][a-z0-9-]{4,28}[a-z0-9]$'
readonly TOPIC_RE='^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$'
readonly SECRET_RE='^[A-Za-z0-9_-]{1,255}$'

# load_config: check the settings every script needs and derive the names built from them.
load_config() {
  require PROJECT_ID
  matches PROJECT_ID "$ID_RE" "a project id (6-30 lowercase letters, digits, hyphens)"
  matches REGION '^[a-z]+-[a-z]+[0-9]+$' "a region like us-central1"
  matches FUNCTION_NAME '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$' "a function name (lowercase letters, digits, hyphens)"
  local name
  for name in DELIVERY_TOPIC DEAD_LETTER_TOPIC DEAD_LETTER_SUBSCRIPTION; do
    matches "$name" "$TOPIC_RE" "a Pub/Sub id (not a full projects/... name)"
  done
  [[ $DELIVERY_TOPIC != "$DEAD_LETTER_TOPIC" ]] || die_config "DEAD_LETTER_TOPIC must differ from DELIVERY_TOPIC"
  for name in RUNTIME_SA TRIGGER_SA; do
    matches "$name" "$ID_RE" "a service account id (6-30 lowercase letters, digits, hyphens)"
  done
  [[ $RUNTIME_SA != "$TRIGGER_SA" ]] || die_config "TRIGGER_SA must differ from RUNTIME_SA"
  for name in DATABASE_URL_SECRET_ID SMTP_PASSWORD_SECRET_ID FALLBACK_SMTP_PASSWORD_SECRET_ID; do
    matches "$name" "$SECRET_RE" "a secret id (letters, digits, _ and -)"
  done
  int_in MAX_ATTEMPTS 1 100
  int_in MAX_DELIVERY_ATTEMPTS 5 100
  if ((10#$MAX_DELIVERY_ATTEMPTS <= 10#$MAX_ATTEMPTS)); then
    die_config "MAX_DELIVERY_ATTEMPTS ($MAX_DELIVERY_ATTEMPTS) must be higher than MAX_ATTEMPTS ($MAX_ATTEMPTS)"
  fi
  int_in MAX_INSTANCES 1 1000
  int_in CONCURRENCY 1 1000
  matches CPU '^([0-9]{1,2}|0?\.[0-9]{1,3}|[0-9]{1,2}\.[0-9]{1,3})$' "a number of vCPUs like 1, 2 or 0.583"
  if ((10#$CONCURRENCY > 1)) && ! awk -v cpu="$CPU" 'BEGIN { exit !(cpu >= 1) }'; then
    die_config "CONCURRENCY ($CONCURRENCY) above 1 needs CPU of at least 1, got '$CPU'"
  fi
  matches MEMORY '^[0-9]{1,6}(Mi|Gi)$' "a size like 512Mi or 1Gi"
  matches SECRETS_VIA '^(env|worker)$' "env or worker"
  [[ -z $VPC_CONNECTOR ]] || matches VPC_CONNECTOR '^(projects/[^/]+/locations/[^/]+/connectors/)?[a-z][a-z0-9-]{0,23}$' "a connector name"
  [[ -z $BUILD_SERVICE_ACCOUNT ]] || matches BUILD_SERVICE_ACCOUNT '^(projects/[^/]+/serviceAccounts/)?[^/@[:space:]]+@[^/[:space:]]+$' "a service account email or projects/P/serviceAccounts/EMAIL"
  int_in LEASE_SECONDS 5 86400
  int_in ACK_DEADLINE 10 600
  local timeout
  timeout=$(seconds_of FUNCTION_TIMEOUT)
  ((timeout >= 1 && timeout <= 540)) || die_config "FUNCTION_TIMEOUT must be 1s..540s for an event-driven function, got '$FUNCTION_TIMEOUT'"
  if ((10#$LEASE_SECONDS <= timeout)); then
    die_config "LEASE_SECONDS ($LEASE_SECONDS) must exceed FUNCTION_TIMEOUT ($FUNCTION_TIMEOUT)"
  fi
  if ((10#$ACK_DEADLINE < timeout)); then
    die_config "ACK_DEADLINE ($ACK_DEADLINE) must be at least FUNCTION_TIMEOUT ($FUNCTION_TIMEOUT)"
  fi
  seconds_of MIN_RETRY_DELAY >/dev/null
  seconds_of MAX_RETRY_DELAY >/dev/null
  matches DEAD_LETTER_RETENTION '^[0-9]+[smhd]$' "a duration like 7d"
  matches INGRESS_SETTINGS '^(all|internal-only|internal-and-gclb)$' "all, internal-only or internal-and-gclb"

  RUNTIME_SA_EMAIL="$RUNTIME_SA@$PROJECT_ID.iam.gserviceaccount.com"
  TRIGGER_SA_EMAIL="$TRIGGER_SA@$PROJECT_ID.iam.gserviceaccount.com"
  DATABASE_URL_SECRET="projects/$PROJECT_ID/secrets/$DATABASE_URL_SECRET_ID/versions/latest"
  SMTP_PASSWORD_SECRET="projects/$PROJECT_ID/secrets/$SMTP_PASSWORD_SECRET_ID/versions/latest"
  export RUNTIME_SA_EMAIL TRIGGER_SA_EMAIL DATABASE_URL_SECRET SMTP_PASSWORD_SECRET
}

# SOURCE_DIR (made absolute) must hold what every function deploys from.
check_source_dir() {
  [[ -d $SOURCE_DIR ]] || die_config "SOURCE_DIR is not a directory: $SOURCE_DIR"
  SOURCE_DIR=$(cd "$SOURCE_DIR" && pwd)
  local file
  for file in main.py requirements.txt .gcloudignore; do
    [[ -f $SOURCE_DIR/$file ]] || die_config "$file is missing from $SOURCE_DIR (the function's source; .gcloudignore keeps tests/, bench/ and .venv/ out of the upload)"
  done
}

# load_function_config: what deploy-function.sh needs on top of load_config; all.sh checks it
# too, before it changes anything.
load_function_config() {
  load_config
  require SMTP_HOST EMAIL_FROM
  [[ -z $SMTP_PORT ]] || int_in SMTP_PORT 1 65535
  [[ -z $SMTP_SECURITY ]] || matches SMTP_SECURITY '^(starttls|ssl|none)$' "starttls, ssl or none"
  [[ -z $SMTP_PROVIDER ]] || matches SMTP_PROVIDER '^(ses|sendgrid|mailgun|postmark|resend|none)$' "ses, sendgrid, mailgun, postmark, resend or none"
  [[ -z $FALLBACK_SMTP_PORT ]] || int_in FALLBACK_SMTP_PORT 1 65535
  [[ -z $FALLBACK_SMTP_SECURITY ]] || matches FALLBACK_SMTP_SECURITY '^(starttls|ssl|none)$' "starttls, ssl or none"
  [[ -z $FALLBACK_SMTP_PROVIDER ]] || matches FALLBACK_SMTP_PROVIDER '^(ses|sendgrid|mailgun|postmark|resend|none)$' "ses, sendgrid, mailgun, postmark, resend or none"
  [[ -z $RELAY_TRIP_AFTER ]] || int_in RELAY_TRIP_AFTER 1 1000
  [[ -z $RELAY_COOLDOWN_SECONDS ]] || int_in RELAY_COOLDOWN_SECONDS 1 86400
  local name
  for name in EMAIL_FROM EMAIL_REPLY_TO; do
    [[ -z ${!name} ]] || matches "$name" '^[^[:cntrl:]]*@[^[:cntrl:]]*$' "an email address"
  done
  check_source_dir
}

# --- running gcloud ---------------------------------------------------------------------------

# show CMD...: print the command line, shell-quoted, prefixed with "+ ".
show() {
  local line
  printf -v line '%q ' "$@"
  printf '+ %s\n' "${line% }" >&3
}

# note TEXT: a comment line in the output (never a command).
note() {
  printf '# %s\n' "$*" >&3
}

# run CMD...: print, then run unless --dry-run.
run() {
  show "$@"
  ((DRY_RUN)) || "$@"
}

# capture PLACEHOLDER CMD...: print a lookup and echo its output; with --dry-run echo
# PLACEHOLDER instead of running it. An empty answer is an error.
capture() {
  local placeholder=$1 output
  shift
  show "$@"
  if ((DRY_RUN)); then
    printf '%s\n' "$placeholder"
    return 0
  fi
  output=$("$@") || return 1
  if [[ -z $output ]]; then
    printf '%s: lookup returned nothing: %s\n' "$SCRIPT_NAME" "$*" >&2
    return 1
  fi
  printf '%s\n' "$output"
}

# ensure WHAT DESCRIBE... -- CREATE...: create a resource unless DESCRIBE finds it; WHAT names
# it in the output. With --dry-run only the create command is printed (nothing is looked up).
ensure() {
  local what=$1 describe=()
  shift
  while [[ $1 != -- ]]; do
    describe+=("$1")
    shift
  done
  shift
  if ((!DRY_RUN)) && "${describe[@]}" >/dev/null 2>&1; then
    note "exists, left as it is: $what"
    return 0
  fi
  run "$@"
}

# bind CMD...: an add-iam-policy-binding. IAM is eventually consistent (a service account
# created a moment ago may not be found yet), so a failure is retried a few times.
bind() {
  show "$@"
  ((DRY_RUN)) && return 0
  local try
  for try in 1 2 3 4 5; do
    # The command prints the whole policy; only errors are worth showing.
    if "$@" >/dev/null; then
      return 0
    fi
    ((try < 5)) || break
    printf '%s: binding failed, retrying in %ss\n' "$SCRIPT_NAME" $((try * 5)) >&2
    sleep $((try * 5))
  done
  printf '%s: giving up: %s\n' "$SCRIPT_NAME" "$*" >&2
  return 1
}

# --- the support console (deploy-console.sh) --------------------------------------------------
# A second function, HTTP, read-only, never public: only the IAM members in CONSOLE_INVOKERS
# may invoke it (support opens it through `gcloud run services proxy`).
: "${CONSOLE_FUNCTION_NAME:=email-console}"
: "${CONSOLE_SA:=email-console-runtime}"  # its identity: reads its own secrets, nothing else
# Holds the libpq URI of a LOGIN role granted email_reader and nothing more, never the worker's.
: "${CONSOLE_DATABASE_URL_SECRET_ID:=email-console-database-url}"
# Holds the key that signs the console's page cursors (CONSOLE_CURSOR_KEY): at least 32 random
# bytes, e.g. `openssl rand -base64 48 | deploy/set-secret.sh email-console-cursor-key`.
: "${CONSOLE_CURSOR_KEY_SECRET_ID:=email-console-cursor-key}"
# Comma-separated IAM members given roles/run.invoker on the console, e.g.
# group:support@acme.example. Required by deploy-console.sh; all.sh deploys the console only
# when it is set.
: "${CONSOLE_INVOKERS:=}"
: "${CONSOLE_MAX_INSTANCES:=3}"
: "${CONSOLE_MEMORY:=256Mi}"
: "${CONSOLE_TIMEOUT:=60s}"
# `all`: IAM, not the network, keeps it private, and `gcloud run services proxy` reaches it.
: "${CONSOLE_INGRESS_SETTINGS:=all}"

# load_console_config: what deploy-console.sh needs on top of load_config.
load_console_config() {
  load_config
  require CONSOLE_INVOKERS
  matches CONSOLE_FUNCTION_NAME '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$' "a function name (lowercase letters, digits, hyphens)"
  [[ $CONSOLE_FUNCTION_NAME != "$FUNCTION_NAME" ]] || die_config "CONSOLE_FUNCTION_NAME must differ from FUNCTION_NAME"
  matches CONSOLE_SA "$ID_RE" "a service account id (6-30 lowercase letters, digits, hyphens)"
  [[ $CONSOLE_SA != "$RUNTIME_SA" && $CONSOLE_SA != "$TRIGGER_SA" ]] || die_config "CONSOLE_SA must differ from RUNTIME_SA and TRIGGER_SA"
  matches CONSOLE_DATABASE_URL_SECRET_ID "$SECRET_RE" "a secret id (letters, digits, _ and -)"
  [[ $CONSOLE_DATABASE_URL_SECRET_ID != "$DATABASE_URL_SECRET_ID" ]] || die_config "CONSOLE_DATABASE_URL_SECRET_ID must differ from DATABASE_URL_SECRET_ID (the console logs in as an email_reader, never as the worker)"
  matches CONSOLE_CURSOR_KEY_SECRET_ID "$SECRET_RE" "a secret id (letters, digits, _ and -)"
  local other
  for other in DATABASE_URL_SECRET_ID SMTP_PASSWORD_SECRET_ID CONSOLE_DATABASE_URL_SECRET_ID; do
    [[ $CONSOLE_CURSOR_KEY_SECRET_ID != "${!other}" ]] || die_config "CONSOLE_CURSOR_KEY_SECRET_ID must differ from $other (the cursor key is a secret of its own)"
  done
  local member
  IFS=, read -r -a CONSOLE_INVOKER_LIST <<<"$CONSOLE_INVOKERS"
  ((${#CONSOLE_INVOKER_LIST[@]} > 0)) || die_config "CONSOLE_INVOKERS must name at least one IAM member"
  for member in "${CONSOLE_INVOKER_LIST[@]}"; do
    [[ $member =~ ^(group|user|serviceAccount|domain):[^[:space:],]+$ ]] || die_config "CONSOLE_INVOKERS must be IAM members like group:support@example.com (never allUsers), got '$member'"
  done
  int_in CONSOLE_MAX_INSTANCES 1 100
  local timeout
  timeout=$(seconds_of CONSOLE_TIMEOUT)
  ((timeout >= 1 && timeout <= 3600)) || die_config "CONSOLE_TIMEOUT must be 1s..3600s, got '$CONSOLE_TIMEOUT'"
  matches CONSOLE_INGRESS_SETTINGS '^(all|internal-only|internal-and-gclb)$' "all, internal-only or internal-and-gclb"
  check_source_dir
  CONSOLE_SA_EMAIL="$CONSOLE_SA@$PROJECT_ID.iam.gserviceaccount.com"
}

# The secrets a function reads, in the deployed shape (SECRETS_VIA). Takes the arrays
# `secret_vars` (environment names) and `secret_ids` (Secret Manager ids), same order, and
# fills `secret_flags`, adding to `env_vars` on the worker path:
#   env     one --set-secrets NAME=ID:latest,... (it replaces every secret the function had, so
#           a dropped one goes away too);
#   worker  NAME_SECRET=projects/P/secrets/ID/versions/latest in the environment, and
#           --clear-secrets (a secret left mounted by an earlier deploy would set NAME beside
#           NAME_SECRET, which the functions refuse).
mount_secrets() {
  secret_flags=()
  local i mounted=()
  if [[ $SECRETS_VIA == env ]]; then
    for i in "${!secret_ids[@]}"; do
      mounted+=("${secret_vars[$i]}=${secret_ids[$i]}:latest")
    done
    secret_flags+=("--set-secrets=$(IFS=,; printf '%s' "${mounted[*]}")")
  else
    for i in "${!secret_ids[@]}"; do
      env_vars+=("${secret_vars[$i]}_SECRET=projects/$PROJECT_ID/secrets/${secret_ids[$i]}/versions/latest")
    done
    secret_flags+=(--clear-secrets)
  fi
}

# Every instance reads `latest` when it starts: without an enabled version it would stop
# there (--set-secrets) or at its first read (SECRETS_VIA=worker), so stop the deploy instead.
preflight_secrets() {
  local secret state
  note "preflight: the secrets the function reads have an enabled latest version"
  for secret in "$@"; do
    state=$(capture ENABLED gcloud secrets versions describe latest --secret="$secret" \
      "${project[@]}" --format='value(state)') || state=MISSING
    if [[ $state != ENABLED ]]; then
      die_config "secret $secret has no enabled latest version ($state): add one with deploy/set-secret.sh $secret"
    fi
  done
}

# `env_vars` as one --set-env-vars value in `joined`: gcloud splits on commas, so when a value
# holds one (SNS_TOPIC_ARNS, EMAIL_FROM's display name) switch to gcloud's ^DELIM^ syntax.
join_env_vars() {
  local candidate delimiter=
  joined=$(IFS=,; printf '%s' "${env_vars[*]}")
  [[ ${env_vars[*]} == *,* ]] || return 0
  for candidate in '|' ';' '#' '~' '!'; do
    if [[ ${env_vars[*]} != *"$candidate"* ]]; then
      delimiter=$candidate
      break
    fi
  done
  [[ -n $delimiter ]] || die_config "the settings hold every delimiter gcloud could split on (, | ; # ~ !)"
  joined="^$delimiter^$(IFS=$delimiter; printf '%s' "${env_vars[*]}")"
}
