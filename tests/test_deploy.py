"""deploy/: every script run with --dry-run, its gcloud commands checked one by one.

Nothing here reaches Google Cloud: the scripts run with a PATH whose first entry holds a fake
`gcloud` that only leaves a marker file behind, and every test asserts the marker was never
written, so a command that escaped --dry-run would fail the test rather than call anything.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SCRIPTS = [
    "setup-project.sh",
    "deploy-function.sh",
    "deploy-webhook.sh",
    "set-secret.sh",
    "all.sh",
    "deploy-console.sh",
]

PROJECT = "acme-mail"
RUNTIME_SA = f"email-worker-runtime@{PROJECT}.iam.gserviceaccount.com"
TRIGGER_SA = f"email-worker-trigger@{PROJECT}.iam.gserviceaccount.com"
CONSOLE_SA = f"email-console-runtime@{PROJECT}.iam.gserviceaccount.com"
SUPPORT = "group:support@acme.example"
PUBSUB_AGENT = "serviceAccount:service-<project-number>@gcp-sa-pubsub.iam.gserviceaccount.com"
APIS = [
    "cloudfunctions.googleapis.com",
    "run.googleapis.com",
    "eventarc.googleapis.com",
    "pubsub.googleapis.com",
    "secretmanager.googleapis.com",
    "cloudbuild.googleapis.com",
    "artifactregistry.googleapis.com",
    "logging.googleapis.com",
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def commands(self) -> list[list[str]]:
        """The printed commands, each shell-split back into its argv."""
        commands = []
        for line in self.stdout.splitlines():
            assert line.startswith(("+ ", "# ")), f"neither a command nor a note: {line!r}"
            if line.startswith("+ "):
                commands.append(shlex.split(line[2:]))
        return commands

    def find(self, *prefix: str) -> list[list[str]]:
        return [argv for argv in self.commands if argv[: len(prefix)] == list(prefix)]

    def one(self, *prefix: str) -> list[str]:
        found = self.find(*prefix)
        assert len(found) == 1, f"expected one {' '.join(prefix)!r}, got {found}"
        return found[0]


def flag(argv: list[str], name: str) -> str:
    """The value of `--name=value` in argv (exactly once)."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name}= appears {len(values)} times in {argv}"
    return values[0]


def env_vars(argv: list[str]) -> dict[str, str]:
    """--set-env-vars, honouring gcloud's `^DELIM^` alternate-delimiter syntax."""
    value = flag(argv, "set-env-vars")
    delimiter = ","
    if value.startswith("^"):
        delimiter, value = value[1:].split("^", 1)
    pairs = [item.split("=", 1) for item in value.split(delimiter)]
    assert all(len(pair) == 2 for pair in pairs), value
    return {key: val for key, val in pairs}


def project_level_bindings(result: Result) -> list[list[str]]:
    """Bindings on the whole project: least privilege means none."""
    return [
        argv
        for argv in result.commands
        if "add-iam-policy-binding" in argv[:4]
        and argv[1] in ("projects", "organizations", "resource-manager")
    ]


