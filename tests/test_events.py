"""worker.delivery.events: the envelope, every field rule of docs/reference.md, and robustness."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import flask
import pytest
from cloudevents.http import CloudEvent
from functions_framework import event_conversion
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.delivery.events import (
    MAX_METADATA_BYTES,
    MAX_PAYLOAD_BYTES,
    DeliveryEvent,
    InvalidEvent,
    PubSubMessage,
    decode,
    parse_delivery,
    read_message,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
SUBSCRIPTION = "projects/p/subscriptions/deliveries"
CE_ATTRIBUTES = {
    "type": "google.cloud.pubsub.topic.v1.messagePublished",
    "source": "//pubsub.googleapis.com/projects/p/topics/deliveries",
    "id": "ce-id-1",
}

VALID_DATA: dict[str, dict[str, Any]] = {
    "verification-code": {"code": "A1B2C3", "expires_in_minutes": 10},
    "invite": {
        "organization_name": "Acme",
        "inviter_name": "Grace",
        "invite_url": "https://app.example.com/i/abc",
        "expires_at": "2030-01-31",
    },
    "password-reset": {
        "reset_url": "https://app.example.com/reset?t=abc",
        "expires_in_minutes": 30,
    },
}


def delivery(kind: str = "verification-code", **overrides: Any) -> dict[str, Any]:
    """A valid delivery of workflow `kind`, with top-level fields replaced by `overrides`."""
    doc: dict[str, Any] = {
        "delivery_id": "del_1",
        "workflow": kind,
        "recipient": "ada@example.com",
        "data": dict(VALID_DATA[kind]),
        "metadata": {"source": "tests"},
        "locale": "en",
    }
    doc.update(overrides)
    return doc


def with_data(workflow: str = "verification-code", **variables: Any) -> dict[str, Any]:
    return delivery(workflow, data={**VALID_DATA[workflow], **variables})


def message(payload: bytes | dict[str, Any]) -> PubSubMessage:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return PubSubMessage(data=raw, attributes={}, message_id="m1")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def eventarc(envelope: Any, **attributes: str) -> CloudEvent:
    return CloudEvent({**CE_ATTRIBUTES, **attributes}, envelope)


def eventarc_event(raw: bytes, **attributes: str) -> CloudEvent:
    """The shape Eventarc delivers: camelCase and snake_case keys, and the subscription."""
    body = {
        "data": b64(raw),
        "attributes": {"origin": "tests"},
        "messageId": "111",
        "message_id": "111",
        "publishTime": "2024-05-01T10:00:00.000Z",
        "publish_time": "2024-05-01T10:00:00.000Z",
    }
    return eventarc({"message": body, "subscription": SUBSCRIPTION}, **attributes)


def pushed_event(raw: bytes) -> CloudEvent:
    """A raw Pub/Sub push (the emulator), converted by functions-framework's own code."""
    push = {
        "message": {
            "data": b64(raw),
            "attributes": {"origin": "emulator"},
            "messageId": "222",
            "publishTime": "2024-05-01T10:00:00Z",
        },
        "subscription": SUBSCRIPTION,
    }
    app = flask.Flask(__name__)
    with app.test_request_context("/projects/p/topics/deliveries", method="POST", json=push):
        return event_conversion.background_event_to_cloud_event(flask.request)


def rejected(payload: bytes | dict[str, Any]) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_delivery(message(payload))
    return info.value


# --- the envelope ---------------------------------------------------------------------------


def test_eventarc_shape() -> None:
    raw = json.dumps(delivery()).encode()
    msg = read_message(eventarc_event(raw, traceparent=TRACEPARENT))
    assert msg.data == raw
    assert msg.attributes == {"origin": "tests"}
    assert msg.message_id == "111"
    assert msg.publish_time == "2024-05-01T10:00:00.000Z"
    assert msg.subscription == SUBSCRIPTION
    assert msg.trace == TRACE_ID
    assert decode(eventarc_event(raw)).delivery_id == "del_1"


def test_raw_push_converted_by_functions_framework() -> None:
    raw = json.dumps(delivery()).encode()
    msg = read_message(pushed_event(raw))
    assert msg.data == raw
    assert msg.attributes == {"origin": "emulator"}
    assert msg.message_id == "222"
    assert msg.publish_time == "2024-05-01T10:00:00Z"
    assert msg.trace is None
    assert decode(pushed_event(raw)).recipient == "ada@example.com"


