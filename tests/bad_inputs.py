"""A corpus of hostile and malformed delivery events, each with the outcome it must have.

Every `Case` is one Pub/Sub message. `field` is what the rejection must name (the dead-letter
`error_message` starts with `"<field>: "`); `field=None` marks a legal event with odd content
(SQL metacharacters in free text, the metadata size limit exactly) that must be sent and stored
verbatim. `delivery_id` is the id the worker can read, so a ledger row must exist for it.

`message.data` is normally `data` base64-encoded; `encoded` replaces that string as is (bad
base64, a number), and `envelope` replaces the whole CloudEvent data (no Pub/Sub message at
all: functions-framework itself answers such requests, so those cases are in-process only).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests import factories
from worker.delivery.events import MAX_METADATA_BYTES, MAX_PAYLOAD_BYTES

# SQL and shell metacharacters, PostgreSQL dollar quoting, psycopg's own placeholder syntax,
# backslashes and NUL.
METACHARACTERS: dict[str, str] = {
    "drop-table": "'; DROP TABLE email.deliveries; --",
    "or-true": "' OR '1'='1",
    "dollar-quote": "$$",
    "dollar-param": "$1",
    "backslash": "\\",
    "double-backslash": "\\\\",
    "escape-string": "E'\\x00'",
    "placeholder": "%(delivery_id)s",
    "percent-s": "%s",
    "double-quote": '"; --',
    "nul": "\x00",
    "nul-escape-text": "\\u0000",
}
# Those that are legal in an address's local part (RFC 5322 atext): such an address is valid.
ATEXT_ONLY = frozenset({"dollar-quote", "dollar-param", "percent-s"})


@dataclass(frozen=True)
class Case:
    name: str
    field: str | None
    delivery_id: str | None
    data: bytes = dataclasses.field(default=b"", repr=False)
    encoded: Any = None  # when not None: message.data exactly as sent
    envelope: Mapping[str, Any] | None = None  # when given: the CloudEvent data itself
    # What must be stored for an accepted case.
    recipient: str | None = None
    metadata: Any = None

    @property
    def accepted(self) -> bool:
        return self.field is None

    @property
    def over_http(self) -> bool:
        """Whether a Pub/Sub push can carry it (functions-framework rejects other shapes)."""
        return self.envelope is None

    @property
    def dead_letter_data(self) -> bytes:
        """The bytes the dead-letter message must carry: the message's own, unchanged."""
        if self.envelope is not None:
            return b""
        if self.encoded is None:
            return self.data
        return self.encoded.encode() if isinstance(self.encoded, str) else b""

    def message_data(self) -> Any:
        if self.encoded is not None:
            return self.encoded
        return base64.b64encode(self.data).decode()

    def event_data(
        self, message_id: str, subscription: str = "projects/test-project/subscriptions/corpus"
    ) -> dict[str, Any]:
        """The CloudEvent data for this case: a Pub/Sub push body (camelCase and snake_case
        keys, as the emulator and Eventarc send), or `envelope`."""
        if self.envelope is not None:
            return dict(self.envelope)
        published = factories.publish_time()
        return {
            "message": {
                "data": self.message_data(),
                "attributes": {},
                "messageId": message_id,
                "message_id": message_id,
                "publishTime": published,
                "publish_time": published,
            },
            "subscription": subscription,
        }


def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


