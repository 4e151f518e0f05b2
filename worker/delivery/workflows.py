"""The workflow registry (docs/reference.md): which template variables each workflow needs.

Adding a workflow takes two steps:

1. a template folder `worker/delivery/templates/<name>/en/` holding `subject.txt`, `body.txt` and
   `body.html` (more locales beside `en` as wanted), and
2. one `Workflow` entry in `WORKFLOWS` below, listing its required and optional variables.

`events.parse_delivery` checks every required variable, and every optional one that is
present and not null, with the `check` given here. A `rule` is shown to the publisher when a
check fails, so it describes what is wanted and never contains a value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
MAX_NAME_LENGTH = 200

# RFC 3986 characters only: anything else (spaces, quotes, angle brackets, non-ASCII) must be
# percent-encoded by the publisher, so a link can never break out of its line or attribute.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", re.ASCII)
_CODE = re.compile(r"[A-Za-z0-9]{4,12}", re.ASCII)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
# RFC 3339 section 5.6 date-time; the offset is required (a time without one is ambiguous).
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
# An RFC 2047 encoded-word starts with `=?`: a mail reader decodes `=?utf-8?b?...?=` in a
# subject into whatever it encodes (a bidi override, a line break), past the checks below.
_ENCODED_WORD_START = "=?"
# Bidi embeddings, overrides and isolates can make a name display as something else.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class Variable:
    name: str
    rule: str
    check: Callable[[Any], bool]


@dataclass(frozen=True)
class Workflow:
    name: str
    required: tuple[Variable, ...]
    optional: tuple[Variable, ...] = ()


def is_code(value: Any) -> bool:
    return isinstance(value, str) and _CODE.fullmatch(value) is not None


def is_minutes(value: Any) -> bool:
    # bool is an int subclass; `true` is not a number of minutes.
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10080


def is_expiry(value: Any) -> bool:
    """A date `YYYY-MM-DD`, or an RFC 3339 date-time with an offset (`...T12:00:00Z`)."""
    return expiry_date(value) is not None


def expiry_date(value: Any) -> date | None:
    """The day an expiry falls on: the date itself, or a date-time's date in UTC (the
    recipient's time zone is unknown here; the publisher who wants another day sends a date).
    None when `value` is neither form."""
    return _iso_date(value) or _rfc3339_utc_date(value)


def _iso_date(value: Any) -> date | None:
    if not isinstance(value, str) or _ISO_DATE.fullmatch(value) is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:  # 2030-02-30
        return None


def _rfc3339_utc_date(value: Any) -> date | None:
    moment = rfc3339(value)
    return None if moment is None else moment.date()


def rfc3339(value: Any) -> datetime | None:
    """An RFC 3339 date-time with an offset, in UTC (fractions beyond microseconds cut);
    None when `value` is not one."""
    if not isinstance(value, str):
        return None
    match = _RFC3339.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    micro = int((match.group(7) or "0")[:6].ljust(6, "0"))
    sign, offset_hours, offset_minutes = match.group(9, 10, 11)
    hours, minutes = int(offset_hours or 0), int(offset_minutes or 0)
    if hours > 23 or minutes > 59:
        return None
    offset = timedelta(hours=hours, minutes=minutes)
    try:
        zone = timezone(-offset if sign == "-" else offset)
        moment = datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # 2030-02-30, 25:00, or out of range in UTC
        return None


def is_web_url(value: Any) -> bool:
    """An absolute http(s) URL with a host, no user info, RFC 3986 characters only."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_URL_LENGTH:
        return False
    if _URL_CHARS.fullmatch(value) is None:
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    # "https://good.example@evil.example/" shows one host and links to another.
    return (
        parts.scheme.lower() in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
    )


def _is_plain_text(value: str) -> bool:
    """No control characters, line breaks, bidi controls or encoded-words: the text may end
    up in a subject line."""
    if _ENCODED_WORD_START in value:
        return False
    return not any(
        unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS for ch in value
    )


def text(max_length: int, *, allow_empty: bool) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, str) or len(value) > max_length:
            return False
        if not allow_empty and not value.strip():
            return False
        return _is_plain_text(value)

    return check


_EXPIRES_IN_MINUTES = Variable(
    "expires_in_minutes", "must be a whole number of minutes from 1 to 10080", is_minutes
)


def _url(name: str) -> Variable:
    rule = (
        f"must be an absolute http(s) URL with a host, at most {MAX_URL_LENGTH} characters, "
        "no user info, no spaces or characters outside RFC 3986 (percent-encode them)"
    )
    return Variable(name, rule, is_web_url)


def _name(name: str, *, allow_empty: bool) -> Variable:
    size = "at most" if allow_empty else "1 to"
    rule = (
        f"must be a string of {size} {MAX_NAME_LENGTH} characters without control characters, "
        "bidi controls or '=?' (RFC 2047 encoded-words)"
    )
    return Variable(name, rule, text(MAX_NAME_LENGTH, allow_empty=allow_empty))


WORKFLOWS: dict[str, Workflow] = {
    workflow.name: workflow
    for workflow in (
        Workflow(
            name="verification-code",
            required=(Variable("code", "must be 4 to 12 ASCII letters or digits", is_code),),
            optional=(_EXPIRES_IN_MINUTES,),
        ),
        Workflow(
            name="invite",
            required=(_url("invite_url"), _name("organization_name", allow_empty=False)),
            optional=(
                _name("inviter_name", allow_empty=True),
                Variable(
                    "expires_at",
                    "must be a date as YYYY-MM-DD or an RFC 3339 date-time with an offset",
                    is_expiry,
                ),
            ),
        ),
        Workflow(
            name="password-reset",
            required=(_url("reset_url"),),
            optional=(_EXPIRES_IN_MINUTES,),
        ),
    )
}