def test_snake_case_keys_and_fallback_ids() -> None:
    body = {"data": b64(b"{}"), "message_id": "333", "publish_time": "t"}
    msg = read_message(eventarc({"message": body, "deliveryAttempt": 4}))
    assert (msg.message_id, msg.publish_time, msg.delivery_attempt) == ("333", "t", 4)
    assert msg.subscription is None
    assert read_message(eventarc({"message": {"data": ""}})).message_id == "ce-id-1"


@pytest.mark.parametrize(
    "traceparent",
    ["garbage", f"00-{'0' * 32}-b7ad6b7169203331-01", TRACEPARENT.upper(), ""],
)
def test_bad_traceparent_is_ignored(traceparent: str) -> None:
    assert read_message(eventarc_event(b"{}", traceparent=traceparent)).trace is None


def test_non_string_attributes_are_dropped() -> None:
    body = {"data": "", "attributes": {"ok": "1", "n": 2}}
    assert read_message(eventarc({"message": body})).attributes == {"ok": "1"}
    assert read_message(eventarc({"message": {"attributes": ["x"]}})).attributes == {}


@pytest.mark.parametrize("envelope", [None, {}, {"message": "x"}, {"subscription": SUBSCRIPTION}])
def test_envelope_without_message(envelope: Any) -> None:
    with pytest.raises(InvalidEvent) as info:
        read_message(eventarc(envelope))
    assert info.value.field == "message"
    assert info.value.message is not None
    assert info.value.message.data == b""
    assert info.value.message.message_id == "ce-id-1"


def test_non_json_cloud_event_data_keeps_its_bytes() -> None:
    with pytest.raises(InvalidEvent) as info:
        read_message(eventarc(b"\x00raw bytes"))
    assert info.value.message is not None
    assert info.value.message.data == b"\x00raw bytes"


@pytest.mark.parametrize("encoded", ["not base64!", "abc", "QQ=", "\ud800x"])
def test_invalid_base64_keeps_the_string(encoded: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(eventarc({"message": {"data": encoded, "messageId": "9"}}))
    err = info.value
    assert err.field == "message.data"
    assert err.message is not None
    assert err.message.data == encoded.encode("utf-8", "surrogatepass")
    assert err.message.message_id == "9"


def test_non_string_data_and_missing_data() -> None:
    with pytest.raises(InvalidEvent) as info:
        read_message(eventarc({"message": {"data": 12}}))
    assert info.value.field == "message.data"
    assert info.value.message is not None and info.value.message.data == b""
    # Pub/Sub allows attribute-only messages: empty data, rejected by parse_delivery.
    with pytest.raises(InvalidEvent) as parsed:
        decode(eventarc({"message": {"attributes": {"a": "b"}}}))
    assert parsed.value.field == "message.data"


# --- the payload ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",  # a BOM
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b"[]",
        b'"text"',
        b"null",
        b'{"delivery_id": NaN}',
        b'{"delivery_id": Infinity}',
        b'{"n": 1e999}',
        b'{"n": ' + b"1" * 5000 + b"}",
        b'{"a": 1} trailing',
        b" " * (MAX_PAYLOAD_BYTES + 1),
    ],
)
def test_payload_must_be_a_small_json_object(payload: bytes) -> None:
    err = rejected(payload)
    assert err.field == "message.data"
    assert err.message is not None and err.message.data == payload
    assert err.delivery_id is None and err.workflow is None


def test_a_delivery_event_is_at_most_64_kib() -> None:
    raw = json.dumps(delivery()).encode()
    for size, valid in ((64 * 1024, True), (64 * 1024 + 1, False)):
        padded = raw[:-1] + b" " * (size - len(raw)) + b"}"
        if valid:
            assert parse_delivery(message(padded)).delivery_id == "del_1"
        else:
            err = rejected(padded)
            assert (str(err), err.message and err.message.data) == (
                "message.data: must be at most 65536 bytes",
                padded,
            )


def test_payload_at_the_size_limit_is_accepted() -> None:
    raw = json.dumps(delivery()).encode()
    padded = raw[:-1] + b" " * (MAX_PAYLOAD_BYTES - len(raw)) + b"}"
    assert len(padded) == MAX_PAYLOAD_BYTES
    assert parse_delivery(message(padded)).delivery_id == "del_1"


