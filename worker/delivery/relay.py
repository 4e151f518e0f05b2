"""What the worker tells the relay so provider events can be matched, and what it reads back
(docs/reference.md and docs/webhooks.md).

`SMTP_PROVIDER` names the email service behind `SMTP_HOST`; each echoes the delivery id back
in its webhooks when it is attached its own way:

  ses       X-SES-MESSAGE-TAGS: delivery_id=<id>      (the SES adapter reads mail.tags)
            https://docs.aws.amazon.com/ses/latest/dg/event-publishing-send-email.html
            Tag values may hold only ASCII letters, digits, `_` and `-`
            (https://docs.aws.amazon.com/ses/latest/APIReference/API_MessageTag.html): an id
            with `.`, `:` or `@` gets no tag and is matched by Message-ID or SES's own id.
  sendgrid  X-SMTPAPI: {"unique_args": {"delivery_id": "<id>"}}
            https://www.twilio.com/docs/sendgrid/for-developers/sending-email/building-an-x-smtpapi-header
  mailgun   X-Mailgun-Variables: {"delivery_id": "<id>"}
            https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/send-attachments
            ("Attaching Metadata to Messages")
  postmark  X-PM-Metadata-delivery_id: <id>, and X-PM-KeepID: true so Postmark keeps our
            Message-ID https://postmarkapp.com/developer/user-guide/send-email-with-smtp
  resend    nothing: Resend's SMTP documents custom headers but none that becomes a tag
            (https://resend.com/docs/send-with-smtp); its events are matched by Resend's id,
            read from the `250` reply, or by Message-ID.
  none      nothing (the default).

The relay's final `250` reply often names its own id for the message: `250 Ok <id>` (SES),
`250 Ok: queued as <id>` (SendGrid, Postfix), `250 2.0.0 OK: queued as <id>`; read
case-insensitively and kept as `relay_message_id`.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum


class SmtpProvider(StrEnum):
    NONE = "none"
    SES = "ses"
    SENDGRID = "sendgrid"
    MAILGUN = "mailgun"
    POSTMARK = "postmark"
    RESEND = "resend"


_SES_TAG_VALUE = re.compile(r"[A-Za-z0-9_-]{1,256}", re.ASCII)
_ID = r"<?([A-Za-z0-9][A-Za-z0-9._@:+=/-]{0,250})>?"
_QUEUED_AS = re.compile(rf"\bqueued\s+as\s+{_ID}", re.IGNORECASE)
# `Ok <id>` with nothing after the id (a reply such as Gmail's "OK 1700000000 x - gsmtp" is
# not one id and is left alone, nor is a bare "Ok: queued", which names none).
_OK_ID = re.compile(
    rf"^(?:[245]\.\d{{1,3}}\.\d{{1,3}}\s+)?ok\s*:?\s+(?!<?queued\b){_ID}\s*$", re.IGNORECASE
)


def tracking_headers(provider: SmtpProvider, delivery_id: str) -> list[tuple[str, str]]:
    """The headers that carry `delivery_id` to `provider` (ASCII, one line each)."""
    if provider is SmtpProvider.SES:
        if _SES_TAG_VALUE.fullmatch(delivery_id):
            return [("X-SES-MESSAGE-TAGS", f"delivery_id={delivery_id}")]
        return []
    if provider is SmtpProvider.SENDGRID:
        args = {"unique_args": {"delivery_id": delivery_id}}
        return [("X-SMTPAPI", json.dumps(args, separators=(", ", ": ")))]
    if provider is SmtpProvider.MAILGUN:
        return [("X-Mailgun-Variables", json.dumps({"delivery_id": delivery_id}))]
    if provider is SmtpProvider.POSTMARK:
        return [("X-PM-Metadata-delivery_id", delivery_id), ("X-PM-KeepID", "true")]
    return []


def relay_message_id(reply: bytes | str) -> str | None:
    """The relay's own id in the text of its final `250` reply (the code already stripped,
    as smtplib returns it), or None when it names none."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    text = " ".join(text.split())  # a multi-line reply is read as one
    match = _QUEUED_AS.search(text) or _OK_ID.match(text)
    return match.group(1) if match else None