class Deploy:
    """Runs deploy/ scripts in a clean environment with a booby-trapped gcloud."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        self.marker = tmp_path / "gcloud-was-called"
        fake = bin_dir / "gcloud"
        fake.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(self.marker))}\nexit 1\n')
        fake.chmod(0o755)
        self.source = tmp_path / "source"
        self.source.mkdir()
        for name in ("main.py", "requirements.txt", ".gcloudignore"):
            (self.source / name).write_text("")
        self.base_env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "LC_ALL": "C.UTF-8",
            "PROJECT_ID": PROJECT,
            "SMTP_HOST": "smtp.example.com",
            "EMAIL_FROM": "no-reply@acme.example",
            "SOURCE_DIR": str(self.source),
            "CONSOLE_INVOKERS": SUPPORT,
        }

    def run(
        self,
        script: str,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        stdin: str = "",
    ) -> Result:
        full_env = dict(self.base_env)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        completed = subprocess.run(
            ["bash", str(DEPLOY / script), *args],
            env=full_env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert not self.marker.exists(), f"gcloud was run: {self.marker.read_text()}"
        return Result(completed.returncode, completed.stdout, completed.stderr)

    def dry(
        self,
        script: str,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        stdin: str = "",
    ) -> Result:
        result = self.run(script, "--dry-run", *args, env=env, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return result


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Deploy]:
    runner = Deploy(tmp_path)
    yield runner
    assert not runner.marker.exists()


# --- the scripts themselves --------------------------------------------------------------------


@pytest.mark.parametrize("script", [*SCRIPTS, "config.sh"])
def test_script_is_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)
    text = (DEPLOY / script).read_text()
    if script != "config.sh":
        assert "set -euo pipefail" in text
        assert os.access(DEPLOY / script, os.X_OK)


def test_the_booby_trap_works(deploy: Deploy) -> None:
    """The fake gcloud is what the scripts would find, so an escaped call would be caught."""
    found = subprocess.run(
        ["bash", "-c", "command -v gcloud"],
        env=deploy.base_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == str(deploy.tmp / "bin" / "gcloud")


def test_every_command_is_one_quoted_gcloud_line_with_the_project(deploy: Deploy) -> None:
    result = deploy.dry("all.sh", env={"EMAIL_FROM": "Acme Mail <no-reply@acme.example>"})
    commands = result.commands
    assert len(commands) > 15
    for argv in commands:
        assert argv[0] == "gcloud"
        if argv[1:3] != ["projects", "describe"]:
            assert flag(argv, "project") == PROJECT, argv


# --- setup-project.sh --------------------------------------------------------------------------


def test_setup_enables_the_apis(deploy: Deploy) -> None:
    argv = deploy.dry("setup-project.sh").one("gcloud", "services", "enable")
    assert set(APIS) <= set(argv[3:])


def test_setup_creates_topics_and_the_replay_subscription(deploy: Deploy) -> None:
    result = deploy.dry("setup-project.sh")
    topics = [argv[4] for argv in result.find("gcloud", "pubsub", "topics", "create")]
    assert topics == ["email-deliveries", "email-deliveries-dead-letter"]

    sub = result.one("gcloud", "pubsub", "subscriptions", "create")
    assert sub[4] == "email-deliveries-dead-letter-replay"
    assert flag(sub, "topic") == "email-deliveries-dead-letter"
    assert flag(sub, "expiration-period") == "never"
    assert flag(sub, "message-retention-duration") == "7d"
    # The subscription exists before anything could be published to the dead-letter topic.
    dead_letter_topic = result.find("gcloud", "pubsub", "topics", "create")[1]
    assert result.commands.index(sub) > result.commands.index(dead_letter_topic)


def test_setup_creates_service_accounts_and_secrets(deploy: Deploy) -> None:
    result = deploy.dry("setup-project.sh")
    accounts = [argv[4] for argv in result.find("gcloud", "iam", "service-accounts", "create")]
    assert accounts == ["email-worker-runtime", "email-worker-trigger"]
    secrets = result.find("gcloud", "secrets", "create")
    assert [argv[3] for argv in secrets] == ["email-database-url", "email-smtp-password"]
    for argv in secrets:
        assert flag(argv, "replication-policy") == "automatic"
        assert not any(arg.startswith("--data-file") for arg in argv)


def test_setup_grants_least_privilege_on_resources_only(deploy: Deploy) -> None:
    result = deploy.dry("setup-project.sh")
    assert not project_level_bindings(result)

    secret_bindings = result.find("gcloud", "secrets", "add-iam-policy-binding")
    secrets = sorted(argv[3] for argv in secret_bindings)
    assert secrets == ["email-database-url", "email-smtp-password"]
    for argv in secret_bindings:
        assert flag(argv, "member") == f"serviceAccount:{RUNTIME_SA}"
        assert flag(argv, "role") == "roles/secretmanager.secretAccessor"

    topic_binding = result.one("gcloud", "pubsub", "topics", "add-iam-policy-binding")
    assert topic_binding[4] == "email-deliveries-dead-letter"
    assert flag(topic_binding, "member") == f"serviceAccount:{RUNTIME_SA}"
    assert flag(topic_binding, "role") == "roles/pubsub.publisher"

    # Secrets and topics exist before they are bound.
    commands = result.commands
    last_create = max(i for i, argv in enumerate(commands) if "create" in argv[:5])
    first_binding = min(i for i, argv in enumerate(commands) if "add-iam-policy-binding" in argv)
    assert last_create < first_binding


def test_setup_honours_overrides(deploy: Deploy) -> None:
    result = deploy.dry(
        "setup-project.sh",
        env={
            "DELIVERY_TOPIC": "mail-in",
            "DEAD_LETTER_TOPIC": "mail-dead",
            "DEAD_LETTER_SUBSCRIPTION": "mail-dead-replay",
            "DATABASE_URL_SECRET_ID": "db-url",
            "RUNTIME_SA": "mail-runtime",
        },
    )
    assert [a[4] for a in result.find("gcloud", "pubsub", "topics", "create")] == [
        "mail-in",
        "mail-dead",
    ]
    sub = result.one("gcloud", "pubsub", "subscriptions", "create")
    assert (sub[4], flag(sub, "topic")) == ("mail-dead-replay", "mail-dead")
    binding = result.find("gcloud", "secrets", "add-iam-policy-binding")[0]
    assert binding[3] == "db-url"
    member = f"serviceAccount:mail-runtime@{PROJECT}.iam.gserviceaccount.com"
    assert flag(binding, "member") == member


# --- deploy-function.sh ------------------------------------------------------------------------


def test_deploy_function_flags(deploy: Deploy) -> None:
    argv = deploy.dry("deploy-function.sh").one("gcloud", "functions", "deploy")
    assert argv[3] == "email-worker"
    assert "--gen2" in argv
    assert "--retry" in argv
    assert flag(argv, "runtime") == "python312"
    assert flag(argv, "region") == "us-central1"
    assert flag(argv, "source") == str(deploy.source)
    assert flag(argv, "entry-point") == "handle_delivery"
    assert flag(argv, "trigger-topic") == "email-deliveries"
    assert flag(argv, "service-account") == RUNTIME_SA
    assert flag(argv, "trigger-service-account") == TRIGGER_SA
    assert flag(argv, "timeout") == "120s"
    # Several requests per instance, on a whole vCPU (Cloud Run's rule for concurrency > 1).
    assert flag(argv, "concurrency") == "8"
    assert flag(argv, "cpu") == "1"
    assert flag(argv, "memory") == "512Mi"
    assert flag(argv, "max-instances") == "20"
    # Cloud Run resolves the secrets at instance start; the worker reads plain variables.
    assert flag(argv, "set-secrets") == "DATABASE_URL=email-database-url:latest"
    assert "--clear-secrets" not in argv
    assert not any(a.startswith(("--vpc-connector", "--build-service-account")) for a in argv)


def test_deploy_function_environment(deploy: Deploy) -> None:
    argv = deploy.dry("deploy-function.sh").one("gcloud", "functions", "deploy")
    assert env_vars(argv) == {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "DELIVERY_TOPIC": "email-deliveries",
        "DEAD_LETTER_TOPIC": "email-deliveries-dead-letter",
        "MAX_ATTEMPTS": "5",
        "LEASE_SECONDS": "300",
        "CONCURRENCY": "8",
        "THREADS": "8",  # gunicorn serves as many requests at once as Cloud Run sends
        "LOG_EXECUTION_ID": "true",
        "SMTP_HOST": "smtp.example.com",
        "EMAIL_FROM": "no-reply@acme.example",
    }


def test_deploy_function_passes_optional_smtp_settings_and_password_secret(
    deploy: Deploy,
) -> None:
    settings = {
        "SMTP_PORT": "465",
        "SMTP_SECURITY": "ssl",
        "SMTP_PROVIDER": "postmark",
        "SMTP_USERNAME": "apikey",
        "EMAIL_REPLY_TO": "support@acme.example",
        "MAX_ATTEMPTS": "7",
    }
    argv = deploy.dry("deploy-function.sh", env=settings).one("gcloud", "functions", "deploy")
    env = env_vars(argv)
    for key, value in settings.items():
        assert env[key] == value
    assert flag(argv, "set-secrets") == (
        "DATABASE_URL=email-database-url:latest,SMTP_PASSWORD=email-smtp-password:latest"
    )
    assert not any(key.endswith("_SECRET") or key == "SMTP_PASSWORD" for key in env)


def test_deploy_function_passes_the_fallback_relay_and_its_password(deploy: Deploy) -> None:
    settings = {
        "FALLBACK_SMTP_HOST": "smtp.backup.example",
        "FALLBACK_SMTP_PORT": "2525",
        "FALLBACK_SMTP_SECURITY": "starttls",
        "FALLBACK_SMTP_USERNAME": "backup",
        "FALLBACK_SMTP_PROVIDER": "mailgun",
        "RELAY_TRIP_AFTER": "3",
        "RELAY_COOLDOWN_SECONDS": "60",
    }
    result = deploy.dry("deploy-function.sh", env={"SMTP_USERNAME": "apikey", **settings})
    argv = result.one("gcloud", "functions", "deploy")
    env = env_vars(argv)
    for key, value in settings.items():
        assert env[key] == value
    assert flag(argv, "set-secrets") == (
        "DATABASE_URL=email-database-url:latest,SMTP_PASSWORD=email-smtp-password:latest,"
        "FALLBACK_SMTP_PASSWORD=email-fallback-smtp-password:latest"
    )
    checked = [a[5] for a in result.find("gcloud", "secrets", "versions", "describe")]
    assert "--secret=email-fallback-smtp-password" in checked
    assert "FALLBACK_SMTP_PASSWORD" not in env

    worker = deploy.dry("deploy-function.sh", env={"SECRETS_VIA": "worker", **settings}).one(
        "gcloud", "functions", "deploy"
    )
    assert env_vars(worker)["FALLBACK_SMTP_PASSWORD_SECRET"] == (
        f"projects/{PROJECT}/secrets/email-fallback-smtp-password/versions/latest"
    )


def test_deploy_function_without_a_fallback_passes_none_of_its_settings(deploy: Deploy) -> None:
    argv = deploy.dry("deploy-function.sh").one("gcloud", "functions", "deploy")
    assert not any(key.startswith(("FALLBACK_", "RELAY_")) for key in env_vars(argv))
    assert "fallback" not in flag(argv, "set-secrets")


def test_deploy_function_can_leave_the_secrets_to_the_worker(deploy: Deploy) -> None:
    """SECRETS_VIA=worker: the slower path, for deployments that want the *_SECRET names."""
    argv = deploy.dry(
        "deploy-function.sh", env={"SECRETS_VIA": "worker", "SMTP_USERNAME": "apikey"}
    ).one("gcloud", "functions", "deploy")
    env = env_vars(argv)
    assert env["DATABASE_URL_SECRET"] == (
        f"projects/{PROJECT}/secrets/email-database-url/versions/latest"
    )
    assert env["SMTP_PASSWORD_SECRET"] == (
        f"projects/{PROJECT}/secrets/email-smtp-password/versions/latest"
    )
    # Secrets an earlier deploy mounted would set DATABASE_URL beside DATABASE_URL_SECRET.
    assert "--clear-secrets" in argv
    assert not any(arg.startswith("--set-secrets") for arg in argv)


def test_deploy_function_preflights_exactly_the_secrets_it_mounts(deploy: Deploy) -> None:
    result = deploy.dry("deploy-function.sh", env={"SMTP_USERNAME": "apikey"})
    checked = [argv[5] for argv in result.find("gcloud", "secrets", "versions", "describe")]
    assert checked == ["--secret=email-database-url", "--secret=email-smtp-password"]
    mounted = flag(result.one("gcloud", "functions", "deploy"), "set-secrets")
    assert [item.split("=")[1].split(":")[0] for item in mounted.split(",")] == [
        "email-database-url",
        "email-smtp-password",
    ]


def test_deploy_function_sizes_concurrency_cpu_and_threads_together(deploy: Deploy) -> None:
    argv = deploy.dry(
        "deploy-function.sh", env={"CONCURRENCY": "16", "CPU": "2", "MEMORY": "1Gi"}
    ).one("gcloud", "functions", "deploy")
    assert (flag(argv, "concurrency"), flag(argv, "cpu"), flag(argv, "memory")) == (
        "16",
        "2",
        "1Gi",
    )
    assert (env_vars(argv)["CONCURRENCY"], env_vars(argv)["THREADS"]) == ("16", "16")


def test_deploy_function_static_egress_and_build_account(deploy: Deploy) -> None:
    argv = deploy.dry(
        "deploy-function.sh",
        env={
            "VPC_CONNECTOR": "email-egress",
            "BUILD_SERVICE_ACCOUNT": f"builder@{PROJECT}.iam.gserviceaccount.com",
        },
    ).one("gcloud", "functions", "deploy")
    assert flag(argv, "vpc-connector") == "email-egress"
    assert flag(argv, "egress-settings") == "all"
    assert flag(argv, "build-service-account") == (
        f"projects/{PROJECT}/serviceAccounts/builder@{PROJECT}.iam.gserviceaccount.com"
    )


def test_deploy_function_survives_a_comma_in_a_value(deploy: Deploy) -> None:
    sender = "Acme, Inc. <no-reply@acme.example>"
    argv = deploy.dry("deploy-function.sh", env={"EMAIL_FROM": sender}).one(
        "gcloud", "functions", "deploy"
    )
    assert flag(argv, "set-env-vars").startswith("^")
    assert env_vars(argv)["EMAIL_FROM"] == sender
    assert env_vars(argv)["DEAD_LETTER_TOPIC"] == "email-deliveries-dead-letter"


def test_deploy_function_sets_the_dead_letter_policy(deploy: Deploy) -> None:
    result = deploy.dry("deploy-function.sh")
    # The lookups are printed, and their answers stand in as placeholders.
    number = result.one("gcloud", "projects", "describe")
    assert number[3] == PROJECT
    assert flag(number, "format") == "value(projectNumber)"
    trigger = result.one("gcloud", "functions", "describe")
    assert flag(trigger, "format") == "value(eventTrigger.trigger)"
    sub = result.one("gcloud", "eventarc", "triggers", "describe")
    assert sub[4] == "<trigger>"
    assert flag(sub, "format") == "value(transport.pubsub.subscription)"

    update = result.one("gcloud", "pubsub", "subscriptions", "update")
    assert update[4] == "<trigger-subscription>"
    assert flag(update, "dead-letter-topic") == "email-deliveries-dead-letter"
    assert flag(update, "max-delivery-attempts") == "10"
    assert flag(update, "min-retry-delay") == "10s"
    assert flag(update, "max-retry-delay") == "600s"

    commands = result.commands
    deployed = commands.index(result.one("gcloud", "functions", "deploy"))
    assert deployed < commands.index(trigger) < commands.index(sub) < commands.index(update)


def test_deploy_function_grants_the_pubsub_agent_and_trigger_on_resources(
    deploy: Deploy,
) -> None:
    result = deploy.dry("deploy-function.sh")
    assert not project_level_bindings(result)

    topic = result.one("gcloud", "pubsub", "topics", "add-iam-policy-binding")
    assert topic[4] == "email-deliveries-dead-letter"
    assert (flag(topic, "member"), flag(topic, "role")) == (PUBSUB_AGENT, "roles/pubsub.publisher")

    sub = result.one("gcloud", "pubsub", "subscriptions", "add-iam-policy-binding")
    assert sub[4] == "<trigger-subscription>"
    assert (flag(sub, "member"), flag(sub, "role")) == (PUBSUB_AGENT, "roles/pubsub.subscriber")

    invoker = result.one("gcloud", "run", "services", "add-iam-policy-binding")
    assert invoker[4] == "email-worker"
    assert flag(invoker, "region") == "us-central1"
    assert flag(invoker, "member") == f"serviceAccount:{TRIGGER_SA}"
    assert flag(invoker, "role") == "roles/run.invoker"


def test_deploy_function_honours_overrides(deploy: Deploy) -> None:
    result = deploy.dry(
        "deploy-function.sh",
        env={
            "REGION": "europe-west1",
            "FUNCTION_NAME": "mailer",
            "MAX_DELIVERY_ATTEMPTS": "20",
            "FUNCTION_TIMEOUT": "300s",
            "LEASE_SECONDS": "600",
            "MEMORY": "512Mi",
            "MAX_INSTANCES": "3",
        },
    )
    argv = result.one("gcloud", "functions", "deploy")
    assert argv[3] == "mailer"
    assert (flag(argv, "region"), flag(argv, "timeout")) == ("europe-west1", "300s")
    assert (flag(argv, "memory"), flag(argv, "max-instances")) == ("512Mi", "3")
    assert env_vars(argv)["LEASE_SECONDS"] == "600"
    update = result.one("gcloud", "pubsub", "subscriptions", "update")
    assert flag(update, "max-delivery-attempts") == "20"
    assert result.one("gcloud", "run", "services", "add-iam-policy-binding")[4] == "mailer"


def test_deploy_function_needs_a_gcloudignore(deploy: Deploy) -> None:
    (deploy.source / ".gcloudignore").unlink()
    result = deploy.run("deploy-function.sh", "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert ".gcloudignore" in result.stderr


# --- all.sh ------------------------------------------------------------------------------------


def test_all_runs_setup_then_deploy_then_the_console(deploy: Deploy) -> None:
    result = deploy.dry("all.sh")
    setup = deploy.dry("setup-project.sh")
    function = deploy.dry("deploy-function.sh")
    console = deploy.dry("deploy-console.sh")
    assert result.stdout == setup.stdout + function.stdout + console.stdout


def test_all_leaves_the_console_out_without_invokers(deploy: Deploy) -> None:
    result = deploy.dry("all.sh", env={"CONSOLE_INVOKERS": None})
    setup = deploy.dry("setup-project.sh")
    function = deploy.dry("deploy-function.sh")
    assert result.stdout == setup.stdout + function.stdout


def test_all_checks_the_console_settings_before_changing_anything(deploy: Deploy) -> None:
    result = deploy.run("all.sh", "--dry-run", env={"CONSOLE_INVOKERS": "allUsers"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert "CONSOLE_INVOKERS" in result.stderr


# --- set-secret.sh -----------------------------------------------------------------------------


def test_set_secret_reads_stdin_and_never_prints_the_value(deploy: Deploy) -> None:
    value = "s3cr3t-P@ssw0rd-value"
    result = deploy.dry("set-secret.sh", "email-smtp-password", stdin=value + "\n")
    assert result.commands == [
        [
            "gcloud",
            "secrets",
            "versions",
            "add",
            "email-smtp-password",
            "--data-file=-",
            f"--project={PROJECT}",
        ]
    ]
    assert value not in result.stdout
    assert value not in result.stderr


def test_set_secret_refuses_an_empty_value(deploy: Deploy) -> None:
    result = deploy.run("set-secret.sh", "--dry-run", "email-smtp-password", stdin="\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [[], ["one", "two"], ["not/a-secret"]])
def test_set_secret_wants_one_secret_id(deploy: Deploy, args: list[str]) -> None:
    result = deploy.run("set-secret.sh", "--dry-run", *args, stdin="value")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage:" in result.stderr


# --- settings and the command line ------------------------------------------------------------


def args_for(script: str) -> list[str]:
    return ["email-smtp-password"] if script == "set-secret.sh" else []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_project_id_is_one_line_and_exit_2(deploy: Deploy, script: str) -> None:
    result = deploy.run(
        script, "--dry-run", *args_for(script), env={"PROJECT_ID": None}, stdin="value"
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{script}: PROJECT_ID is required but not set"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_prints_usage_and_exits_2(deploy: Deploy, script: str) -> None:
    result = deploy.run(script, "--dry-run", "--frobnicate", *args_for(script), stdin="value")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--frobnicate" in result.stderr
    assert "usage:" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_needs_no_settings(deploy: Deploy, script: str) -> None:
    result = deploy.run(script, "--help", env={"PROJECT_ID": None})
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: {script}")
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize("script", ["deploy-function.sh", "all.sh"])
@pytest.mark.parametrize("missing", ["SMTP_HOST", "EMAIL_FROM"])
def test_deploying_needs_smtp_host_and_sender(deploy: Deploy, script: str, missing: str) -> None:
    # all.sh checks before it changes anything: no command at all is printed.
    result = deploy.run(script, "--dry-run", env={missing: None})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{script}: {missing} is required but not set"]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"MAX_DELIVERY_ATTEMPTS": "5"}, "MAX_DELIVERY_ATTEMPTS"),
        ({"MAX_ATTEMPTS": "12"}, "MAX_DELIVERY_ATTEMPTS"),
        ({"LEASE_SECONDS": "120"}, "LEASE_SECONDS"),
        ({"FUNCTION_TIMEOUT": "6m"}, "LEASE_SECONDS"),
        ({"FUNCTION_TIMEOUT": "soon"}, "FUNCTION_TIMEOUT"),
        ({"MAX_INSTANCES": "0"}, "MAX_INSTANCES"),
        ({"PROJECT_ID": "Not A Project"}, "PROJECT_ID"),
        ({"DEAD_LETTER_TOPIC": "email-deliveries"}, "DEAD_LETTER_TOPIC"),
        ({"SMTP_SECURITY": "tls"}, "SMTP_SECURITY"),
        ({"SMTP_PORT": "99999"}, "SMTP_PORT"),
        ({"FALLBACK_SMTP_PORT": "99999"}, "FALLBACK_SMTP_PORT"),
        ({"FALLBACK_SMTP_SECURITY": "tls"}, "FALLBACK_SMTP_SECURITY"),
        ({"FALLBACK_SMTP_PROVIDER": "gmail"}, "FALLBACK_SMTP_PROVIDER"),
        ({"RELAY_TRIP_AFTER": "0"}, "RELAY_TRIP_AFTER"),
        ({"RELAY_COOLDOWN_SECONDS": "forever"}, "RELAY_COOLDOWN_SECONDS"),
        ({"CONCURRENCY": "0"}, "CONCURRENCY"),
        ({"CONCURRENCY": "8", "CPU": "0.583"}, "CPU"),
        ({"CPU": "lots"}, "CPU"),
        ({"MEMORY": "512"}, "MEMORY"),
        ({"SECRETS_VIA": "file"}, "SECRETS_VIA"),
        ({"BUILD_SERVICE_ACCOUNT": "not an account"}, "BUILD_SERVICE_ACCOUNT"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    deploy: Deploy, settings: dict[str, str], named: str
) -> None:
    result = deploy.run("deploy-function.sh", "--dry-run", env=settings)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert named in result.stderr


# --- deploy-console.sh ---------------------------------------------------------------------


def test_console_is_a_private_http_function_with_only_its_own_secrets(deploy: Deploy) -> None:
    argv = deploy.dry("deploy-console.sh").one("gcloud", "functions", "deploy")
    assert argv[3] == "email-console"
    assert "--gen2" in argv and "--trigger-http" in argv
    assert "--no-allow-unauthenticated" in argv and "--allow-unauthenticated" not in argv
    assert flag(argv, "entry-point") == "delivery_console"
    assert flag(argv, "runtime") == "python312"
    assert flag(argv, "source") == str(deploy.source)
    assert flag(argv, "service-account") == CONSOLE_SA
    assert flag(argv, "max-instances") == "3"
    # No SMTP, no Pub/Sub, not the worker's database secret: the console's own reader login
    # and its cursor key, mounted by Cloud Run (SECRETS_VIA=env, the default).
    assert flag(argv, "set-secrets") == (
        "CONSOLE_DATABASE_URL=email-console-database-url:latest,"
        "CONSOLE_CURSOR_KEY=email-console-cursor-key:latest"
    )
    assert "--clear-env-vars" in argv
    assert not any(arg.startswith("--set-env-vars") for arg in argv)


def test_console_can_read_its_secrets_itself(deploy: Deploy) -> None:
    argv = deploy.dry("deploy-console.sh", env={"SECRETS_VIA": "worker"}).one(
        "gcloud", "functions", "deploy"
    )
    assert env_vars(argv) == {
        "CONSOLE_DATABASE_URL_SECRET": (
            f"projects/{PROJECT}/secrets/email-console-database-url/versions/latest"
        ),
        "CONSOLE_CURSOR_KEY_SECRET": (
            f"projects/{PROJECT}/secrets/email-console-cursor-key/versions/latest"
        ),
    }
    assert "--clear-secrets" in argv and "--clear-env-vars" not in argv


def test_console_creates_checks_and_mounts_its_cursor_key(deploy: Deploy) -> None:
    result = deploy.dry("deploy-console.sh", env={"CONSOLE_CURSOR_KEY_SECRET_ID": "console-key"})
    created = [argv[3] for argv in result.find("gcloud", "secrets", "create")]
    assert created == ["email-console-database-url", "console-key"]
    checked = [
        flag(argv, "secret") for argv in result.find("gcloud", "secrets", "versions", "describe")
    ]
    assert checked == ["email-console-database-url", "console-key"]
    argv = result.one("gcloud", "functions", "deploy")
    assert flag(argv, "set-secrets").split(",")[1] == "CONSOLE_CURSOR_KEY=console-key:latest"


def test_console_grants_least_privilege_on_resources_only(deploy: Deploy) -> None:
    result = deploy.dry(
        "deploy-console.sh",
        env={"CONSOLE_INVOKERS": f"{SUPPORT},user:oncall@acme.example"},
    )
    assert not project_level_bindings(result)
    secrets = result.find("gcloud", "secrets", "add-iam-policy-binding")
    assert [(argv[3], flag(argv, "member"), flag(argv, "role")) for argv in secrets] == [
        (name, f"serviceAccount:{CONSOLE_SA}", "roles/secretmanager.secretAccessor")
        for name in ("email-console-database-url", "email-console-cursor-key")
    ]
    invokers = result.find("gcloud", "run", "services", "add-iam-policy-binding")
    assert [(argv[4], flag(argv, "member"), flag(argv, "role")) for argv in invokers] == [
        ("email-console", SUPPORT, "roles/run.invoker"),
        ("email-console", "user:oncall@acme.example", "roles/run.invoker"),
    ]
    commands = result.commands
    deployed = commands.index(result.one("gcloud", "functions", "deploy"))
    assert commands.index(secrets[-1]) < deployed < commands.index(invokers[0])
    assert "gcloud run services proxy email-console" in result.stdout


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"CONSOLE_INVOKERS": None}, "CONSOLE_INVOKERS"),
        ({"CONSOLE_INVOKERS": "allUsers"}, "CONSOLE_INVOKERS"),
        ({"CONSOLE_INVOKERS": "allAuthenticatedUsers"}, "CONSOLE_INVOKERS"),
        ({"CONSOLE_INVOKERS": "group:support@acme.example,allUsers"}, "CONSOLE_INVOKERS"),
        (
            {"CONSOLE_DATABASE_URL_SECRET_ID": "email-database-url"},
            "CONSOLE_DATABASE_URL_SECRET_ID",
        ),
        ({"CONSOLE_CURSOR_KEY_SECRET_ID": "email-database-url"}, "CONSOLE_CURSOR_KEY_SECRET_ID"),
        (
            {"CONSOLE_CURSOR_KEY_SECRET_ID": "email-console-database-url"},
            "CONSOLE_CURSOR_KEY_SECRET_ID",
        ),
        ({"CONSOLE_CURSOR_KEY_SECRET_ID": "a/b"}, "CONSOLE_CURSOR_KEY_SECRET_ID"),
        ({"CONSOLE_FUNCTION_NAME": "email-worker"}, "CONSOLE_FUNCTION_NAME"),
        ({"CONSOLE_SA": "email-worker-runtime"}, "CONSOLE_SA"),
        ({"CONSOLE_MAX_INSTANCES": "0"}, "CONSOLE_MAX_INSTANCES"),
        ({"CONSOLE_TIMEOUT": "2h"}, "CONSOLE_TIMEOUT"),
    ],
)
def test_console_bad_settings_are_one_line_and_exit_2(
    deploy: Deploy, settings: dict[str, str | None], named: str
) -> None:
    result = deploy.run("deploy-console.sh", "--dry-run", env=settings)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert named in result.stderr


def test_console_needs_no_smtp_settings(deploy: Deploy) -> None:
    result = deploy.dry("deploy-console.sh", env={"SMTP_HOST": None, "EMAIL_FROM": None})
    assert result.one("gcloud", "functions", "deploy")


# --- deploy-webhook.sh -------------------------------------------------------------------------

WEBHOOK_SA = f"email-webhook-runtime@{PROJECT}.iam.gserviceaccount.com"


def secret_version(secret_id: str) -> str:
    return f"projects/{PROJECT}/secrets/{secret_id}/versions/latest"


def test_deploy_webhook_is_an_open_http_function_of_the_webhook_target(deploy: Deploy) -> None:
    result = deploy.dry("deploy-webhook.sh", env={"WEBHOOK_PROVIDERS": "sendgrid"})
    argv = result.one("gcloud", "functions", "deploy")
    assert argv[3] == "email-webhooks"
    assert "--gen2" in argv and "--trigger-http" in argv
    # Providers cannot present Google credentials: the signature is the authentication.
    assert "--allow-unauthenticated" in argv
    assert not any(arg.startswith("--trigger-topic") for arg in argv) and "--retry" not in argv
    assert flag(argv, "entry-point") == "handle_provider_event"
    assert flag(argv, "runtime") == "python312"
    assert flag(argv, "ingress-settings") == "all"
    assert flag(argv, "service-account") == WEBHOOK_SA
    assert flag(argv, "source") == str(deploy.source)
    assert result.one("gcloud", "functions", "describe")[3] == "email-webhooks"
    assert "#   sendgrid: <function-url>/sendgrid" in result.stdout


def test_deploy_webhook_mounts_each_providers_secret(deploy: Deploy) -> None:
    arns = "arn:aws:sns:us-east-1:123456789012:ses-a,arn:aws:sns:eu-west-1:123456789012:ses-b"
    result = deploy.dry(
        "deploy-webhook.sh",
        env={"WEBHOOK_PROVIDERS": "sendgrid, mailgun,postmark,resend,ses", "SNS_TOPIC_ARNS": arns},
    )
    argv = result.one("gcloud", "functions", "deploy")
    assert env_vars(argv) == {
        "CONCURRENCY": "8",
        "THREADS": "8",
        "LOG_EXECUTION_ID": "true",
        "POSTMARK_WEBHOOK_USERNAME": "postmark",
        "SNS_TOPIC_ARNS": arns,  # commas survive: gcloud's ^DELIM^ syntax
    }
    assert flag(argv, "set-secrets").split(",") == [
        "DATABASE_URL=email-database-url:latest",
        "SENDGRID_WEBHOOK_PUBLIC_KEY=email-webhook-sendgrid-public-key:latest",
        "MAILGUN_WEBHOOK_SIGNING_KEY=email-webhook-mailgun-signing-key:latest",
        "POSTMARK_WEBHOOK_PASSWORD=email-webhook-postmark-password:latest",
        "RESEND_WEBHOOK_SECRET=email-webhook-resend-secret:latest",
    ]
    assert (flag(argv, "concurrency"), flag(argv, "cpu")) == ("8", "1")
    created = [argv[3] for argv in result.find("gcloud", "secrets", "create")]
    assert created == [
        "email-webhook-sendgrid-public-key",
        "email-webhook-mailgun-signing-key",
        "email-webhook-postmark-password",
        "email-webhook-resend-secret",
    ]
    assert "#   postmark: https://postmark:<password>@<function-url>/postmark" in result.stdout


def test_deploy_webhook_can_pass_secret_names_for_the_function_to_read(deploy: Deploy) -> None:
    result = deploy.dry(
        "deploy-webhook.sh", env={"WEBHOOK_PROVIDERS": "sendgrid,resend", "SECRETS_VIA": "worker"}
    )
    argv = result.one("gcloud", "functions", "deploy")
    env = env_vars(argv)
    assert env["DATABASE_URL_SECRET"] == secret_version("email-database-url")
    assert env["SENDGRID_WEBHOOK_PUBLIC_KEY_SECRET"] == secret_version(
        "email-webhook-sendgrid-public-key"
    )
    assert env["RESEND_WEBHOOK_SECRET_SECRET"] == secret_version("email-webhook-resend-secret")
    assert "--clear-secrets" in argv
    assert not any(arg.startswith("--set-secrets") for arg in argv)


def test_deploy_webhook_grants_its_own_account_its_secrets_only(deploy: Deploy) -> None:
    result = deploy.dry("deploy-webhook.sh", env={"WEBHOOK_PROVIDERS": "resend"})
    assert not project_level_bindings(result)
    account = result.one("gcloud", "iam", "service-accounts", "create")
    assert account[4] == "email-webhook-runtime"
    bindings = result.find("gcloud", "secrets", "add-iam-policy-binding")
    assert sorted(argv[3] for argv in bindings) == [
        "email-database-url",
        "email-webhook-resend-secret",
    ]
    for argv in bindings:
        assert flag(argv, "member") == f"serviceAccount:{WEBHOOK_SA}"
        assert flag(argv, "role") == "roles/secretmanager.secretAccessor"
    checked = [flag(a, "secret") for a in result.find("gcloud", "secrets", "versions", "describe")]
    assert checked == ["email-database-url", "email-webhook-resend-secret"]
    commands = result.commands
    assert max(commands.index(argv) for argv in bindings) < commands.index(
        result.one("gcloud", "functions", "deploy")
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "WEBHOOK_PROVIDERS is required but not set"),
        ({"WEBHOOK_PROVIDERS": "sparkpost"}, "WEBHOOK_PROVIDERS: unknown provider 'sparkpost'"),
        ({"WEBHOOK_PROVIDERS": "ses"}, "SNS_TOPIC_ARNS is required but not set"),
        (
            {"WEBHOOK_PROVIDERS": "postmark", "POSTMARK_WEBHOOK_USERNAME": "a:b"},
            "POSTMARK_WEBHOOK_USERNAME must be",
        ),
    ],
)
def test_deploy_webhook_refuses_bad_settings_before_any_command(
    deploy: Deploy, env: dict[str, str], message: str
) -> None:
    result = deploy.run("deploy-webhook.sh", "--dry-run", env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.commands == []


def test_all_deploys_the_webhook_only_when_providers_are_named(deploy: Deploy) -> None:
    assert not deploy.dry("all.sh").find("gcloud", "functions", "deploy", "email-webhooks")
    result = deploy.dry("all.sh", env={"WEBHOOK_PROVIDERS": "mailgun"})
    deployed = [argv[3] for argv in result.find("gcloud", "functions", "deploy")]
    # The base environment names console invokers too: the console comes last.
    assert deployed == ["email-worker", "email-webhooks", "email-console"]


def test_deploy_function_refuses_an_unknown_smtp_provider(deploy: Deploy) -> None:
    result = deploy.run("deploy-function.sh", "--dry-run", env={"SMTP_PROVIDER": "gmail"})
    assert result.returncode == 2
    assert "SMTP_PROVIDER must be ses, sendgrid, mailgun, postmark, resend or none" in result.stderr
    assert result.commands == []
