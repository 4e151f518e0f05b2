# Sourced: checks (and where it can, installs) what the tests and the local stack run for
# real: PostgreSQL 15 server binaries, gcloud's Pub/Sub emulator and Java.
need_pg="/usr/lib/postgresql/15/bin/initdb"
if [ ! -x "$need_pg" ]; then
  echo "installing PostgreSQL 15 server binaries (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
fi
if ! command -v gcloud >/dev/null 2>&1 || ! gcloud beta emulators pubsub --help >/dev/null 2>&1; then
  echo "gcloud with the Pub/Sub emulator (google-cloud-cli-pubsub-emulator) is required" >&2
  exit 1
fi
if ! command -v java >/dev/null 2>&1; then
  echo "installing Java 17 for the Pub/Sub emulator (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
if ! command -v openssl >/dev/null 2>&1; then
  # The SNS signature tests cross-check their signer with the openssl command line tool.
  echo "installing openssl (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  echo "installing PgBouncer for the transaction-pooling tests (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
