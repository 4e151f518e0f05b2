"""What the console shows, decided without I/O: query parameters parsed into searches, rows
shaped into the API's stable JSON fields, recipients masked.

`BadParameter(name, rule)` names the parameter and the rule, never the value (the value may
be an address, or something built to be echoed). Both the JSON API and the HTML pages use
these functions, so a page never shows what the API would hide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from worker.console.cursors import BadCursor, Cursors
from worker.core.redact import mask_addresses, mask_email
from worker.core.rules import DELIVERY_ID_RULE, is_delivery_id, normalise_address
from worker.store.console import DeliverySearch, Page, StatsResult, SuppressionSearch
from worker.store.ledger import Status
from worker.store.reports import parse_duration

MAX_ADDRESS = 254
MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_STATS_WINDOW = timedelta(days=366)
SUPPRESSION_REASONS = ("hard_bounce", "complaint", "manual")
CHART_BUCKETS = 24
CURSOR_RULE = "must be a next_cursor value from an earlier page of the same list"
T = TypeVar("T")


class BadParameter(ValueError):
    """A query parameter the console refuses: 400, naming the parameter and the rule."""

    def __init__(self, parameter: str, rule: str) -> None:
        super().__init__(f"{parameter}: {rule}")
        self.parameter = parameter
        self.rule = rule


# --- parameters -----------------------------------------------------------------------------


def no_nul(params: Mapping[str, str]) -> None:
    """PostgreSQL text cannot hold NUL: refused here as a bad parameter, not left to fail
    in the database."""
    for name, value in params.items():
        if "\0" in name or "\0" in value:
            raise BadParameter(name.replace("\0", ""), "must not contain NUL characters")


def only(params: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    """An unknown parameter is refused rather than ignored: a typo (`recipeint=`) would
    otherwise silently widen a search."""
    for name in params:
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter (known: {', '.join(allowed)})")


def delivery_id(text: str, parameter: str = "delivery_id") -> str:
    if not is_delivery_id(text):
        raise BadParameter(parameter, f"must be {DELIVERY_ID_RULE}")
    return text


def address(text: str, parameter: str) -> str:
    """The address to search for: its stored form (`rules.normalise_address`), so either
    spelling of an IDN domain finds the same rows. Something the worker would not accept is
    searched as written: it may still name a row the webhooks stored."""
    text = text.strip()
    local, at, domain = text.rpartition("@")
    if not (at and local and domain) or len(text) > MAX_ADDRESS or any(c.isspace() for c in text):
        raise BadParameter(parameter, f"must be one email address of at most {MAX_ADDRESS} chars")
    return normalise_address(text) or text


def limit(params: Mapping[str, str]) -> int:
    text = params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    # The length first: int() of thousands of digits raises instead of answering.
    digits = len(text) <= 3 and text.isascii() and text.isdigit()
    if not digits or not 1 <= int(text) <= MAX_LIMIT:
        raise BadParameter("limit", f"must be an integer 1..{MAX_LIMIT}")
    return int(text)


def since(params: Mapping[str, str], *, default: str | None = None) -> tuple[str, timedelta] | None:
    """(the window as written, its length), or None when absent and there is no default."""
    text = params.get("since", default)
    if text is None:
        return None
    try:
        window = parse_duration(text)
    except ValueError:
        raise BadParameter("since", "must be a duration like 30m, 24h, 7d or 90d") from None
    if window > MAX_STATS_WINDOW:
        raise BadParameter("since", "must be at most 366d")
    return text.strip().lower(), window


def stats_window(params: Mapping[str, str]) -> tuple[str, timedelta]:
    """The stats' window: `since`, the last day by default."""
    only(params, ("since",))
    window = since(params, default="24h")
    assert window is not None  # there is a default
    return window


def status(params: Mapping[str, str]) -> str | None:
    text = params.get("status")
    if text is None:
        return None
    values = [s.value for s in Status]
    if text not in values:
        raise BadParameter("status", f"must be one of {', '.join(values)}")
    return text


def workflow(params: Mapping[str, str]) -> str | None:
    text = params.get("workflow")
    if text is None:
        return None
    if not 1 <= len(text) <= 100:
        raise BadParameter("workflow", "must be 1..100 characters")
    return text


def boolean(params: Mapping[str, str], name: str) -> bool | None:
    text = params.get(name)
    if text is None:
        return None
    if text not in ("true", "false"):
        raise BadParameter(name, "must be true or false")
    return text == "true"


def cursor(params: Mapping[str, str], read: Callable[[str], T]) -> T | None:
    """Where the page starts: `cursor` as read by `read` (one of `Cursors`' readers, for the
    list being paged), or None for the first page."""
    text = params.get("cursor")
    if text is None:
        return None
    try:
        return read(text)
    except BadCursor:
        raise BadParameter("cursor", CURSOR_RULE) from None


