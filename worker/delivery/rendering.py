"""Subject, text and HTML for a `DeliveryEvent`, from `templates/<workflow>/<locale>/` beside it.

Each locale folder holds `subject.txt`, `body.txt` and `body.html`. The locale used is the
first folder that exists among the event's exact tag (`pt-BR`), its language (`pt`) and `en`;
a folder missing one of the three files is a bug and raises rather than mixing locales.

Template variables are the event's `data`, the workflow's optional variables (None when
absent, so templates test them with `{% if name %}`) and `recipient`. The `long_date` filter
writes an ISO date (`2030-01-31`), or an RFC 3339 date-time's date in UTC, the way the
template's language does ("January 31, 2030", "31 janvier 2030"); a language without an entry
in `_LONG_DATES` keeps the ISO form.
Undefined variables raise (`StrictUndefined`): a template bug is a permanent
`TemplateError`, whose message names the workflow, locale, file or variable, never a value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from worker.delivery.events import DEFAULT_LOCALE, DeliveryEvent
from worker.delivery.workflows import WORKFLOWS, expiry_date

TEMPLATES_DIR = Path(__file__).parent / "templates"
FILES = ("subject.txt", "body.txt", "body.html")
_UNDEFINED_NAME = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*)' is undefined")
# `long_date` per template language: the pattern, the month names and how the first of a
# month is written. Add an entry beside a new locale folder; without one, the ISO form stays.
# fmt: off
_LONG_DATES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "en": ("{month} {day}, {year}", (
        "January", "February", "March", "April", "May", "June",
        "July", "August", "September", "October", "November", "December",
    ), "1"),
    "fr": ("{day} {month} {year}", (
        "janvier", "février", "mars", "avril", "mai", "juin",
        "juillet", "août", "septembre", "octobre", "novembre", "décembre",
    ), "1er"),
}
# fmt: on
LOCALE_KEY = "template_locale"
# Errors a template can raise while rendering validated data; anything else is not ours.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError)


@dataclass(frozen=True)
class RenderedEmail:
    subject: str = field(repr=False)
    text: str = field(repr=False)
    html: str = field(repr=False)

    def __repr__(self) -> str:
        # Bodies (and often subjects) contain codes and links: show sizes only.
        sizes = f"subject={len(self.subject)}, text={len(self.text)}, html={len(self.html)}"
        return f"RenderedEmail({sizes} chars)"


_MAX_REMEMBERED = 256


class TemplateError(Exception):
    """A permanent rendering problem: missing template or variable, or a broken template."""


class Renderer:
    """Renders from one template root. The Jinja environment is built on first use and kept,
    so compiled templates are reused across invocations of a warm instance."""

    def __init__(self, root: Path = TEMPLATES_DIR) -> None:
        self.root = root
        self._env: jinja2.Environment | None = None
        # (workflow, locale asked for) -> (locale used, templates): the fallback search and
        # three template lookups once per pair instead of on every email; only what was found.
        self._found: dict[tuple[str, str], tuple[str, list[jinja2.Template]]] = {}

    @property
    def env(self) -> jinja2.Environment:
        if self._env is None:
            self._env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(self.root),
                undefined=jinja2.StrictUndefined,
                autoescape=jinja2.select_autoescape(
                    enabled_extensions=("html",), default_for_string=False, default=False
                ),
                keep_trailing_newline=True,
                trim_blocks=True,
                lstrip_blocks=True,
                # Templates ship with the code: no need to stat files on every render.
                auto_reload=False,
            )
            self._env.filters["long_date"] = long_date
        return self._env

    def render(self, event: DeliveryEvent) -> RenderedEmail:
        locale, templates = self._templates(event.workflow, event.locale)
        context = {**_context(event), LOCALE_KEY: locale}
        where = f"{event.workflow}/{locale}"
        subject, text, html = (
            _render_one(template, context, f"{where}/{name}")
            for name, template in zip(FILES, templates, strict=True)
        )
        return RenderedEmail(subject=_one_line(subject, where), text=text, html=html)

    def _templates(self, workflow: str, locale: str) -> tuple[str, list[jinja2.Template]]:
        found = self._found.get((workflow, locale))
        if found is None:
            found = self._find(workflow, locale)
            if len(self._found) < _MAX_REMEMBERED:  # events choose the locale: keep it bounded
                self._found[(workflow, locale)] = found
        return found

    def _find(self, workflow: str, locale: str) -> tuple[str, list[jinja2.Template]]:
        for candidate in locale_candidates(locale):
            folder = f"{workflow}/{candidate}"
            try:
                subject = self._get(f"{folder}/{FILES[0]}")
            except jinja2.TemplateNotFound:
                continue  # no such locale folder: fall back to the next
            return candidate, [subject, *(self._load(f"{folder}/{name}") for name in FILES[1:])]
        tried = ", ".join(locale_candidates(locale))
        raise TemplateError(f"{workflow}: no templates for locale {locale} (tried {tried})")

    def _load(self, path: str) -> jinja2.Template:
        try:
            return self._get(path)
        except jinja2.TemplateNotFound:
            raise TemplateError(f"{path}: template file is missing") from None

    def _get(self, path: str) -> jinja2.Template:
        try:
            return self.env.get_template(path)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{path}: syntax error at line {exc.lineno}") from None


_default = Renderer()


def render(event: DeliveryEvent, renderer: Renderer | None = None) -> RenderedEmail:
    """Render with the bundled templates, or with `renderer` (another template root)."""
    return (renderer or _default).render(event)


def locale_candidates(locale: str) -> list[str]:
    """`pt-BR` -> [`pt-BR`, `pt`, `en`], without duplicates."""
    candidates = [locale, locale.split("-")[0], DEFAULT_LOCALE]
    return list(dict.fromkeys(candidates))


def _context(event: DeliveryEvent) -> dict[str, Any]:
    workflow = WORKFLOWS.get(event.workflow)
    optional = {v.name: None for v in workflow.optional} if workflow else {}
    # `recipient` comes last so `data` cannot replace the address the email goes to.
    return {**optional, **event.data, "recipient": event.recipient}


@jinja2.pass_context
def long_date(context: jinja2.runtime.Context, value: str) -> str:
    """`2030-01-31` (or `2030-01-31T12:00:00Z`) in the words of the template's language
    (the locale folder in use)."""
    day = expiry_date(value)
    if day is None:
        raise ValueError("long_date needs a date or an RFC 3339 date-time with an offset")
    language = str(context.get(LOCALE_KEY, DEFAULT_LOCALE)).split("-")[0]
    if language not in _LONG_DATES:
        return day.isoformat()
    pattern, months, first = _LONG_DATES[language]
    number = first if day.day == 1 else str(day.day)
    return pattern.format(month=months[day.month - 1], day=number, year=day.year)


def _render_one(template: jinja2.Template, context: dict[str, Any], where: str) -> str:
    try:
        return template.render(context)
    except jinja2.UndefinedError as exc:
        # Jinja names the variable; other undefined messages may quote a subscript key.
        match = _UNDEFINED_NAME.fullmatch(str(exc))
        what = f"variable {match.group(1)}" if match else "a variable or attribute"
        raise TemplateError(f"{where}: uses undefined {what}") from None
    except _RENDER_ERRORS as exc:
        raise TemplateError(f"{where}: rendering failed ({type(exc).__name__})") from None


def _one_line(subject: str, where: str) -> str:
    subject = subject.strip()
    # splitlines() also catches \v, \f, \x85, U+2028...: any would break the header.
    if len(subject.splitlines()) != 1:
        raise TemplateError(f"{where}/subject.txt: subject must be one non-empty line")
    # A reader decodes an RFC 2047 encoded-word (`=?utf-8?b?...?=`) in a subject into any
    # character at all; names may not hold one, and neither may what a template joins.
    if "=?" in subject:
        raise TemplateError(f"{where}/subject.txt: subject must not contain '=?'")
    return subject
