"""One list of providers (worker/core/providers.py): the webhook registry, the relay's
correlation headers, the adapters' settings and the deploy script all agree with it, so that
adding a provider cannot half-happen."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from worker.core.providers import BY_NAME, NO_PROVIDER, PROVIDERS, Provider
from worker.delivery import relay
from worker.providers import registry

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_WEBHOOK = ROOT / "deploy" / "deploy-webhook.sh"


def test_the_registry_serves_exactly_the_table() -> None:
    assert dict(registry.MODULES) == {p.name: f"worker.providers.{p.name}" for p in PROVIDERS}


def test_smtp_provider_names_exactly_the_table() -> None:
    assert {p.value for p in relay.SmtpProvider} == {NO_PROVIDER, *BY_NAME}


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_each_adapter_reads_only_the_settings_the_table_names(provider: Provider) -> None:
    module: Any = importlib.import_module(registry.MODULES[provider.name])
    asked: list[str] = []

    def setting(name: str) -> str | None:
        asked.append(name)
        return None  # absent: the route is off, and nothing else is read

    assert module.from_env(setting) is None
    assert set(asked) <= {*provider.secrets, *provider.settings}
    assert asked, "its from_env reads none of its settings"


def deploy_cases() -> dict[str, str]:
    """`case $provider in` arms of deploy-webhook.sh: provider name -> the arm's text."""
    text = DEPLOY_WEBHOOK.read_text()
    body = text[text.index("case $provider in") : text.index("esac")]
    arms = re.split(r"^\s{4}(\w+|\*)\)", body, flags=re.MULTILINE)[1:]
    return dict(zip(arms[0::2], arms[1::2], strict=True))


def test_the_deploy_script_has_a_case_for_each_provider_and_no_other() -> None:
    cases = deploy_cases()
    assert set(cases) - {"*"} == set(BY_NAME)
    # Its error line lists the same names.
    assert set(re.findall(r"\w+", cases["*"].split("(")[-1].split(")")[0])) == set(BY_NAME)


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_the_deploy_script_mounts_the_tables_secrets_and_sets_its_settings(
    provider: Provider,
) -> None:
    arm = deploy_cases()[provider.name]
    mounted = re.findall(r'"([A-Z_]+) email-webhook-[a-z-]+"', arm)
    assert mounted == list(provider.secrets)
    plain = re.findall(r'env_vars\+=\("([A-Z_]+)=', arm)
    assert set(plain) <= set(provider.settings)