def delivery_search(params: Mapping[str, str], now: datetime, cursors: Cursors) -> DeliverySearch:
    only(params, ("recipient", "workflow", "status", "since", "limit", "cursor"))
    recipient = params.get("recipient")
    window = since(params)
    return DeliverySearch(
        recipient=None if recipient is None else address(recipient, "recipient"),
        workflow=workflow(params),
        status=status(params),
        since=None if window is None else now - window[1],
        after=cursor(params, cursors.delivery_after),
        limit=limit(params),
    )


def suppression_search(params: Mapping[str, str], cursors: Cursors) -> SuppressionSearch:
    only(params, ("address", "reason", "active", "limit", "cursor"))
    text = params.get("address")
    reason = params.get("reason")
    if reason is not None and reason not in SUPPRESSION_REASONS:
        raise BadParameter("reason", f"must be one of {', '.join(SUPPRESSION_REASONS)}")
    return SuppressionSearch(
        address=None if text is None else address(text, "address"),
        reason=reason,
        active=boolean(params, "active"),
        after=cursor(params, cursors.suppression_after),
        limit=limit(params),
    )


# --- rows as JSON ---------------------------------------------------------------------------


def shown_address(stored: str | None, searched: str | None) -> tuple[str | None, bool]:
    """(what to show, whether it is masked): the full address only to whoever searched for
    exactly that address."""
    if stored is None:
        return None, False
    if searched is not None and stored.lower() == searched.lower():
        return stored, False
    return mask_email(stored), True


# The stable fields of a delivery in the API (README "Support console"); the provider ones
# are null until the first provider event.
DELIVERY_FIELDS = (
    "delivery_id",
    "workflow",
    "locale",
    "status",
    "status_reason",
    "attempts",
    "replays",
    "last_error_code",
    "last_error_message",
    "last_attempted_at",
    "queued_at",
    "sent_at",
    "lease_expires_at",
    "provider_message_id",
    "relay_message_id",
    "source_message_id",
    "provider_status",
    "delivered_at",
    "opened_at",
    "clicked_at",
    "bounced_at",
    "complained_at",
    "bounce_type",
    "created_at",
    "updated_at",
)


def delivery_json(row: Mapping[str, Any], searched: str | None = None) -> dict[str, Any]:
    recipient, masked = shown_address(row.get("recipient"), searched)
    doc = {name: _plain(row.get(name)) for name in DELIVERY_FIELDS}
    doc["recipient"] = recipient
    doc["recipient_masked"] = masked
    return doc


def event_json(row: Mapping[str, Any]) -> dict[str, Any]:
    payload = row["payload"] or {}
    return {
        "id": row["id"],
        "status": row["status"],
        "from": payload.get("from"),
        "reason": payload.get("reason"),
        "attempt": row["attempt"],
        "error_code": row["error_code"],
        "error_message": row["error_message"],
        "payload": _masked(payload),
        "created_at": _plain(row["created_at"]),
    }


def provider_event_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "provider": row["provider"],
        "provider_event_id": row["provider_event_id"],
        "event_type": row["event_type"],
        "occurred_at": _plain(row["occurred_at"]),
        "received_at": _plain(row["received_at"]),
        "bounce_type": row["bounce_type"],
        # A bounce's diagnostic may quote the recipient: masked like everywhere else.
        "detail": _masked(row["detail"] or {}),
    }


def suppression_json(row: Mapping[str, Any], searched: str | None = None) -> dict[str, Any]:
    shown, masked = shown_address(row["address"], searched)
    return {
        "address": shown,
        "address_masked": masked,
        "reason": row["reason"],
        "delivery_id": row["delivery_id"],
        "created_at": _plain(row["created_at"]),
        "expires_at": _plain(row["expires_at"]),
        "active": row["active"],
    }


def next_cursor(page: Page, sign: Callable[[dict[str, Any]], str]) -> str | None:
    """Where the next (older) page starts, signed by `sign` from the page's last row; None
    on the last page."""
    if not (page.more and page.rows):
        return None
    return sign(page.rows[-1])


def page_json(key: str, items: list[dict[str, Any]], cursor: str | None) -> dict[str, Any]:
    return {key: items, "next_cursor": cursor}


def stats_json(label: str, window: timedelta, result: StatsResult) -> dict[str, Any]:
    step = window / len(result.timeline) if result.timeline else window
    start = datetime.now(UTC) - window
    return {
        "since": label,
        "since_seconds": window.total_seconds(),
        "workflows": [row.as_json() for row in result.workflows],
        "relays": [relay.as_json() for relay in result.relays],
        "timeline": [
            {"start": _plain(start + step * index), **counts}
            for index, counts in enumerate(result.timeline)
        ],
    }


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return value


def _masked(value: Any) -> Any:
    """Addresses inside stored JSON (payloads, provider details) masked, recursively."""
    if isinstance(value, str):
        return mask_addresses(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value
