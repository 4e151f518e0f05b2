"""What the provider adapters share: freshness, ids, timestamps, and what `detail` may keep.

Every string an adapter reads from a payload goes through `checked` (by way of `require_str`,
`optional_str`, `event_id`, `recipient`...): a value the ledger cannot store (longer than its
column, a NUL, a lone surrogate) is refused while normalising, as `Malformed` naming the
field, so one bad event is rejected on its own instead of failing in the database.
No crypto here (each adapter imports its own), so this module stays cheap to import.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from worker.core.redact import sanitise
from worker.core.rules import is_delivery_id
from worker.providers.model import Malformed, Refused

# Signed timestamps further than this from now (either way) are refused: a captured request
# cannot be replayed later (docs/webhooks.md).
TOLERANCE_SECONDS = 300
# What `detail` keeps of a provider's diagnostic text: enough for support, never a body.
MAX_DIAGNOSTIC = 200
# The longest value each column of email.provider_events takes (migration 002).
MAX_EVENT_ID = 500
MAX_RELAY_ID = 500
MAX_RECIPIENT = 254
MAX_BOUNCE_TYPE = 100
# Any other text read from a payload (an event name, a status, a type): one short line.
MAX_TEXT = 254

Setting = Callable[[str], str | None]
Clock = Callable[[], float]

# No NUL and no lone surrogate: PostgreSQL stores neither.
_MESSAGE_ID = re.compile(r"<?([^<>\s\x00\ud800-\udfff]{1,500})>?")


def check_fresh(timestamp: str, clock: Clock = time.time) -> None:
    """Refuse a signed timestamp (Unix seconds) that is stale, far in the future or not one."""
    try:
        seconds = float(timestamp)
    except ValueError:
        raise Refused(403, "signature timestamp is not a number") from None
    if not abs(clock() - seconds) <= TOLERANCE_SECONDS:  # also refuses NaN
        raise Refused(403, "signature timestamp is outside the 5 minute window")


def json_body(body: bytes) -> Any:
    """The parsed body, or `Malformed`. Besides text that is not JSON (or not UTF-8), the
    parser refuses with ValueError an integer of more than 4,300 digits and with
    RecursionError arrays or objects nested deeper than its stack: both are bad input."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise Malformed("body", "is not JSON") from None


def checked(value: str, field: str, limit: int = MAX_TEXT) -> str:
    """`value` if the ledger can store it: at most `limit` characters, no NUL (text and
    jsonb refuse it) and no lone surrogate (not encodable as UTF-8)."""
    if len(value) > limit:
        raise Malformed(field, f"must be at most {limit} characters")
    if "\x00" in value:
        raise Malformed(field, "must not contain NUL")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Malformed(field, "must be valid Unicode") from None
    return value


def require_mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Malformed(field, "must be an object")
    return value


def require_str(
    mapping: Mapping[str, Any], key: str, field: str | None = None, limit: int = MAX_TEXT
) -> str:
    value = optional_str(mapping, key, field, limit)
    if value is None:
        raise Malformed(field or key, "must be a non-empty string")
    return value


def optional_str(
    mapping: Mapping[str, Any], key: str, field: str | None = None, limit: int = MAX_TEXT
) -> str | None:
    """The stripped string at `key`, None when absent, empty or not a string; `Malformed`
    when the ledger could not store it."""
    return optional_text(mapping.get(key), field or key, limit)


def optional_text(value: Any, field: str, limit: int = MAX_TEXT) -> str | None:
    if isinstance(value, str) and value.strip():
        return checked(value.strip(), field, limit)
    return None


def event_id(mapping: Mapping[str, Any], key: str, field: str | None = None) -> str:
    """The provider's own id of an event (`provider_event_id`)."""
    return require_str(mapping, key, field, MAX_EVENT_ID)


def relay_message_id(mapping: Mapping[str, Any], key: str, field: str | None = None) -> str | None:
    """The provider's own id of the message (`relay_message_id`)."""
    return optional_str(mapping, key, field, MAX_RELAY_ID)


def recipient(value: Any, field: str) -> str | None:
    """The address an event is about, if it names one."""
    return optional_text(value, field, MAX_RECIPIENT)


def bounce_kind(value: Any, field: str) -> str | None:
    """A provider's word for a bounce, kept as `bounce_type`."""
    return optional_text(value, field, MAX_BOUNCE_TYPE)


def unix_time(value: Any, field: str) -> datetime:
    """Seconds since the epoch (int, float or their text) as an aware UTC datetime."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Malformed(field, "must be Unix seconds")
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise Malformed(field, "must be Unix seconds") from None


def iso_time(value: Any, field: str) -> datetime:
    """ISO 8601 with an offset or `Z` (Postmark sends 7 fractional digits; 3.11 reads them)."""
    if not isinstance(value, str):
        raise Malformed(field, "must be an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise Malformed(field, "must be an ISO 8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # providers document UTC when no offset is given
    return parsed


def delivery_id(value: Any) -> str | None:
    """A delivery id the worker attached, if it still looks like one."""
    return value if is_delivery_id(value) else None


def message_id(value: Any) -> str | None:
    """A Message-ID as the worker wrote it, `<local@domain>`, with or without the brackets."""
    if not isinstance(value, str):
        return None
    match = _MESSAGE_ID.fullmatch(value.strip())
    return f"<{match.group(1)}>" if match else None


def digest_id(*parts: Any) -> str:
    """A stable event id for providers that give none (Postmark's deliveries, opens, clicks):
    the same report sent twice gets the same id, so it is stored once."""
    text = json.dumps([str(part) for part in parts], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:40]


def diagnostic(value: Any) -> str | None:
    """A provider's diagnostic text, one short line, links and addresses masked."""
    if value is None:
        return None
    if isinstance(value, list):
        value = "; ".join(str(item) for item in value)
    text = sanitise(str(value), MAX_DIAGNOSTIC)
    # sanitise drops NUL with the other control characters; a lone surrogate is replaced.
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text or None


def user_agent_class(user_agent: Any) -> str | None:
    """What kind of client opened or clicked: a class, never the user-agent string itself."""
    if not isinstance(user_agent, str) or not user_agent:
        return None
    lowered = user_agent.lower()
    # An image proxy fetched it (Gmail's from ggpht.com): the open says little of the reader.
    if "proxy" in lowered or "ggpht.com" in lowered:
        return "proxy"
    if any(word in lowered for word in ("iphone", "ipad", "android", "mobile")):
        return "mobile"
    if any(word in lowered for word in ("bot", "crawler", "spider", "scanner")):
        return "bot"
    return "desktop"


def compact(detail: Mapping[str, Any]) -> dict[str, Any]:
    """`detail` without empty values."""
    return {key: value for key, value in detail.items() if value not in (None, "", [], {})}
