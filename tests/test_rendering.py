"""worker.delivery.rendering: the bundled templates, locale fallback, and template errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from worker.delivery.events import DeliveryEvent, PubSubMessage, parse_delivery
from worker.delivery.rendering import (
    TEMPLATES_DIR,
    Renderer,
    TemplateError,
    locale_candidates,
    render,
)

CODE = "Zq9A1B2C3"
INVITE = {
    "organization_name": "Acme",
    "inviter_name": "Grace",
    "invite_url": "https://app.example.com/i/abc?x=1&y=2",
    "expires_at": "2030-01-31",
}


def event(workflow: str, data: dict[str, Any], locale: str = "en") -> DeliveryEvent:
    """A real event, through the same validation the worker uses."""
    doc = {
        "delivery_id": "d1",
        "workflow": workflow,
        "recipient": "ada@example.com",
        "data": data,
        "locale": locale,
    }
    return parse_delivery(PubSubMessage(json.dumps(doc).encode(), {}, "m1"))


def raw_event(workflow: str, data: dict[str, Any], locale: str = "en") -> DeliveryEvent:
    """An event for a workflow that only exists in a test template root."""
    message = PubSubMessage(b"", {}, "m1")
    return DeliveryEvent("d1", workflow, "ada@example.com", data, None, locale, message)


def write_templates(root: Path, folder: str, **files: str) -> None:
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)


def complete(subject: str = "Hi", body: str = "Body\n") -> dict[str, str]:
    return {"subject_txt": subject, "body_txt": body, "body_html": f"<p>{body}</p>"}


# --- the bundled templates ------------------------------------------------------------------


def test_verification_code() -> None:
    email = render(event("verification-code", {"code": CODE, "expires_in_minutes": 10}))
    assert email.subject == "Your verification code"
    assert CODE in email.text and CODE in email.html
    assert "expires in 10 minutes" in email.text
    assert "expires in 10 minutes" in email.html
    assert "ada@example.com" in email.text
    assert email.text.endswith("\n")
    assert email.html.lstrip().startswith("<!DOCTYPE html>")


def test_verification_code_without_expiry() -> None:
    email = render(event("verification-code", {"code": CODE}))
    assert CODE in email.text
    assert "expires" not in email.text and "expires" not in email.html


def test_singular_minute() -> None:
    email = render(event("verification-code", {"code": CODE, "expires_in_minutes": 1}))
    assert "expires in 1 minute." in email.text


def test_invite() -> None:
    email = render(event("invite", INVITE))
    assert email.subject == "Grace invited you to join Acme"
    assert "Grace has invited you to join Acme." in email.text
    assert INVITE["invite_url"] in email.text
    # An ISO date, written out in the template's language.
    assert "The invitation expires on January 31, 2030.\n" in email.text
    assert "The invitation expires on January 31, 2030.</p>" in email.html
    # In HTML the link is an attribute value: & must be escaped.
    assert 'href="https://app.example.com/i/abc?x=1&amp;y=2"' in email.html


def test_invite_without_optional_variables() -> None:
    data = {"organization_name": "Acme", "invite_url": "https://app.example.com/i/abc"}
    email = render(event("invite", data))
    assert email.subject == "You're invited to join Acme"
    assert "You have been invited to join Acme." in email.text
    assert "expires" not in email.text


def test_html_escapes_variables() -> None:
    name = "<script>alert(1)</script>"
    email = render(event("invite", {**INVITE, "organization_name": name}))
    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    # Text parts are not HTML: they keep the name as written.
    assert name in email.text and name in email.subject


def test_password_reset() -> None:
    url = "https://app.example.com/reset?t=abc"
    email = render(event("password-reset", {"reset_url": url, "expires_in_minutes": 30}))
    assert email.subject == "Reset your password"
    assert url in email.text
    assert f'href="{url}"' in email.html
    assert "expires in 30 minutes" in email.text


def test_recipient_cannot_be_replaced_by_data() -> None:
    email = render(event("password-reset", {"reset_url": "https://x.example/r", "recipient": "e"}))
    assert "ada@example.com" in email.text


def test_repr_hides_content() -> None:
    email = render(event("verification-code", {"code": CODE}))
    assert CODE not in repr(email)
    assert repr(email).startswith("RenderedEmail(subject=")


@pytest.mark.parametrize(
    ("locale", "subject"),
    [
        ("fr", "Votre code de vérification"),
        ("fr-CA", "Votre code de vérification"),
        ("en", "Your verification code"),
        ("de", "Your verification code"),
        ("pt-BR", "Your verification code"),
    ],
)
def test_locale_fallback(locale: str, subject: str) -> None:
    email = render(event("verification-code", {"code": CODE, "expires_in_minutes": 5}, locale))
    assert email.subject == subject
    assert CODE in email.text and CODE in email.html


def test_french_html_declares_its_language() -> None:
    email = render(event("verification-code", {"code": CODE}, "fr"))
    assert '<html lang="fr">' in email.html
    assert "Cet e-mail a été envoyé à ada@example.com." in email.html


def test_what_the_renderer_remembers_stays_bounded_whatever_locales_events_name() -> None:
    # Events choose the locale: a renderer that remembered every one would grow without end.
    renderer = Renderer()
    data = {"code": CODE, "expires_in_minutes": 5}
    for n in range(1000):
        email = renderer.render(raw_event("verification-code", data, f"en-X{n}"))
        assert email.subject == "Your verification code"  # each still falls back to en
    assert len(renderer._found) <= 256


def test_locale_candidates() -> None:
    assert locale_candidates("pt-BR") == ["pt-BR", "pt", "en"]
    assert locale_candidates("zh-Hant-TW") == ["zh-Hant-TW", "zh", "en"]
    assert locale_candidates("en") == ["en"]


@pytest.mark.parametrize("workflow", ["verification-code", "invite", "password-reset"])
def test_every_workflow_has_complete_english_templates(workflow: str) -> None:
    folder = TEMPLATES_DIR / workflow / "en"
    assert {p.name for p in folder.iterdir()} >= {"subject.txt", "body.txt", "body.html"}


# --- another template root ------------------------------------------------------------------


def test_custom_root_and_optional_variable(tmp_path: Path) -> None:
    body = "Code {{ code }}{% if expires_in_minutes %}, {{ expires_in_minutes }} min{% endif %}.\n"
    write_templates(tmp_path, "verification-code/en", **complete("Subject\n", body))
    renderer = Renderer(tmp_path)
    # The registered optional variable is None when absent, so `{% if %}` works.
    email = render(event("verification-code", {"code": CODE}), renderer)
    assert (email.subject, email.text) == ("Subject", f"Code {CODE}.\n")
    email = render(event("verification-code", {"code": CODE, "expires_in_minutes": 3}), renderer)
    assert email.text == f"Code {CODE}, 3 min.\n"
    assert renderer.env is renderer.env


def test_html_only_is_autoescaped(tmp_path: Path) -> None:
    write_templates(tmp_path, "w/en", **complete("{{ name }}", "{{ name }}"))
    email = Renderer(tmp_path).render(raw_event("w", {"name": "<b>&"}))
    assert (email.subject, email.text, email.html) == ("<b>&", "<b>&", "<p>&lt;b&gt;&amp;</p>")


def test_unknown_workflow_folder(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"^nothing: no templates for locale fr-CA"):
        Renderer(tmp_path).render(raw_event("nothing", {}, "fr-CA"))


def test_missing_file(tmp_path: Path) -> None:
    files = complete()
    del files["body_html"]
    write_templates(tmp_path, "w/en", **files)
    with pytest.raises(TemplateError, match=r"^w/en/body\.html: template file is missing$"):
        Renderer(tmp_path).render(raw_event("w", {}))


def test_incomplete_locale_does_not_fall_back(tmp_path: Path) -> None:
    write_templates(tmp_path, "w/en", **complete())
    write_templates(tmp_path, "w/fr", subject_txt="Objet")
    with pytest.raises(TemplateError, match=r"w/fr/body\.txt"):
        Renderer(tmp_path).render(raw_event("w", {}, "fr"))


def test_missing_variable(tmp_path: Path) -> None:
    write_templates(tmp_path, "w/en", **complete(body="{{ code }} {{ inviter_name }}"))
    with pytest.raises(TemplateError) as info:
        Renderer(tmp_path).render(raw_event("w", {"code": CODE}))
    assert str(info.value) == "w/en/body.txt: uses undefined variable inviter_name"
    assert CODE not in str(info.value)


def test_missing_key_lookup_does_not_leak_the_key(tmp_path: Path) -> None:
    write_templates(tmp_path, "w/en", **complete(body="{{ table[code] }}"))
    with pytest.raises(TemplateError) as info:
        Renderer(tmp_path).render(raw_event("w", {"code": CODE, "table": {}}))
    assert CODE not in str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "subject", ["Line one\nLine two", "{{ code }}\r\nBcc: x", "   \n", "a\u2028b"]
)
def test_subject_must_be_one_line(tmp_path: Path, subject: str) -> None:
    write_templates(tmp_path, "w/en", **complete(subject=subject))
    with pytest.raises(TemplateError, match=r"^w/en/subject\.txt: subject must be one"):
        Renderer(tmp_path).render(raw_event("w", {"code": CODE}))


def test_syntax_error(tmp_path: Path) -> None:
    write_templates(tmp_path, "w/en", **complete(body="ok\n{% if %}"))
    with pytest.raises(TemplateError, match=r"^w/en/body\.txt: syntax error at line 2$"):
        Renderer(tmp_path).render(raw_event("w", {}))


def test_runtime_error_is_a_template_error(tmp_path: Path) -> None:
    write_templates(tmp_path, "w/en", **complete(body="{{ code + 1 }}"))
    with pytest.raises(TemplateError, match=r"rendering failed \(TypeError\)$") as info:
        Renderer(tmp_path).render(raw_event("w", {"code": CODE}))
    assert CODE not in str(info.value)


def test_rendering_is_a_pure_function_of_the_event() -> None:
    """A replayed or redelivered event renders the very same email; another code does not."""
    first = render(event("verification-code", {"code": CODE}))
    assert render(event("verification-code", {"code": CODE})) == first
    assert render(event("verification-code", {"code": "Zq9OTHER1"})) != first


# --- expiry dates and footers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "value", "written"),
    [
        ("en", "2030-01-31", "January 31, 2030"),
        ("en", "2030-12-01", "December 1, 2030"),
        ("fr", "2030-01-31", "31 janvier 2030"),
        ("fr-CA", "2030-08-01", "1er août 2030"),
        ("de", "2030-01-31", "2030-01-31"),  # no words for this language: the ISO form
        # An RFC 3339 date-time: its date in UTC.
        ("en", "2026-12-01T12:00:00Z", "December 1, 2026"),
        ("en", "2026-12-01T23:30:00-05:00", "December 2, 2026"),
        ("fr", "2026-12-01T00:30:00+01:00", "30 novembre 2026"),
        ("de", "2026-12-01T12:00:00.5+00:00", "2026-12-01"),
    ],
)
def test_long_date_follows_the_template_language(
    tmp_path: Path, locale: str, value: str, written: str
) -> None:
    body = "{{ expires_at | long_date }}"
    for folder in ("w/en", "w/fr", "w/de"):
        write_templates(tmp_path, folder, **complete(body=body))
    email = Renderer(tmp_path).render(raw_event("w", {"expires_at": value}, locale))
    assert email.text == written


@pytest.mark.parametrize(
    "expires_at", ["2026-12-01", "2026-12-01T12:00:00Z", "2026-12-01T09:00:00-03:00"]
)
def test_an_invite_expiry_as_a_date_or_a_date_time(expires_at: str) -> None:
    email = render(event("invite", {**INVITE, "expires_at": expires_at}))
    assert "The invitation expires on December 1, 2026." in email.text
    assert "expires on December 1, 2026." in email.html


def test_a_subject_that_would_hold_an_encoded_word_is_a_template_error(tmp_path: Path) -> None:
    """Names cannot hold `=?`; neither may what a template joins around them, since mail
    readers decode `=?charset?b?...?=` in a subject into any character."""
    write_templates(tmp_path, "w/en", **complete(subject="{{ a }}?{{ b }}"))
    renderer = Renderer(tmp_path)
    assert renderer.render(raw_event("w", {"a": "x", "b": "y"})).subject == "x?y"
    with pytest.raises(TemplateError, match=r"w/en/subject.txt: subject must not contain '=\?'"):
        renderer.render(raw_event("w", {"a": "Acme =", "b": "utf-8?b?4oCu?="}))


def test_invite_expiry_falls_back_with_the_template_not_the_event() -> None:
    # There is no French invite: the English template writes the date in English.
    email = render(event("invite", INVITE, "fr"))
    assert "expires on January 31, 2030." in email.text


def _html_footer(html: str) -> str:
    match = re.search(r'<p style="margin:16px 0 0;[^"]*">(.*?)</p>', html, re.DOTALL)
    assert match, "the HTML part has no footer"
    return match.group(1)


TEMPLATE_FOLDERS = sorted(
    (path.parent.name, path.name) for path in (TEMPLATES_DIR).glob("*/*") if path.is_dir()
)
SAMPLE_DATA: dict[str, dict[str, Any]] = {
    "verification-code": {"code": CODE, "expires_in_minutes": 5},
    "invite": INVITE,
    "password-reset": {"reset_url": "https://app.example.com/reset?t=abc"},
}


@pytest.mark.parametrize(("workflow", "locale"), TEMPLATE_FOLDERS)
def test_text_part_ends_with_the_html_footer(workflow: str, locale: str) -> None:
    email = render(event(workflow, SAMPLE_DATA[workflow], locale))
    footer = _html_footer(email.html)
    assert "ada@example.com" in footer
    assert email.text.rstrip("\n").splitlines()[-1] == footer
