"""What may leave the process: error text and log values with secrets taken out.

Codes, links and tokens live in an event's `data`, which is never logged or stored; this is
the second line of defence for text we do not control (SMTP replies, exception messages).
"""

from __future__ import annotations

import re

MAX_ERROR_MESSAGE = 500

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SPACES = re.compile(r" {2,}")
_URL = re.compile(r"(?i)\b(?:[a-z][a-z0-9+.-]*://|www\.)\S+")
# An address's characters: atext, and any non-ASCII character but a space (RFC 6531 local
# parts and U-labels hold combining marks and other characters that are not `\w`; without
# them a match would start inside the local part and show what comes before it).
_ADDRESS_CHAR = r"[\w.!#$%&'*+/=?^`{|}~\-]|[^\x00-\x7f\s]"
_DOMAIN_CHAR = r"[\w\-]|[^\x00-\x7f\s.\u3002\uff0e\uff61]"
_ADDRESS = re.compile(
    rf"({_ADDRESS_CHAR})(?:{_ADDRESS_CHAR})*@((?:{_DOMAIN_CHAR})+(?:\.(?:{_DOMAIN_CHAR})+)*)"
)


def mask_email(address: str) -> str:
    """`ada@example.com` -> `a***@example.com`: enough for support to recognise it. Of a
    non-ASCII local part too only the first character shows (`ñoño@…` -> `ñ***@…`)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def mask_addresses(text: str) -> str:
    return _ADDRESS.sub(r"\1***@\2", text)


def mask_links_and_addresses(text: str) -> str:
    """URLs become `[url]` (they may carry tokens); addresses are masked."""
    if "@" not in text and "://" not in text and "www." not in text.lower():
        return text  # neither pattern can match: most log values, checked at C speed
    return mask_addresses(_URL.sub("[url]", text))


def sanitise(text: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """One line, no URLs (they may hold tokens), masked addresses, at most `limit` chars."""
    text = _CONTROL.sub(" ", text)
    text = mask_links_and_addresses(text)
    text = _SPACES.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
