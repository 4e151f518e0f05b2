"""The input rules every part shares: what a delivery id and a recipient address may be.

The delivery function refuses an event that breaks them; the webhooks, the console and the
CLI use the same rules to read ids and addresses back, so one value means one thing
everywhere.
"""

from __future__ import annotations

import re
from typing import Any

# The idempotency key upstream services choose: short, and safe in a header, a URL and a log.
DELIVERY_ID_RULE = "1 to 200 characters from [A-Za-z0-9._:@-]"
_DELIVERY_ID = re.compile(r"[A-Za-z0-9._:@-]{1,200}", re.ASCII)

# addr-spec with a dot-atom local part: no quoted strings, comments, domain literals or
# display names, so the value cannot smuggle a second address or a header into SMTP.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATEXT}(\.{_ATEXT})*", re.ASCII)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})+|localhost", re.ASCII | re.IGNORECASE)

RECIPIENT_RULE = (
    "must be one address (addr-spec), at most 254 characters, no display name: "
    "a dot-atom local part of at most 64 characters, one '@', and a domain name with a dot "
    "(or localhost); no spaces, quotes, commas, angle brackets or line breaks"
)


def is_delivery_id(value: Any) -> bool:
    """A string that can be a delivery id (see `DELIVERY_ID_RULE`)."""
    return isinstance(value, str) and _DELIVERY_ID.fullmatch(value) is not None


def is_address(value: str) -> bool:
    """One strict addr-spec (see `RECIPIENT_RULE`)."""
    if len(value) > 254 or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    return (
        len(local) <= 64
        and len(domain) <= 253
        and _LOCAL_PART.fullmatch(local) is not None
        and _DOMAIN.fullmatch(domain) is not None
    )