def corpus(prefix: str = "bad") -> list[Case]:
    """The whole corpus; delivery ids are `<prefix>-NNN`, unique within it."""
    numbers = itertools.count()

    def new_id() -> str:
        return f"{prefix}-{next(numbers):03d}"

    def event(
        workflow: str = "verification-code", /, **overrides: Any
    ) -> tuple[str, dict[str, Any]]:
        delivery_id = new_id()
        body = factories.payload(workflow, delivery_id=delivery_id)
        body.update(overrides)
        return delivery_id, body

    def rejected(
        name: str, field: str, workflow: str = "verification-code", /, **changes: Any
    ) -> Case:
        delivery_id, body = event(workflow, **changes)
        readable = body.get("delivery_id") == delivery_id
        return Case(name, field, delivery_id if readable else None, _dumps(body))

    def without(name: str, field: str, key: str, workflow: str = "verification-code") -> Case:
        delivery_id, body = event(workflow)
        del body[key]
        return Case(name, field, delivery_id if key != "delivery_id" else None, _dumps(body))

    def accepted(name: str, workflow: str = "verification-code", /, **changes: Any) -> Case:
        delivery_id, body = event(workflow, **changes)
        return Case(
            name,
            None,
            delivery_id,
            _dumps(body),
            recipient=body["recipient"],
            metadata=body.get("metadata"),
        )

    def with_data(workflow: str, **variables: Any) -> dict[str, Any]:
        return {**factories.DATA[workflow], **variables}

    cases: list[Case] = []
    add = cases.append
    valid_b64 = base64.b64encode(_dumps(factories.payload(delivery_id="b64-not-read"))).decode()

    # --- the envelope and its encoding ---------------------------------------------------
    add(Case("base64 truncated by one character", "message.data", None, encoded=valid_b64[:-1]))
    add(Case("base64 with characters outside the alphabet", "message.data", None, encoded="eyJ!*!"))
    add(Case("base64url alphabet", "message.data", None, encoded="-_-_" + valid_b64[4:]))
    add(Case("base64 with embedded newlines", "message.data", None, encoded="eyJh\r\nIjox"))
    add(Case("message.data is a number", "message.data", None, encoded=12345))
    add(Case("message.data is an object", "message.data", None, encoded={"a": 1}))
    add(Case("no Pub/Sub message", "message", None, envelope={"nothing": "here"}))
    add(Case("message is a list", "message", None, envelope={"message": [1, 2]}))
    full = _dumps(factories.payload(delivery_id="truncated-not-read"))
    add(Case("JSON truncated in the middle", "message.data", None, full[: len(full) // 2]))
    add(Case("empty payload", "message.data", None, b""))
    add(Case("whitespace payload", "message.data", None, b" \n\t "))

    # --- bytes that are not UTF-8, text that is not Unicode -------------------------------
    add(Case("not UTF-8 at all", "message.data", None, b"\xff\xfe\x00garbage"))
    good = _dumps(factories.payload(delivery_id="utf8-not-read"))
    add(Case("invalid UTF-8 inside a string", "message.data", None, good[:-3] + b'\xc3("}'))
    add(Case("overlong UTF-8 slash", "message.data", None, b'{"delivery_id": "\xc0\xaf"}'))
    add(
        Case(
            "UTF-16 JSON",
            "message.data",
            None,
            json.dumps(factories.payload(delivery_id="utf16")).encode("utf-16"),
        )
    )
    add(Case("UTF-8 byte order mark", "message.data", None, b"\xef\xbb\xbf" + good))
    delivery_id, body = event(metadata={"note": "PLACEHOLDER"})
    add(
        Case(
            "lone surrogate in metadata",
            "metadata",
            delivery_id,
            _dumps(body).replace(b'"PLACEHOLDER"', b'"\\ud800"'),
        )
    )
    delivery_id, body = event("invite")
    body["data"]["organization_name"] = "PLACEHOLDER"
    add(
        Case(
            "lone surrogate in a template variable",
            "data",
            delivery_id,
            _dumps(body).replace(b'"PLACEHOLDER"', b'"Acme \\udfff"'),
        )
    )

    # --- nesting and size ---------------------------------------------------------------
    add(Case("array nested 100000 deep", "message.data", None, b"[" * 100_000 + b"]" * 100_000))
    delivery_id, body = event(metadata={"deep": "PLACEHOLDER"})
    nested = b'{"a":' * 40_000 + b"1" + b"}" * 40_000
    add(
        Case(
            "metadata nested 40000 deep",
            "message.data",
            None,
            _dumps(body).replace(b'"PLACEHOLDER"', nested),
        )
    )
    deep: Any = "bottom"
    for _ in range(40):
        deep = {"level": deep}
    add(rejected("metadata nested 40 deep", "metadata", metadata=deep))
    add(
        rejected(
            "template data nested 40 deep", "data", data=with_data("verification-code", x=deep)
        )
    )
    add(
        rejected(
            "payload over the size cap",
            "message.data",
            metadata={"blob": "x" * (MAX_PAYLOAD_BYTES + 1)},
            delivery_id="size-cap-not-read",
        )
    )
    add(
        rejected(
            "metadata one byte over the cap",
            "metadata",
            metadata={"blob": "x" * (MAX_METADATA_BYTES - 11 + 1)},
        )
    )
    add(accepted("metadata exactly at the cap", metadata={"blob": "x" * (MAX_METADATA_BYTES - 11)}))
    add(
        rejected(
            "metadata over the cap in escaped characters",
            "metadata",
            metadata={"blob": "\u00e9" * (MAX_METADATA_BYTES // 2 + 1)},
        )
    )
    add(
        rejected(
            "recipient of 255 characters",
            "recipient",
            recipient="a" * 64 + "@" + "b" * 186 + ".com",
        )
    )
    add(rejected("delivery id of 201 characters", "delivery_id", delivery_id="d" * 201))
    many = {f"k{i}": "fine" for i in range(3000)}
    many["k2999"] = "\x00"
    add(
        rejected(
            "NUL in the last of 3000 template variables",
            "data",
            data=with_data("verification-code", **many),
        )
    )

    # --- line breaks (header injection) ---------------------------------------------------
    add(
        rejected(
            "CRLF in recipient", "recipient", recipient="ada@example.com\r\nBcc: eve@example.com"
        )
    )
    add(rejected("LF at the end of recipient", "recipient", recipient="ada@example.com\n"))
    add(rejected("line separator in recipient", "recipient", recipient="ada@example.com\u2028"))
    add(rejected("display name in recipient", "recipient", recipient="Ada <ada@example.com>"))
    add(rejected("two recipients", "recipient", recipient="ada@example.com, eve@example.com"))
    add(rejected("CRLF in locale", "locale", locale="en\r\nX-Injected: yes"))
    add(rejected("LF at the end of locale", "locale", locale="en\n"))
    add(rejected("path in locale", "locale", locale="../../etc/passwd"))
    add(rejected("CRLF in delivery id", "delivery_id", delivery_id="abc\r\n"))
    add(
        rejected(
            "CRLF in organization name",
            "data.organization_name",
            "invite",
            data=with_data("invite", organization_name="Acme\r\nBcc: eve@example.com"),
        )
    )
    add(
        rejected(
            "CRLF in invite URL",
            "data.invite_url",
            "invite",
            data=with_data("invite", invite_url="https://app.example.com/i/x\r\nBcc: e@x.io"),
        )
    )

    # --- SQL metacharacters in every field ----------------------------------------------
    for key, value in METACHARACTERS.items():
        nul = "\x00" in value
        add(rejected(f"{key} as delivery_id", "delivery_id", delivery_id=value))
        add(rejected(f"{key} as workflow", "workflow", workflow=value))
        add(rejected(f"{key} as recipient", "recipient", recipient=value))
        if key in ATEXT_ONLY:
            add(accepted(f"{key} in recipient", recipient=f"x{value}@example.com"))
        else:
            add(rejected(f"{key} in recipient", "recipient", recipient=f"x{value}@example.com"))
        add(rejected(f"{key} as locale", "locale", locale=value))
        add(rejected(f"{key} as code", "data.code", data={"code": value}))
        if nul:
            add(
                rejected(
                    f"{key} in organization name",
                    "data.organization_name",
                    "invite",
                    data=with_data("invite", organization_name=f"Acme{value}"),
                )
            )
            add(
                rejected(
                    f"{key} in an unused variable",
                    "data",
                    data=with_data("verification-code", note=value),
                )
            )
            add(rejected(f"{key} as a metadata value", "metadata", metadata={"note": value}))
            add(rejected(f"{key} as a metadata key", "metadata", metadata={value: 1}))
        else:
            add(
                accepted(
                    f"{key} in organization name",
                    "invite",
                    data=with_data("invite", organization_name=f"Acme {value}"),
                )
            )
            add(
                accepted(
                    f"{key} in an unused variable", data=with_data("verification-code", note=value)
                )
            )
            add(accepted(f"{key} as a metadata value", metadata={"note": value, "nested": [value]}))
            add(accepted(f"{key} as a metadata key", metadata={value: value}))
    add(accepted("quote and dollars in the local part", recipient="o'brien$$@example.com"))
    add(accepted("metadata null", metadata=None))
    add(accepted("locale null", locale=None))

    # --- unknown workflows -------------------------------------------------------------
    for workflow in ("newsletter", "INVITE", "invite ", "", "verification_code", "../invite"):
        add(rejected(f"unknown workflow {workflow!r}", "workflow", workflow=workflow))

    # --- missing fields and template variables -------------------------------------------
    add(without("no delivery_id", "delivery_id", "delivery_id"))
    add(without("no workflow", "workflow", "workflow"))
    add(without("no recipient", "recipient", "recipient"))
    add(without("no data", "data", "data"))
    add(rejected("no code", "data.code", data={"expires_in_minutes": 10}))
    add(rejected("no invite_url", "data.invite_url", "invite", data={"organization_name": "Acme"}))
    add(
        rejected(
            "no organization_name",
            "data.organization_name",
            "invite",
            data={"invite_url": factories.INVITE_URL},
        )
    )
    add(rejected("no reset_url", "data.reset_url", "password-reset", data={}))
    add(
        rejected(
            "empty organization_name",
            "data.organization_name",
            "invite",
            data=with_data("invite", organization_name="  "),
        )
    )

    # --- wrong types -------------------------------------------------------------------
    wrong_types: list[tuple[str, str, str, dict[str, Any]]] = [
        ("delivery_id number", "delivery_id", "verification-code", {"delivery_id": 12345}),
        ("delivery_id true", "delivery_id", "verification-code", {"delivery_id": True}),
        ("delivery_id list", "delivery_id", "verification-code", {"delivery_id": ["a"]}),
        ("delivery_id null", "delivery_id", "verification-code", {"delivery_id": None}),
        ("workflow number", "workflow", "verification-code", {"workflow": 1}),
        ("workflow object", "workflow", "verification-code", {"workflow": {"name": "invite"}}),
        ("recipient list", "recipient", "verification-code", {"recipient": ["ada@example.com"]}),
        ("recipient number", "recipient", "verification-code", {"recipient": 42}),
        ("recipient object", "recipient", "verification-code", {"recipient": {"email": "a@b.co"}}),
        ("data string", "data", "verification-code", {"data": "code=123456"}),
        ("data list", "data", "verification-code", {"data": ["123456"]}),
        ("data null", "data", "verification-code", {"data": None}),
        ("metadata list", "metadata", "verification-code", {"metadata": [1, 2]}),
        ("metadata string", "metadata", "verification-code", {"metadata": "tenant=acme"}),
        ("metadata number", "metadata", "verification-code", {"metadata": 5}),
        ("locale number", "locale", "verification-code", {"locale": 5}),
        ("locale list", "locale", "verification-code", {"locale": ["en"]}),
        ("code number", "data.code", "verification-code", {"data": {"code": 739154}}),
        ("code too short", "data.code", "verification-code", {"data": {"code": "12"}}),
        (
            "minutes as a string",
            "data.expires_in_minutes",
            "verification-code",
            {"data": with_data("verification-code", expires_in_minutes="10")},
        ),
        (
            "minutes true",
            "data.expires_in_minutes",
            "verification-code",
            {"data": with_data("verification-code", expires_in_minutes=True)},
        ),
        (
            "minutes zero",
            "data.expires_in_minutes",
            "password-reset",
            {"data": with_data("password-reset", expires_in_minutes=0)},
        ),
        (
            "minutes fractional",
            "data.expires_in_minutes",
            "password-reset",
            {"data": with_data("password-reset", expires_in_minutes=1.5)},
        ),
        (
            "javascript URL",
            "data.invite_url",
            "invite",
            {"data": with_data("invite", invite_url="javascript:alert(1)")},
        ),
        (
            "URL with user info",
            "data.invite_url",
            "invite",
            {"data": with_data("invite", invite_url="https://app.example.com@evil.example/")},
        ),
        (
            "relative reset URL",
            "data.reset_url",
            "password-reset",
            {"data": with_data("password-reset", reset_url="/reset/abc")},
        ),
        (
            "inviter_name number",
            "data.inviter_name",
            "invite",
            {"data": with_data("invite", inviter_name=7)},
        ),
    ]
    for name, field_name, workflow, changes in wrong_types:
        add(rejected(name, field_name, workflow, **changes))
    for name, raw in (
        ("document is an array", b"[1, 2, 3]"),
        ("document is a string", b'"hello"'),
        ("document is a number", b"42"),
        ("document is null", b"null"),
    ):
        add(Case(name, "message.data", None, raw))
    delivery_id, body = event()
    text = _dumps(body)
    add(
        Case(
            "NaN in template data",
            "message.data",
            None,
            text.replace(b'"expires_in_minutes": 10', b'"expires_in_minutes": NaN'),
        )
    )
    add(
        Case(
            "number too large for a float",
            "message.data",
            None,
            text.replace(b'"expires_in_minutes": 10', b'"expires_in_minutes": 1e999'),
        )
    )
    add(
        Case(
            "integer of 5000 digits",
            "message.data",
            None,
            text.replace(b'"expires_in_minutes": 10', b'"expires_in_minutes": ' + b"9" * 5000),
        )
    )
    _check_unique(cases)
    return cases


def _check_unique(cases: list[Case]) -> None:
    names = [case.name for case in cases]
    ids = [case.delivery_id for case in cases if case.delivery_id is not None]
    assert len(set(names)) == len(names), "corpus case names must be unique"
    assert len(set(ids)) == len(ids), "corpus delivery ids must be unique"