def test_valid_event_fields() -> None:
    event = parse_delivery(message(delivery("invite", metadata={"k": [1, {"x": None}]})))
    assert isinstance(event, DeliveryEvent)
    assert (event.delivery_id, event.workflow, event.recipient) == (
        "del_1",
        "invite",
        "ada@example.com",
    )
    assert dict(event.data) == VALID_DATA["invite"]
    assert event.metadata == {"k": [1, {"x": None}]}
    assert event.locale == "en"
    assert event.message.message_id == "m1"


def test_duplicate_keys_take_the_last() -> None:
    raw = json.dumps(delivery())[:-1] + ', "delivery_id": "second"}'
    assert parse_delivery(message(raw.encode())).delivery_id == "second"


def test_unknown_top_level_keys_are_ignored() -> None:
    assert parse_delivery(message(delivery(extra=[[[]]]))).delivery_id == "del_1"


@pytest.mark.parametrize("value", ["a", "inv_2f6c9d1e", "A.b_c:d@e-f", "x" * 200])
def test_delivery_id_accepted(value: str) -> None:
    assert parse_delivery(message(delivery(delivery_id=value))).delivery_id == value


@pytest.mark.parametrize(
    "value", ["", "x" * 201, "has space", "slash/", "é", "a\n", 12, None, ["a"]]
)
def test_delivery_id_rejected(value: Any) -> None:
    err = rejected(delivery(delivery_id=value))
    assert err.field == "delivery_id"
    assert err.delivery_id is None
    assert err.workflow == "verification-code"


def test_missing_delivery_id() -> None:
    doc = delivery()
    del doc["delivery_id"]
    assert rejected(doc).field == "delivery_id"


@pytest.mark.parametrize("workflow", ["verification-code", "invite", "password-reset"])
def test_registered_workflows(workflow: str) -> None:
    assert parse_delivery(message(delivery(workflow))).workflow == workflow


@pytest.mark.parametrize("value", ["newsletter", "INVITE", "", None, 3])
def test_unknown_workflow(value: Any) -> None:
    err = rejected(delivery(workflow=value))
    assert err.field == "workflow"
    assert err.delivery_id == "del_1"
    assert err.workflow is None


@pytest.mark.parametrize(
    "value",
    [
        "ada@example.com",
        "Ada.Lovelace+tag@mail.example.co.uk",
        "o'brien@example.org",
        "x@localhost",
        "a!#$%&'*+/=?^_`{|}~-@bücher.example",
        "l" * 64 + "@example.com",
        "a@" + ".".join(["d" * 63] * 3) + ".com",
    ],
)
def test_recipient_accepted(value: str) -> None:
    assert parse_delivery(message(delivery(recipient=value))).recipient == value


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("a!#$%&'*+/=?^_`{|}~-@xn--bcher-kva.example", "a!#$%&'*+/=?^_`{|}~-@bücher.example"),
        ("Ada@XN--BCHER-KVA.example", "Ada@bücher.example"),
        ("Ada@BÜCHER.Example", "Ada@bücher.example"),
        ("adé@example.com", "adé@example.com"),
        ("ade\u0301@example.com", "adé@example.com"),  # NFC
        ("ADÉ@exämple.com", "adé@exämple.com"),  # a non-ASCII local part is lower-cased
        ("用户@例子.广告", "用户@例子.广告"),
    ],
)
def test_an_international_recipient_is_stored_normalised(value: str, stored: str) -> None:
    assert parse_delivery(message(delivery(recipient=value))).recipient == stored


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ada",
        "ada@",
        "@example.com",
        "ada@example",
        "Ada <ada@example.com>",
        "<ada@example.com>",
        '"ada"@example.com',
        "ada@example.com, bob@example.com",
        "ada@example.com\r\nBcc: eve@example.com",
        "ada@example.com\n",
        "ada @example.com",
        " ada@example.com",
        "ada@@example.com",
        "a@b@example.com",
        "ada..l@example.com",
        ".ada@example.com",
        "ada.@example.com",
        "ada@-example.com",
        "ada@example-.com",
        "ada@example..com",
        "ada@[127.0.0.1]",
        "adé@example.com\r\nBcc: eve@example.com",
        "adé @example.com",
        '"adé"@example.com',
        "Adé <adé@example.com>",
        "adé@[127.0.0.1]",
        "adé@localhost",  # localhost: plain ASCII addresses only
        "adé@exämple",
        "ada@xn--zz.example",  # not a valid A-label
        "adé..l@example.com",
        "l" * 65 + "@example.com",
        "a@" + "d" * 64 + ".com",
        "a@" + ".".join(["d" * 60] * 5) + ".com",  # over 254 characters
        None,
        ["ada@example.com"],
    ],
)
def test_recipient_rejected(value: Any) -> None:
    err = rejected(delivery(recipient=value))
    assert err.field == "recipient"
    assert (err.delivery_id, err.workflow) == ("del_1", "verification-code")
    assert "addr-spec" in str(err)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("en", "en"),
        ("fr", "fr"),
        ("pt-BR", "pt-BR"),
        ("pt-br", "pt-BR"),
        ("ZH-hant-tw", "zh-Hant-TW"),
        ("es-419", "es-419"),
        ("fil", "fil"),
        (None, "en"),
    ],
)
def test_locale_accepted(value: str | None, expected: str) -> None:
    assert parse_delivery(message(delivery(locale=value))).locale == expected


