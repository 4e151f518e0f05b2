"""4. Cold start in the deployed shape: a fresh interpreter, functions_framework already
imported (untimed), then `import main` + the first event to the relay, timed
(bench/coldstart_child.py).

The environment is what deploy/deploy-function.sh gives an instance (CONCURRENCY, THREADS,
LOG_EXECUTION_ID, MAX_ATTEMPTS, LEASE_SECONDS) and the relay asks for STARTTLS and AUTH with a
private CA (SMTP_CA_FILE), so the first email pays the TLS handshake and the login. Variants,
interleaved, several repetitions each, medians reported:
  env     the deploy's --set-secrets: DATABASE_URL and SMTP_PASSWORD are plain variables;
  secret  DATABASE_URL_SECRET and SMTP_PASSWORD_SECRET instead: the worker imports
          google.cloud.secretmanager and reads both versions (from a local gRPC Secret
          Manager here, so the RPCs cost a loopback round trip, not Google's);
  eager   the env variant with google.cloud.pubsub_v1, google.cloud.secretmanager, grpc,
          psycopg_pool, jinja2 and tenacity imported first, as a less careful
          worker would.
One more env run under `-X importtime` names the imports that cost the most.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.concurrency import production_env
from bench.report import Section, median
from bench.services import ROOT, Stack
from bench.workload import PROJECT, worker_env
from tests.harness.secretmanager import LocalSecretManager
from tests.harness.smtp import SmtpTestServer

_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")
VARIANTS = ("env", "secret", "eager")
SMTP_USER = "bench-relay-user"
SMTP_PASSWORD = "bench-relay-password-5c1e"
DEPLOYED_CONCURRENCY = 8


def _child(
    variant: str, delivery_id: str, env: dict[str, str], out: Path, log: Path, importtime: bool
) -> tuple[dict[str, Any], float, str]:
    command = [sys.executable]
    if importtime:
        command += ["-X", "importtime"]
    command += [
        "-m",
        "bench.coldstart_child",
        "--variant",
        "eager" if variant == "eager" else "lazy",
        "--delivery-id",
        delivery_id,
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    with log.open("ab") as log_file:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    wall_ms = (time.perf_counter() - started) * 1000
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"cold start child failed ({done.returncode}): {stderr[-1500:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result, wall_ms, stderr


def top_imports(stderr: str, limit: int = 8) -> list[tuple[str, float]]:
    """The packages the timed part imports, by cumulative ms: for each top-level package
    (psycopg, jinja2, email, ...) the entries where it first appears in the import tree (the
    shallowest), summed. The worker's own modules and main are left out."""
    _, _, timed = stderr.partition("--- timed ---")
    entries: list[tuple[str, int, float]] = []
    for line in timed.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            root = match.group(4).split(".")[0]
            entries.append((root, len(match.group(3)) // 2, int(match.group(2)) / 1000))
    shallowest: dict[str, int] = {}
    for root, depth, _ms in entries:
        shallowest[root] = min(depth, shallowest.get(root, depth))
    totals: dict[str, float] = {}
    for root, depth, ms in entries:
        if root not in ("main", "worker") and depth == shallowest[root]:
            totals[root] = totals.get(root, 0.0) + ms
    return sorted(totals.items(), key=lambda item: item[1], reverse=True)[:limit]


def environments(
    database_url: str, relay: SmtpTestServer, secrets: LocalSecretManager
) -> dict[str, dict[str, str]]:
    """Each variant's whole environment: the deployed shape, secrets as env or as names."""
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "DATABASE_URL", "SMTP_", "SECRET_MANAGER"))
    }
    assert relay.ca_file is not None
    deployed = {
        **base,
        **worker_env(database_url=database_url, smtp_port=relay.port),
        **production_env(DEPLOYED_CONCURRENCY),
        "SMTP_SECURITY": "starttls",
        "SMTP_CA_FILE": relay.ca_file,
        "SMTP_USERNAME": SMTP_USER,
    }
    with_env = {**deployed, "SMTP_PASSWORD": SMTP_PASSWORD}
    database_secret = f"projects/{PROJECT}/secrets/email-database-url/versions/latest"
    password_secret = f"projects/{PROJECT}/secrets/email-smtp-password/versions/latest"
    secrets.secrets[database_secret] = database_url + "\n"
    secrets.secrets[password_secret] = SMTP_PASSWORD + "\n"
    with_secrets = {k: v for k, v in deployed.items() if k != "DATABASE_URL"}
    with_secrets.update(
        DATABASE_URL_SECRET=database_secret,
        SMTP_PASSWORD_SECRET=password_secret,
        SECRET_MANAGER_ENDPOINT=secrets.endpoint,
    )
    return {"env": with_env, "secret": with_secrets, "eager": with_env}


