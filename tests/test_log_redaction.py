"""What the worker's logger lets out: the redaction processor, fed the values it exists for.

The pipeline never logs `data` on purpose, so its tests alone cannot tell whether redaction
runs at all; these log the secrets directly, as a careless future line would.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests import factories
from worker.core.logging import bind_event, clear_event, get_logger

ADDRESS = "ada@example.com"


def logged(capsys: pytest.CaptureFixture[str], **fields: Any) -> tuple[dict[str, Any], str]:
    get_logger().warning("careless line", **fields)
    out = capsys.readouterr().out
    [line] = [json.loads(text) for text in out.splitlines() if text.startswith("{")]
    return line, out


def test_sensitive_keys_are_replaced(capsys: pytest.CaptureFixture[str]) -> None:
    line, out = logged(
        capsys,
        data=factories.DATA["invite"],
        code=factories.CODE,
        reset_url=factories.RESET_URL,
        invite_url=factories.INVITE_URL,
        Password="hunter2-secret",
    )
    for key in ("data", "code", "reset_url", "invite_url", "Password"):
        assert line[key] == "[redacted]", key
    for secret in (factories.CODE, factories.RESET_URL, factories.INVITE_URL, "hunter2"):
        assert secret not in out


def test_nested_values_lose_sensitive_keys_and_mask_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line, out = logged(
        capsys,
        context={
            "event": {"data": {"code": factories.CODE}, "reset_url": factories.RESET_URL},
            "tenant": "acme",
            "links": [factories.INVITE_URL, f"mail {ADDRESS}"],
        },
    )
    assert line["context"] == {
        "event": {},
        "tenant": "acme",
        "links": ["[url]", "mail a***@example.com"],
    }
    for secret in (factories.CODE, factories.RESET_URL, factories.INVITE_URL, ADDRESS):
        assert secret not in out


def test_free_text_urls_and_addresses_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    line, out = logged(
        capsys,
        error_message=f"550 <{ADDRESS}> rejected, see {factories.RESET_URL} or www.example.com/x",
    )
    assert line["error_message"] == "550 <a***@example.com> rejected, see [url] or [url]"
    assert ADDRESS not in out and "secret-reset-token" not in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see https://app.example.com/reset?t=secret-reset-token", "see [url]"),
        ("see WWW.example.com/reset?t=secret-reset-token", "see [url]"),
        ("write to ann@example.com", "write to a***@example.com"),
        ("451 try again later", "451 try again later"),
    ],
)
def test_each_kind_of_secret_is_masked_on_its_own(
    capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    # One link or address alone in a value, so no other pattern in the same text can be what
    # sends it through the masking (a short cut skips values with nothing to mask).
    line, out = logged(capsys, error_message=text)
    assert line["error_message"] == expected
    assert "secret-reset-token" not in out


def test_bound_fields_are_redacted_too_and_ids_stay_verbatim(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bind_event(delivery_id="inv@2f6c", recipient=ADDRESS, note=factories.RESET_URL)
    try:
        line, out = logged(capsys, provider_message_id="<inv_2f6c@example.com>")
    finally:
        clear_event()
    assert (line["recipient"], line["note"]) == ("a***@example.com", "[url]")
    # Ids that only look like addresses: kept, so a line can be matched to its email.
    assert line["delivery_id"] == "inv@2f6c"
    assert line["provider_message_id"] == "<inv_2f6c@example.com>"
    assert ADDRESS not in out