def test_locale_defaults_to_en() -> None:
    doc = delivery()
    del doc["locale"]
    assert parse_delivery(message(doc)).locale == "en"


@pytest.mark.parametrize("value", ["", "e", "english", "en_US", "en-", "en-US-x-a-b-c", "../en", 1])
def test_locale_rejected(value: Any) -> None:
    assert rejected(delivery(locale=value)).field == "locale"


@pytest.mark.parametrize("value", [None, "x", [], 1])
def test_data_must_be_an_object(value: Any) -> None:
    assert rejected(delivery(data=value)).field == "data"


def test_data_missing() -> None:
    doc = delivery()
    del doc["data"]
    assert rejected(doc).field == "data"


def test_extra_variables_are_allowed() -> None:
    event = parse_delivery(message(with_data(unused={"deep": [1, 2]})))
    assert event.data["unused"] == {"deep": [1, 2]}


VARIABLE_CASES: list[tuple[str, str, list[Any], list[Any]]] = [
    # workflow, variable, accepted, rejected
    (
        "verification-code",
        "code",
        ["1234", "abcdEF123456", "000000"],
        [
            "123",
            "1234567890123",
            "12 34",
            "12-34",
            "\uff11\uff12\uff13\uff14",
            "",
            None,
            1234,
            "12345\n",
        ],
    ),
    (
        "verification-code",
        "expires_in_minutes",
        [1, 10080, None],
        [0, -1, 10081, 1.5, "10", True, []],
    ),
    ("password-reset", "expires_in_minutes", [15], [0, "15"]),
    (
        "invite",
        "invite_url",
        [
            "https://app.example.com/i/abc",
            "http://localhost:8080/x?y=1&z=%20#f",
            "HTTPS://EXAMPLE.COM",
        ],
        [
            "ftp://example.com/x",
            "/relative/path",
            "https://",
            "https:///path",
            "example.com/x",
            "javascript:alert(1)",
            "https://exa mple.com",
            "https://example.com/\n",
            "https://example.com/é",
            'https://example.com/"><script>',
            "https://user:pw@example.com/",
            "https://good.com@evil.com",
            "https://example.com:99999/",
            "https://example.com/" + "a" * 2048,
            None,
            5,
            "",
        ],
    ),
    (
        "password-reset",
        "reset_url",
        ["https://app.example.com/reset?t=abc"],
        ["mailto:ada@example.com", "https://example.com/\t", None],
    ),
    (
        "invite",
        "organization_name",
        ["Acme", "Ünïcödé GmbH & Co.", "<script>alert(1)</script>", "x" * 200],
        [
            *("", "   ", "x" * 201, "Acme\r\nBcc: x", "Acme\x00", "Acme\u2028", "Acme\u202e"),
            # RFC 2047 encoded-words: a mail reader decodes them in the subject (U+202E here).
            "=?utf-8?b?4oCuZ25wLmV4ZQ==?=",
            "Acme =?UTF-8?Q?=E2=80=AE?=",
            "Acme=?x",
            None,
            3,
        ],
    ),
    (
        "invite",
        "inviter_name",
        ["Grace", "", None, "Why?=Because", "a = b? c"],
        ["x" * 201, "Grace\n", 1, "=?utf-8?q?Grace=0D=0ABcc:_x?=", "=?"],
    ),
    (
        "invite",
        "expires_at",
        [
            *("2030-01-31", "2028-02-29", None),
            # RFC 3339 date-times with an offset.
            *("2026-12-01T12:00:00Z", "2026-12-01t12:00:00.123456789+05:30"),
            "2026-12-01T23:59:59-23:59",
        ],
        # A date or a date-time with an offset: "in 7 days" would render as "expires on in 7
        # days", and a time without an offset falls on a day nobody knows.
        [
            "in 7 days",
            "31 January 2030",
            "2030-01-31T12:00:00",
            "2030-01-31 12:00:00Z",
            "2030-01-31T12:00Z",
            "2030-01-31T12:00:00+24:00",
            "2030-01-31T12:00:00+05:60",
            "2030-01-31T25:00:00Z",
            "2030-02-30T12:00:00Z",
            "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
            "2030-02-30",
            "2030-1-31",
            "\uff12\uff10\uff13\uff10-01-31",  # fullwidth digits
            "",
            20300131,
        ],
    ),
]