def run(stack: Stack, *, repetitions: int, log_dir: Path) -> Section:
    section = Section(
        "coldstart", "Cold start, deployed shape: import main + first email (fresh process)"
    )
    name, url = stack.database()
    relay = SmtpTestServer(tls="starttls", username=SMTP_USER, password=SMTP_PASSWORD).start()
    secret_manager = LocalSecretManager()
    secret_manager.start()
    envs = environments(url, relay, secret_manager)
    out = log_dir / "coldstart.json"
    log = log_dir / "coldstart-children.log"
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    walls: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    try:
        # Warm-up: writes bytecode caches and fills the page cache, as a deployed image has.
        for variant in VARIANTS:
            _child(variant, f"cold-warm-{variant}", envs[variant], out, log, importtime=False)
        for number in range(repetitions):
            # Rotate the order, so no variant always runs right after the same other one.
            shift = number % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                result, wall, _ = _child(
                    variant, f"cold-{variant}-{number}", envs[variant], out, log, importtime=False
                )
                results[variant].append(result)
                walls[variant].append(wall)
        _, _, profile = _child("env", "cold-importtime", envs["env"], out, log, importtime=True)
        sent = len(relay.messages)

        def med(variant: str, key: str) -> float:
            return median([r[key] for r in results[variant]])

        env_total = med("env", "total_ms")
        secret_total, eager_total = med("secret", "total_ms"), med("eager", "total_ms")
        section.add(
            "deployed (--set-secrets): import main + 1st email",
            env_total,
            "ms",
            f"target <= 250: {'met' if env_total <= 250 else 'not met'}; median of {repetitions}",
        )
        section.add(
            "  CPU of the same span",
            med("env", "total_cpu_ms"),
            "ms",
            "this process's user+system time; wall minus this is waiting (I/O, other work)",
        )
        section.add("  import main", med("env", "import_main_ms"), "ms")
        section.add("  first email", med("env", "first_event_ms"), "ms")
        for step in ("claim", "send", "set_sent_if_claimed"):
            values = [r["first_event_steps_ms"].get(step, 0.0) for r in results["env"]]
            label = {
                "claim": "DB connect + claim",
                "send": "SMTP connect + STARTTLS + AUTH + send",
                "set_sent_if_claimed": "DB set_sent",
            }[step]
            section.add(f"    of which {label}", median(values), "ms")
        section.add(
            "*_SECRET (worker reads Secret Manager)",
            secret_total,
            "ms",
            f"+{secret_total - env_total:.0f} ms over --set-secrets"
            f" (CPU {med('secret', 'total_cpu_ms'):.0f} vs {med('env', 'total_cpu_ms'):.0f} ms)"
            f" (import main {med('secret', 'import_main_ms'):.0f} ms; local gRPC server,"
            " Google's adds its round trips)",
        )
        section.add(
            "eager imports + main + 1st email",
            eager_total,
            "ms",
            f"ratio eager/deployed {eager_total / env_total:.2f}",
        )
        section.add(
            "deployed path imports secretmanager/pubsub/grpc?",
            "yes"
            if any(
                r["secretmanager_loaded"] or r["pubsub_loaded"] or r["grpc_loaded"]
                for r in results["env"]
            )
            else "no",
        )
        section.add("framework import (untimed, ref.)", med("env", "framework_import_ms"), "ms")
        section.add("whole child process (wall)", median(walls["env"]), "ms", "reference")
        heavy = top_imports(profile)
        section.add(
            "costliest imports (deployed, -X importtime)",
            ", ".join(f"{mod} {ms:.0f}" for mod, ms in heavy[:6]),
            "ms",
        )
        expected = len(VARIANTS) * (repetitions + 1) + 1
        if sent != expected:
            section.add("  relay check", f"{sent}/{expected} emails")
        section.data.update(
            repetitions=repetitions,
            results=results,
            wall_ms=walls,
            top_imports_ms=heavy,
            secret_manager_calls=secret_manager.calls,
        )
    finally:
        relay.stop()
        secret_manager.stop()
        stack.drop(name)
    return section
