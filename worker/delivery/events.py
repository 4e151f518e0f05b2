"""CloudEvent -> `PubSubMessage` -> `DeliveryEvent` (docs/reference.md). Pure: no I/O.

`read_message` unwraps the Pub/Sub envelope, `parse_delivery` checks the delivery fields and
the workflow's template variables. Anything wrong raises `InvalidEvent`, never another
exception, and the error keeps the original message so the pipeline can dead-letter its bytes.

Error texts name a field and a rule, never a value: `data` holds codes and links, and the
other fields can be arbitrarily large or hostile.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from types import MappingProxyType
from typing import Any

from worker.core.rules import DELIVERY_ID_RULE, RECIPIENT_RULE, is_delivery_id, normalise_address
from worker.core.tracing import trace_id
from worker.delivery.workflows import WORKFLOWS, Workflow, expiry_date, is_minutes, rfc3339

# A delivery event is a few hundred bytes; a larger one is an invalid event, dead-lettered
# with its bytes unchanged (and `replay` does not put it back: it would fail again).
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_METADATA_BYTES = 16 * 1024
# Deep enough for any real template data or metadata; bounds the walks below.
MAX_DEPTH = 32
DEFAULT_LOCALE = "en"

_LOCALE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}", re.ASCII)


@dataclass(frozen=True)
class PubSubMessage:
    # The payload holds codes and links: keep it out of reprs.
    data: bytes = field(repr=False)
    attributes: dict[str, str]
    message_id: str
    publish_time: str | None = None
    subscription: str | None = None
    delivery_attempt: int | None = None
    trace: str | None = None

    @property
    def published_at(self) -> datetime | None:
        """When Pub/Sub accepted this copy; None when the envelope did not say (or said
        something that is not an RFC 3339 date-time: Pub/Sub's field, not the publisher's,
        so it never makes the event invalid)."""
        return rfc3339(self.publish_time)


@dataclass(frozen=True)
class DeliveryEvent:
    delivery_id: str
    workflow: str
    recipient: str
    data: Mapping[str, Any] = field(repr=False)
    metadata: dict[str, Any] | None
    locale: str
    message: PubSubMessage = field(repr=False)
    # The event's own `not_after`: the email is pointless from then on.
    not_after: datetime | None = None

    @property
    def valid_until(self) -> datetime | None:
        """The validity end this copy gives the delivery: its `not_after`; else its publish
        time plus `data.expires_in_minutes` (a code, a reset link); else the invite's
        `data.expires_at` (a date alone: the end of that day, UTC); else None. The ledger
        keeps the earliest any copy gave, so a later copy never extends it."""
        if self.not_after is not None:
            return self.not_after
        minutes = self.data.get("expires_in_minutes")
        if isinstance(minutes, int) and is_minutes(minutes):
            published = self.message.published_at
            return None if published is None else published + timedelta(minutes=minutes)
        return _end_of(self.data.get("expires_at"))


class InvalidEvent(Exception):
    """A permanent problem with an event. `str(error)` is `"<field>: <rule>"`, with no values."""

    def __init__(
        self,
        field: str,
        rule: str,
        *,
        delivery_id: str | None = None,
        workflow: str | None = None,
        message: PubSubMessage | None = None,
    ) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule
        self.delivery_id = delivery_id
        self.workflow = workflow
        self.message = message


def decode(cloud_event: Any) -> DeliveryEvent:
    return parse_delivery(read_message(cloud_event))


# --- the Pub/Sub envelope -------------------------------------------------------------------


def read_message(cloud_event: Any) -> PubSubMessage:
    """Unwrap a `messagePublished` CloudEvent.

    Eventarc sends `{"message": {...}, "subscription": ...}` with both camelCase and
    snake_case keys; functions-framework, converting a raw Pub/Sub push, sends
    `{"message": {"data", "attributes", "messageId", "publishTime"}}` with no subscription
    and uses the message id as the CloudEvent id.
    """
    envelope = getattr(cloud_event, "data", None)
    event_id = _str_or_none(_ce_attribute(cloud_event, "id")) or ""
    trace = trace_id(_ce_attribute(cloud_event, "traceparent"))
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("message"), Mapping):
        raw = _raw_bytes(envelope) if not isinstance(envelope, Mapping) else b""
        stub = PubSubMessage(data=raw, attributes={}, message_id=event_id, trace=trace)
        raise InvalidEvent("message", "the event must carry a Pub/Sub message", message=stub)
    body: Mapping[str, Any] = envelope["message"]
    message = PubSubMessage(
        data=b"",
        attributes=_attributes(body.get("attributes")),
        message_id=_first_str(body, "messageId", "message_id") or event_id,
        # The CloudEvent's `time` is the publish time too, when the message does not say.
        publish_time=_first_str(body, "publishTime", "publish_time")
        or _str_or_none(_ce_attribute(cloud_event, "time")),
        subscription=_str_or_none(envelope.get("subscription")),
        delivery_attempt=_delivery_attempt(envelope, body),
        trace=trace,
    )
    return _with_data(message, body.get("data"))


def _with_data(message: PubSubMessage, encoded: Any) -> PubSubMessage:
    # A message without data is legal in Pub/Sub (attributes only): it is an empty payload.
    if encoded is None:
        return message
    if not isinstance(encoded, str):
        raise InvalidEvent("message.data", "must be a base64 string", message=message)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        kept = replace(message, data=_raw_bytes(encoded))
        raise InvalidEvent("message.data", "must be valid base64", message=kept) from None
    return replace(message, data=raw)


def _raw_bytes(value: Any) -> bytes:
    """Whatever bytes an undecodable payload had, for the dead-letter topic."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        # JSON strings may hold lone surrogates; keep them rather than fail here.
        return value.encode("utf-8", errors="surrogatepass")
    return b""