@pytest.mark.parametrize(
    ("workflow", "variable", "value"),
    [(w, n, v) for w, n, good, _ in VARIABLE_CASES for v in good],
)
def test_variable_accepted(workflow: str, variable: str, value: Any) -> None:
    event = parse_delivery(message(with_data(workflow, **{variable: value})))
    assert event.data[variable] == value


@pytest.mark.parametrize(
    ("workflow", "variable", "value"),
    [(w, n, v) for w, n, _, bad in VARIABLE_CASES for v in bad],
)
def test_variable_rejected(workflow: str, variable: str, value: Any) -> None:
    err = rejected(with_data(workflow, **{variable: value}))
    assert err.field == f"data.{variable}"
    assert (err.delivery_id, err.workflow) == ("del_1", workflow)
    if isinstance(value, str) and len(value) >= 4:
        assert value not in str(err)


@pytest.mark.parametrize(
    ("workflow", "variable"),
    [
        ("verification-code", "code"),
        ("invite", "invite_url"),
        ("invite", "organization_name"),
        ("password-reset", "reset_url"),
    ],
)
def test_required_variable_missing(workflow: str, variable: str) -> None:
    data = dict(VALID_DATA[workflow])
    del data[variable]
    err = rejected(delivery(workflow, data=data))
    assert err.field == f"data.{variable}"
    assert str(err).startswith(f"data.{variable}: required")


def test_optional_variables_may_be_absent() -> None:
    event = parse_delivery(
        message(
            delivery(
                "invite", data={"organization_name": "Acme", "invite_url": "https://example.com/i"}
            )
        )
    )
    assert "inviter_name" not in event.data


@pytest.mark.parametrize("value", [None, {}, {"a": "b" * 1000}])
def test_metadata_accepted(value: Any) -> None:
    assert parse_delivery(message(delivery(metadata=value))).metadata == value


def test_metadata_absent() -> None:
    doc = delivery()
    del doc["metadata"]
    assert parse_delivery(message(doc)).metadata is None


def test_metadata_size_limit() -> None:
    overhead = len('{"k":""}')
    exact = {"k": "x" * (MAX_METADATA_BYTES - overhead)}
    assert parse_delivery(message(delivery(metadata=exact))).metadata == exact
    err = rejected(delivery(metadata={"k": "x" * (MAX_METADATA_BYTES - overhead + 1)}))
    assert err.field == "metadata"
    # Non-ASCII counts as its UTF-8 bytes: 2 for `é`, so 8000 fit and 8200 do not.
    accents = {"k": "é" * 8000}
    assert parse_delivery(message(delivery(metadata=accents))).metadata == accents
    assert rejected(delivery(metadata={"k": "é" * 8200})).field == "metadata"


@pytest.mark.parametrize(
    "raw_metadata",
    [
        '"text"',
        "[1]",
        "3",
        '{"k": "a\\u0000b"}',
        '{"a\\u0000": 1}',
        '{"k": "\\ud800"}',
        '{"k": ["\\udfff"]}',
        '{"k": ' + "[" * 40 + "]" * 40 + "}",
    ],
)
def test_metadata_rejected(raw_metadata: str) -> None:
    raw = json.dumps(delivery())[:-1] + f', "metadata": {raw_metadata}}}'
    err = rejected(raw.encode())
    assert err.field == "metadata"
    assert err.delivery_id == "del_1"


