"""`bash scripts/local-stack.sh`, the README's first command, run for real as a subprocess.

One run for the module (outputs in a temp dir through `LOCAL_STACK_DIR`); each test checks
one promise: exit 0 and the summary line, one `.eml` per sent delivery, the printed ledger,
masked recipients, and that nothing it started is still running afterwards.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.harness.function import ROOT

SCRIPT = ROOT / "scripts" / "local-stack.sh"
SUMMARY = (
    "local stack OK: 3 sent, 1 failed, 1 invalid dead-lettered, 1 duplicate skipped;"
    " 1 suppressed, 3 of 6 burst codes sent (3 rate limited)"
)
# delivery_id -> (recipient, subject), as scripts/local_stack.py publishes them.
SENT = {
    "verify-demo-1": ("ada@example.com", "Your verification code"),
    "invite-demo-1": ("grace@example.com", "Ada invited you to join Acme"),
    "reset-demo-1": ("kim@example.com", "Reset your password"),
}
# Settings a test session may have exported (fixtures); the stack must not depend on them.
_SESSION_SETTINGS = (
    "DATABASE_URL",
    "PUBSUB_EMULATOR_HOST",
    "GOOGLE_CLOUD_PROJECT",
    "DELIVERY_TOPIC",
    "DEAD_LETTER_TOPIC",
    "PUBLISH_TIMEOUT_SECONDS",
)


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    summary: dict[str, Any]

    def section(self, title: str) -> list[str]:
        """The lines under `== title...` up to the next blank line."""
        lines = self.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title}"))
        body = []
        for line in lines[start + 1 :]:
            if not line.strip():
                break
            body.append(line)
        return body


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run_dir = tmp_path_factory.mktemp("local-stack")
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_SETTINGS}
    env["LOCAL_STACK_DIR"] = str(run_dir)
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return Run(proc.returncode, proc.stdout, proc.stderr, run_dir, summary)


def _parse(path: Path) -> EmailMessage:
    message = BytesParser(policy=default_policy).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def test_exits_zero_with_the_summary_line(stack_run: Run) -> None:
    assert stack_run.returncode == 0, stack_run.stdout[-4000:] + stack_run.stderr[-2000:]
    last = stack_run.stdout.strip().splitlines()[-1]
    assert last.startswith(SUMMARY), last
    assert stack_run.summary["ok"] is True
    assert stack_run.summary["run_dir"] == str(stack_run.run_dir)


def test_starts_the_console_and_prints_its_url(stack_run: Run) -> None:
    url = stack_run.summary["console_url"]
    assert url == f"http://127.0.0.1:{stack_run.summary['ports']['console']}/"
    started = stack_run.section("Support console")
    assert started[0].split()[:2] == ["console", url]
    # It answered, as the email_reader login, for a delivery the stack sent.
    opened = stack_run.section("Open the support console")
    assert opened[0].split() == ["open", url]
    assert opened[1].split()[1:] == [f"{url}deliveries/verify-demo-1", "(sent)"]


def test_one_eml_file_per_sent_delivery(stack_run: Run) -> None:
    # The burst of codes (skipped on purpose, below) has emails of its own.
    emails = sorted(
        p for p in (stack_run.run_dir / "emails").glob("*.eml") if "burst" not in p.name
    )
    assert len(emails) == 3, emails
    by_id: dict[str, list[EmailMessage]] = {}
    for path in emails:
        message = _parse(path)
        message_id = str(message["Message-ID"])
        assert message_id.startswith("<") and message_id.endswith("@example.com>")
        delivery_id = message_id[1:].split("@")[0]
        assert delivery_id in path.name  # a reader can tell which file is which
        by_id.setdefault(delivery_id, []).append(message)
    assert sorted(by_id) == sorted(SENT)  # one per workflow; the duplicate sent nothing
    for delivery_id, (recipient, subject) in SENT.items():
        [message] = by_id[delivery_id]  # exactly one, also for the duplicated id
        assert message["To"] == recipient
        assert message["Subject"] == subject
        plain = message.get_body(("plain",))
        assert plain is not None
        if delivery_id == "invite-demo-1":  # the sample's expiry, a week out, written out
            text = plain.get_content()
            assert re.search(r"The invitation expires on [A-Z][a-z]+ \d{1,2}, \d{4}\.", text)


def test_prints_the_ledger_with_sent_and_failed_rows(stack_run: Run) -> None:
    rows = {line.split()[0]: line.split() for line in stack_run.section("Ledger")[1:]}
    assert stack_run.section("Ledger")[0].split() == [
        "delivery_id",
        "workflow",
        "recipient",
        "status",
        "attempts",
        "last_error_code",
    ]
    assert sorted(rows) == sorted([*SENT, "bounce-demo-1"])
    for delivery_id in SENT:
        assert rows[delivery_id][3:] == ["sent", "1", "-"]
    assert rows["bounce-demo-1"][1:] == [
        "verification-code",
        "b***@example.com",
        "failed",
        "1",
        "SMTP_550",
    ]
    letters = [line.split()[:3] for line in stack_run.section("Dead letters")[1:]]
    assert sorted(letters) == [
        ["invalid_event", "INVALID_EVENT", "-"],
        ["permanent_failure", "SMTP_550", "bounce-demo-1"],
    ]


def test_a_hard_bounce_and_a_burst_of_codes_are_skipped_on_purpose(stack_run: Run) -> None:
    lines = stack_run.section("Skipped on purpose: the ledger")
    rows = {line.split()[0]: line.split()[1:] for line in lines if "-demo-" in line.split()[0]}
    assert rows["invite-demo-2"] == ["G***@Example.com", "skipped", "SUPPRESSED", "hard_bounce"]
    burst = [rows[f"burst-demo-{n}"][1:] for n in range(1, 7)]
    assert (
        sorted(burst) == [["sent", "-", "-"]] * 3 + [["skipped", "RATE_LIMITED", "rate_limit"]] * 3
    )
    emails = sorted((stack_run.run_dir / "emails").glob("*burst*.eml"))
    assert [_parse(path)["To"] for path in emails] == ["eve@example.com"] * 3


def test_output_masks_recipients_and_hides_template_data(stack_run: Run) -> None:
    for secret in (
        "ada@example.com",
        "grace@example.com",
        "kim@example.com",
        "eve@example.com",
        "482913",
        "901417",
    ):
        assert secret not in stack_run.stdout
    assert "a***@example.com" in stack_run.stdout


def _command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:  # exited while we looked
                continue
            lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_nothing_it_started_is_left_running(stack_run: Run) -> None:
    ports: dict[str, int] = stack_run.summary["ports"]
    assert sorted(ports) == [
        "console",
        "function",
        "postgres",
        "pubsub_emulator",
        "smtp",
        "smtp_fallback",
    ]
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{name} still listens on {port}"
    emulator_dir = stack_run.summary["emulator_data_dir"]
    postgres_dir = stack_run.summary["postgres_data_dir"]
    markers = [
        emulator_dir,  # the gcloud wrapper
        f"--port={ports['pubsub_emulator']} ",  # its java child (args end with a space here)
        postgres_dir,
        f"--port {ports['function']} ",  # functions-framework
        f"--port {ports['console']} ",  # the console's functions-framework
    ]
    leftovers = [cmd for cmd in _command_lines() if any(m in cmd for m in markers)]
    assert leftovers == []
    assert not Path(emulator_dir).exists()
    assert not Path(postgres_dir).exists()
    logs = stack_run.run_dir / "logs"
    assert {p.name for p in logs.iterdir()} >= {
        "function.log",
        "postgres.log",
        "pubsub-emulator.log",
    }


def test_signed_provider_events_move_each_sent_delivery(stack_run: Run) -> None:
    """The webhook half (docs/webhooks.md): every provider, through functions-framework."""
    requests = stack_run.summary["provider_requests"]
    assert {r["provider"] for r in requests} == {
        "sendgrid",
        "mailgun",
        "postmark",
        "resend",
        "ses",
    }
    refused = [(r["provider"], r["request"]) for r in requests if r["status"] != 200]
    assert refused == [("sendgrid", "forged (signed by someone else)")]
    assert all(r["status"] in (200, 403) for r in requests)
    assert stack_run.summary["provider_events"] == (
        "8 provider events applied, 2 duplicate, 1 refused"
    )
    body = stack_run.stdout.split("Provider status (email.deliveries)")[1].splitlines()
    statuses = {line.split()[0]: line.split()[1] for line in body[2:5]}
    assert statuses == {
        "invite-demo-1": "clicked",
        "reset-demo-1": "complained",
        "verify-demo-1": "opened",
    }
    assert "k***@example.com  complaint  (from reset-demo-1)" in stack_run.stdout


def test_clicked_links_reach_neither_the_webhook_log_nor_the_output(stack_run: Run) -> None:
    log = (stack_run.run_dir / "logs" / "webhook.log").read_text()
    assert '"provider event"' in log  # the log is the real one
    for link in ("app.example.com/invite/7Hq2xLm9", "app.example.com/reset/Qw8rT2zP"):
        assert link not in log
        assert link not in stack_run.stdout


# --- one set of resource names: deploy/, the README and the local stack ---------------------


def _local_stack_module() -> ModuleType:
    sys.path.insert(0, str(ROOT / "scripts"))  # local_stack.py imports eml_sink beside it
    try:
        return importlib.import_module("local_stack")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _deploy_default(name: str) -> str:
    text = (ROOT / "deploy" / "config.sh").read_text()
    match = re.search(rf'^: "\$\{{{name}:=([^}}]*)\}}"', text, re.MULTILINE)
    assert match, name
    return match.group(1)


def test_the_local_stack_uses_the_deployed_names() -> None:
    stack = _local_stack_module()
    local = (stack.DELIVERY_TOPIC, stack.DEAD_LETTER_TOPIC, stack.REPLAY_SUBSCRIPTION)
    deployed = ("DELIVERY_TOPIC", "DEAD_LETTER_TOPIC", "DEAD_LETTER_SUBSCRIPTION")
    assert local == tuple(_deploy_default(name) for name in deployed)


@pytest.mark.parametrize("readme", ["docs/operating.md", "docs/deploying.md", "deploy/README.md"])
def test_the_readmes_name_the_same_topics_and_subscription(readme: str) -> None:
    stack = _local_stack_module()
    text = (ROOT / readme).read_text()
    subscriptions = set(re.findall(r"--subscription[ =]([\w.-]+)", text))
    topics = set(re.findall(r"_TOPIC=([\w.-]+)", text))
    assert subscriptions == {stack.REPLAY_SUBSCRIPTION}
    assert topics <= {stack.DELIVERY_TOPIC, stack.DEAD_LETTER_TOPIC}