def _ce_attribute(cloud_event: Any, name: str) -> Any:
    try:
        return cloud_event.get(name)
    except (AttributeError, KeyError, TypeError):
        return None


def _attributes(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _delivery_attempt(envelope: Mapping[str, Any], body: Mapping[str, Any]) -> int | None:
    for value in (envelope.get("deliveryAttempt"), body.get("deliveryAttempt")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _first_str(mapping: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = _str_or_none(mapping.get(key))
        if value:
            return value
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --- the delivery payload -------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What an `InvalidEvent` carries besides field and rule."""

    message: PubSubMessage
    delivery_id: str | None = None
    workflow: str | None = None

    def error(self, field: str, rule: str) -> InvalidEvent:
        return InvalidEvent(
            field,
            rule,
            delivery_id=self.delivery_id,
            workflow=self.workflow,
            message=self.message,
        )


def parse_delivery(message: PubSubMessage) -> DeliveryEvent:
    """Check every rule of docs/reference.md and return the event, or raise `InvalidEvent`."""
    doc = _load_json(message)
    ctx = _Context(message, _valid_delivery_id(doc), _valid_workflow(doc))
    if ctx.delivery_id is None:
        raise ctx.error("delivery_id", f"required: {DELIVERY_ID_RULE}")
    if ctx.workflow is None:
        raise ctx.error("workflow", f"required: one of {', '.join(sorted(WORKFLOWS))}")
    recipient = _recipient(doc.get("recipient"), ctx)
    locale = _locale(doc.get("locale"), ctx)
    data = _data(doc.get("data"), WORKFLOWS[ctx.workflow], ctx)
    metadata = _metadata(doc.get("metadata"), ctx)
    not_after = _not_after(doc.get("not_after"), ctx)
    return DeliveryEvent(
        delivery_id=ctx.delivery_id,
        workflow=ctx.workflow,
        recipient=recipient,
        data=MappingProxyType(data),
        metadata=metadata,
        locale=locale,
        message=message,
        not_after=not_after,
    )


def _load_json(message: PubSubMessage) -> dict[str, Any]:
    def error(rule: str) -> InvalidEvent:
        return InvalidEvent("message.data", rule, message=message)

    if len(message.data) > MAX_PAYLOAD_BYTES:
        raise error(f"must be at most {MAX_PAYLOAD_BYTES} bytes")
    try:
        text = message.data.decode("utf-8")
    except UnicodeDecodeError:
        raise error("must be UTF-8") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        # RecursionError: deeply nested arrays; ValueError also covers NaN/Infinity and
        # integers too long to convert.
        raise error("must be a JSON document (no NaN or Infinity)") from None
    if not isinstance(doc, dict):
        raise error("must be a JSON object")
    return doc


def _reject_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError("number out of range")
    return value


def _valid_delivery_id(doc: Mapping[str, Any]) -> str | None:
    value = doc.get("delivery_id")
    return value if is_delivery_id(value) else None


def _valid_workflow(doc: Mapping[str, Any]) -> str | None:
    value = doc.get("workflow")
    return value if isinstance(value, str) and value in WORKFLOWS else None


def _recipient(value: Any, ctx: _Context) -> str:
    """The address in its stored form (`rules.normalise_address`): what the ledger keeps and
    the claim compares with the suppression list and the rate limit."""
    stored = normalise_address(value) if isinstance(value, str) else None
    if stored is None:
        raise ctx.error("recipient", RECIPIENT_RULE)
    return stored


def _locale(value: Any, ctx: _Context) -> str:
    if value is None:
        return DEFAULT_LOCALE
    if not isinstance(value, str) or _LOCALE.fullmatch(value) is None:
        raise ctx.error("locale", "must be a language tag like en or pt-BR")
    return canonical_locale(value)


def _not_after(value: Any, ctx: _Context) -> datetime | None:
    # null is taken as absent, as for the optional template variables.
    if value is None:
        return None
    moment = rfc3339(value)
    if moment is None:
        raise ctx.error(
            "not_after", "must be an RFC 3339 date-time with an offset (2030-01-31T12:00:00Z)"
        )
    return moment


def _end_of(expires_at: Any) -> datetime | None:
    """An invite's `expires_at` as a moment: a date-time as given, a date alone the end of
    that day in UTC (the next midnight); None when absent."""
    moment = rfc3339(expires_at)
    if moment is not None:
        return moment
    day = expiry_date(expires_at)
    if day is None:
        return None
    try:
        return datetime.combine(day + timedelta(days=1), time(), tzinfo=UTC)
    except OverflowError:  # 9999-12-31: no end a datetime can hold
        return None


def canonical_locale(tag: str) -> str:
    """BCP 47 casing (`pt-br` -> `pt-BR`, `zh-hant` -> `zh-Hant`), matching template folders."""
    language, *rest = tag.split("-")
    subtags = [language.lower()]
    for sub in rest:
        if len(sub) == 2 and sub.isalpha():
            subtags.append(sub.upper())
        elif len(sub) == 4 and sub.isalpha():
            subtags.append(sub.title())
        else:
            subtags.append(sub.lower())
    return "-".join(subtags)


def _data(value: Any, workflow: Workflow, ctx: _Context) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ctx.error("data", "required: a JSON object of template variables")
    for variable in workflow.required:
        if not variable.check(value.get(variable.name)):
            raise ctx.error(f"data.{variable.name}", f"required: {variable.rule}")
    for variable in workflow.optional:
        found = value.get(variable.name)
        # null is taken as absent: many serialisers write optional fields that way.
        if found is not None and not variable.check(found):
            raise ctx.error(f"data.{variable.name}", f"optional, but when given {variable.rule}")
    # After the variables, so a bad one is named; this covers the values no check looks at.
    _check_tree(value, "data", ctx)
    return value


def _metadata(value: Any, ctx: _Context) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ctx.error("metadata", "must be a JSON object when given")
    _check_tree(value, "metadata", ctx)
    # UTF-8 bytes of compact JSON: `é` counts 2, as it is sent, not 6 as `\u00e9`.
    serialised = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if len(serialised) > MAX_METADATA_BYTES:
        raise ctx.error("metadata", f"must be at most {MAX_METADATA_BYTES} bytes serialised")
    return value


def _check_tree(root: Any, name: str, ctx: _Context) -> None:
    """Bounded depth, and strings PostgreSQL jsonb and UTF-8 accept (no NUL, no lone
    surrogates from `\\ud800` escapes). Iterative, so hostile nesting cannot overflow."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ctx.error(name, f"must not nest deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, name, ctx)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_string(value, name, ctx)


def _check_string(value: str, name: str, ctx: _Context) -> None:
    rule = "strings must be valid Unicode without NUL characters"
    if "\x00" in value:
        raise ctx.error(name, rule)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ctx.error(name, rule) from None