@pytest.mark.parametrize(
    "raw_data",
    [
        '{"code": "A1B2C3", "x": "\\u0000"}',
        '{"code": "A1B2C3", "x": "\\ud83d"}',
        '{"code": "A1B2C3", "x": ' + "[" * 40 + "]" * 40 + "}",
    ],
)
def test_data_strings_and_depth(raw_data: str) -> None:
    doc = delivery()
    del doc["data"]
    raw = json.dumps(doc)[:-1] + f', "data": {raw_data}}}'
    assert rejected(raw.encode()).field == "data"


def test_surrogate_pair_escapes_are_fine() -> None:
    raw = json.dumps(delivery(metadata={"emoji": "\U0001f600"}), ensure_ascii=True).encode()
    assert parse_delivery(message(raw)).metadata == {"emoji": "\U0001f600"}


# --- what errors and reprs show -------------------------------------------------------------


def test_error_text_is_field_and_rule() -> None:
    err = rejected(delivery(recipient="nope"))
    assert str(err) == f"{err.field}: {err.rule}"
    assert (
        err.message is not None
        and err.message.data == json.dumps(delivery(recipient="nope")).encode()
    )


def test_reprs_hide_data() -> None:
    code = "Zq9SECRET42"
    event = parse_delivery(message(with_data(code=code)))
    assert code not in repr(event)
    assert code not in repr(event.message)


# --- properties: nothing but InvalidEvent, and no data values in messages --------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=30,
)
# Every string from `data` carries this marker, so it can be looked for in error texts.
SENTINEL = "Zq9S3NT"
SECRET_STRINGS = st.text(max_size=20).map(lambda s: SENTINEL + s)
SECRET_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | SECRET_STRINGS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(SECRET_STRINGS, children, max_size=3)
    ),
    max_leaves=10,
)
KEYS = ["delivery_id", "workflow", "recipient", "data", "metadata", "locale"]


def decode_or_invalid(event: CloudEvent) -> InvalidEvent | None:
    try:
        decode(event)
    except InvalidEvent as err:
        return err
    return None


@settings(deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(raw: bytes) -> None:
    # Random bytes are never a valid delivery (a valid one needs four named fields).
    err = decode_or_invalid(eventarc_event(raw))
    assert err is not None and err.message is not None and err.message.data == raw


@settings(deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json(value: Any) -> None:
    raw = json.dumps(value).encode()
    err = decode_or_invalid(eventarc_event(raw))
    assert err is not None and err.message is not None and err.message.data == raw


@settings(deadline=None)
@given(
    st.sampled_from(["verification-code", "invite", "password-reset"]),
    st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=6),
)
def test_real_keys_with_arbitrary_values(workflow: str, overrides: dict[str, Any]) -> None:
    try:
        parse_delivery(message(delivery(workflow, **overrides)))
    except InvalidEvent as err:
        assert err.field in {
            "message.data",
            "data",
            "metadata",
            "locale",
            *KEYS,
        } or err.field.startswith("data.")


@settings(deadline=None)
@given(
    st.sampled_from(["verification-code", "invite", "password-reset"]),
    st.dictionaries(
        st.sampled_from(
            [
                "code",
                "invite_url",
                "reset_url",
                "organization_name",
                "inviter_name",
                "expires_at",
                "expires_in_minutes",
                "other",
            ]
        )
        | SECRET_STRINGS,
        SECRET_VALUES,
        max_size=6,
    ),
    st.sampled_from(
        [{}, {"recipient": "bad"}, {"locale": "!"}, {"metadata": []}, {"delivery_id": ""}]
    ),
)
def test_errors_never_show_data_values(
    workflow: str, data: dict[str, Any], breakage: dict[str, Any]
) -> None:
    doc = delivery(workflow, data=data, **breakage)
    try:
        event = decode(eventarc_event(json.dumps(doc).encode()))
    except InvalidEvent as err:
        assert SENTINEL not in str(err)
        assert SENTINEL not in repr(err)
        assert SENTINEL not in err.field + err.rule
    else:
        assert SENTINEL not in repr(event)


# --- freshness: not_after, the publish time, the validity end ---------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-31T12:00:00Z", datetime(2030, 1, 31, 12, tzinfo=UTC)),
        ("2030-01-31t12:00:00.250z", datetime(2030, 1, 31, 12, 0, 0, 250000, tzinfo=UTC)),
        ("2030-01-31T13:30:00+01:30", datetime(2030, 1, 31, 12, tzinfo=UTC)),
        ("2030-01-31T07:00:00-05:00", datetime(2030, 1, 31, 12, tzinfo=UTC)),
        (None, None),
    ],
)
def test_not_after_accepted(value: str | None, expected: datetime | None) -> None:
    event = parse_delivery(message(delivery(not_after=value)))
    assert event.not_after == expected
    if expected is not None:
        assert event.valid_until == expected  # wins over expires_in_minutes


