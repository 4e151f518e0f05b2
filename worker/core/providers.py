"""The email providers this service knows: one table that every part reads.

A provider is the email service behind the SMTP relay (`SMTP_PROVIDER`): the delivery
function attaches the delivery id the way that provider echoes it back
(worker/delivery/relay.py), its webhook route `POST …/<name>` is served by its adapter module
(`worker/providers/<name>.py`) when its settings are present, and deploy/deploy-webhook.sh
mounts its secrets. Adding a provider is its adapter module, its header rule, its deploy case
and one row here; tests/test_providers_table.py fails while any of them disagrees with this
table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Provider:
    name: str  # the `SMTP_PROVIDER` value and the webhook route's last path segment
    # The webhook's settings that are secrets: each may be given as NAME_SECRET (a Secret
    # Manager version), and the deploy script mounts each from a secret of its own.
    secrets: tuple[str, ...]
    # Its other webhook settings (plain values).
    settings: tuple[str, ...] = ()
    # The signature does not cover the event (Mailgun signs `timestamp + token`): each
    # signature is taken once, remembered in the database by every instance.
    one_use_signature: bool = False


PROVIDERS: tuple[Provider, ...] = (
    Provider("sendgrid", secrets=("SENDGRID_WEBHOOK_PUBLIC_KEY",)),
    Provider("mailgun", secrets=("MAILGUN_WEBHOOK_SIGNING_KEY",), one_use_signature=True),
    Provider(
        "postmark", secrets=("POSTMARK_WEBHOOK_PASSWORD",), settings=("POSTMARK_WEBHOOK_USERNAME",)
    ),
    Provider("resend", secrets=("RESEND_WEBHOOK_SECRET",)),
    Provider("ses", secrets=(), settings=("SNS_TOPIC_ARNS", "SNS_CERT_HOSTS", "SNS_CA_FILE")),
)

BY_NAME = {provider.name: provider for provider in PROVIDERS}
# `SMTP_PROVIDER=none`: a relay whose events are not tracked (the default).
NO_PROVIDER = "none"
