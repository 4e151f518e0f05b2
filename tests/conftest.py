"""Shared fixtures live in tests/harness/, one module per real component."""

pytest_plugins = [
    "tests.harness.postgres",
    "tests.harness.smtp",
    "tests.harness.pubsub",
    "tests.harness.secretmanager",
    "tests.harness.worker",
    "tests.harness.console",
    "tests.harness.browser",
    "tests.harness.pgbouncer",
    "tests.harness.webhook",
    "tests.harness.https",
]