@pytest.mark.parametrize(
    "value",
    [
        "2030-01-31",  # a date is not a moment
        "2030-01-31T12:00:00",  # no offset: ambiguous
        "2030-01-31 12:00:00Z",
        "2030-02-30T12:00:00Z",
        "2030-01-31T25:00:00Z",
        "2030-01-31T12:00:00+24:00",
        "tomorrow",
        "",
        1893456000,
        True,
        [],
        {},
    ],
)
def test_not_after_rejected(value: Any) -> None:
    error = rejected(delivery(not_after=value))
    assert error.field == "not_after"
    assert error.delivery_id == "del_1"
    assert "RFC 3339" in error.rule


def published(raw: bytes, publish_time: str | None, time: str | None = None) -> DeliveryEvent:
    """A message with this `publishTime` (None: none) in a CloudEvent with this `time` (the
    SDK would otherwise set it to now)."""
    body: dict[str, Any] = {"data": b64(raw), "messageId": "111"}
    if publish_time is not None:
        body["publishTime"] = publish_time
    attributes: dict[str, Any] = {**CE_ATTRIBUTES, "time": time}
    return decode(CloudEvent(attributes, {"message": body}))


def test_the_publish_time_is_read_from_the_message_then_the_cloudevent_time() -> None:
    raw = json.dumps(delivery()).encode()
    at = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert published(raw, "2024-05-01T10:00:00.123456789Z").message.published_at == at
    ce_time = "2024-05-01T09:00:00Z"
    assert published(raw, None, time=ce_time).message.published_at == at - timedelta(
        hours=1, microseconds=123456
    )
    assert published(raw, "2024-05-01T10:00:00Z", time=ce_time).message.published_at == at.replace(
        microsecond=0
    )
    # Pub/Sub's field, not the publisher's: unreadable is unknown, never an invalid event.
    assert published(raw, "not a time").message.published_at is None
    assert decode(pushed_event(raw)).message.published_at == datetime(2024, 5, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("workflow", "minutes"), [("verification-code", 10), ("password-reset", 30)]
)
def test_a_code_or_link_is_valid_its_minutes_after_the_publish_time(
    workflow: str, minutes: int
) -> None:
    raw = json.dumps(delivery(workflow)).encode()
    event = published(raw, "2024-05-01T10:00:00Z")
    assert event.valid_until == datetime(2024, 5, 1, 10, minutes, tzinfo=UTC)
    # No publish time known: no end derived from it.
    assert published(raw, None).valid_until is None
    doc = delivery(workflow, data={**VALID_DATA[workflow]})
    doc["data"].pop("expires_in_minutes")
    assert published(json.dumps(doc).encode(), "2024-05-01T10:00:00Z").valid_until is None


@pytest.mark.parametrize(
    ("expires_at", "end"),
    [
        ("2030-01-31", datetime(2030, 2, 1, tzinfo=UTC)),  # the end of that day, UTC
        ("2030-12-31", datetime(2031, 1, 1, tzinfo=UTC)),
        ("2030-01-31T18:00:00+02:00", datetime(2030, 1, 31, 16, tzinfo=UTC)),  # as given
        ("9999-12-31", None),  # no end a datetime can hold
        (None, None),
    ],
)
def test_an_invite_is_valid_until_its_expires_at(
    expires_at: str | None, end: datetime | None
) -> None:
    doc = delivery("invite", data={**VALID_DATA["invite"], "expires_at": expires_at})
    assert parse_delivery(message(doc)).valid_until == end
