"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _postfix_version() -> str:
    try:
        done = subprocess.run(
            ["postconf", "-h", "mail_version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def describe(postgres_version: str) -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "postgresql": postgres_version,
        "kernel": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(value, 2) for value in load],
        "postfix_smtp_sink": _postfix_version(),
        "packages": {
            name: _version(name)
            for name in (
                "functions-framework",
                "gunicorn",
                "psycopg",
                "psycopg-pool",
                "Jinja2",
                "tenacity",
                "google-cloud-pubsub",
            )
        },
    }
