"""The input rules every part shares: what a delivery id and a recipient address may be.

The delivery function refuses an event that breaks them; the webhooks, the console and the
CLI use the same rules to read ids and addresses back, so one value means one thing
everywhere: `normalise_address` is the one stored form of an address.
"""

from __future__ import annotations

import re
import unicodedata
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
    "(or localhost); no spaces, quotes, commas, angle brackets or line breaks; "
    "internationalised (non-ASCII or xn--) addresses must also pass IDNA 2008 and RFC 6531"
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


def normalise_address(value: str) -> str | None:
    """The stored form of one recipient address, or None when it breaks `RECIPIENT_RULE`.

    A plain ASCII address is stored as given (today's fast path: one regex). An
    internationalised one (a non-ASCII character, or an `xn--` label in the domain) is
    checked by email-validator and stored NFC-normalised with its domain lower-cased in
    U-label form, so both spellings of a domain are one address. A non-ASCII local part is
    also lower-cased: PostgreSQL's `lower()`, which the suppression and rate-limit
    comparisons use, lower-cases non-ASCII letters in some database locales and not in
    others (C); a stored form without non-ASCII capitals compares the same in every one.
    """
    if value.isascii() and not _has_a_label(value):
        return value if is_address(value) else None
    return _international(value)


def address_key(address: str) -> str | None:
    """What suppressions and rate limits compare: the stored form, lower-cased."""
    stored = normalise_address(address)
    return None if stored is None else stored.lower()


def envelope_address(stored: str) -> tuple[str, bool]:
    """(the address as SMTP carries it, whether that needs the relay's SMTPUTF8).

    The domain goes out in A-label form, so an ASCII local part makes a pure ASCII address
    any relay takes; a non-ASCII local part needs SMTPUTF8 whatever the domain.
    """
    if stored.isascii():
        return stored, False
    local, _, domain = stored.rpartition("@")
    if not domain.isascii():
        import idna  # only for an IDN domain: cold start does not pay for it

        domain = idna.encode(domain, uts46=False).decode("ascii")
    return f"{local}@{domain}", not local.isascii()


def _has_a_label(value: str) -> bool:
    domain = value.rpartition("@")[2].lower()
    return domain.startswith("xn--") or ".xn--" in domain


def _international(value: str) -> str | None:
    # Imported here: most addresses are ASCII, and cold start must not grow by the library.
    from email_validator import EmailNotValidError, validate_email

    if len(value) > 254:  # before the library: bounded work for hostile input
        return None
    try:
        checked = validate_email(
            value,
            allow_smtputf8=True,
            allow_empty_local=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            check_deliverability=False,  # no DNS lookups on the delivery path
        )
    except EmailNotValidError:
        return None
    local = checked.local_part
    if not local.isascii():
        local = unicodedata.normalize("NFC", local.lower())
    stored = f"{local}@{checked.domain}"
    valid = (
        len(stored) <= 254
        and len(local) <= 64
        and _DOMAIN.fullmatch(checked.ascii_domain) is not None
    )
    return stored if valid else None
