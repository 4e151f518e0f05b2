"""Which providers this instance serves: one adapter per provider whose settings are present.

Each adapter module has `from_env(setting) -> Adapter | None`: None when its settings are
absent (the route answers 404), `SettingsError` when one is malformed (the instance stops
with one line); a provider in `ONE_USE_SIGNATURES` takes the instance's used-token ledger too.
`setting(NAME)` is `NAME` itself or the Secret Manager version named by
`NAME_SECRET`. Which providers there are is the table of worker/core/providers.py; their
modules are imported here, on the webhook path only, so the delivery function never loads
their crypto.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from worker.core.providers import PROVIDERS
from worker.core.settings import secret_or_env
from worker.providers.common import Setting
from worker.providers.model import Adapter

if TYPE_CHECKING:
    from worker.providers.mailgun import TokenLedger

# The last path segment -> the module that serves it: `worker/providers/<name>.py`.
MODULES: Mapping[str, str] = {p.name: f"{__package__}.{p.name}" for p in PROVIDERS}
# Providers whose signature does not cover the event, so that each signature may be used only
# once: their `from_env` also takes where used tokens are remembered.
ONE_USE_SIGNATURES = frozenset(p.name for p in PROVIDERS if p.one_use_signature)


def setting_reader(env: Mapping[str, str] = os.environ) -> Setting:
    """`setting(NAME)`: `NAME`, or the secret `NAME_SECRET` names (read once, cached);
    raises `SettingsError` when both are set or the secret cannot be read."""

    def setting(name: str) -> str | None:
        return secret_or_env(env, name)

    return setting


def build_adapters(
    setting: Setting, modules: Mapping[str, str] = MODULES, tokens: TokenLedger | None = None
) -> dict[str, Adapter]:
    """`tokens`: the instance's used-token ledger, for the providers that need one."""
    adapters: dict[str, Adapter] = {}
    for provider, module_name in modules.items():
        module: Any = importlib.import_module(module_name)
        extra = {"tokens": tokens} if provider in ONE_USE_SIGNATURES else {}
        adapter = module.from_env(setting, **extra)
        if adapter is not None:
            adapters[provider] = adapter
    return adapters
