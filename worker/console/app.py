"""The support console: `delivery_console` in main.py hands every request to `Console.handle`.

Read-only by construction: it connects as an `email_reader` login (CONSOLE_DATABASE_URL or
CONSOLE_DATABASE_URL_SECRET), its SQL is SELECTs only (sql/console.sql), and it routes GET
and HEAD only. Every response carries the same defence-in-depth headers, errors and
unexpected failures included (a failure's details go to the log, never into the body); pages
are Jinja templates with autoescaping and no script at all, so the Content-Security-Policy
allows none. Page cursors are signed with the deployment's CONSOLE_CURSOR_KEY
(worker/console/cursors.py): a cursor the console did not hand out is a 400.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import psycopg
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from worker.console import chart, views
from worker.console.config import ConsoleSettings, console_settings
from worker.console.cursors import Cursors
from worker.core.instance import Instance
from worker.core.redact import sanitise
from worker.core.rules import is_delivery_id
from worker.store.console import ConsoleStore, DeliverySearch
from worker.store.db import open_pool

HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    # No script source at all: the pages have none, and an injected one would not run.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Pages hold recipients' addresses: no shared or browser cache keeps them.
    "Cache-Control": "no-store",
}
ROUTES = Map(
    [
        Rule("/", endpoint="search_page"),
        Rule("/deliveries/<path:delivery_id>", endpoint="delivery_page"),
        Rule("/stats", endpoint="stats_page"),
        # Not /static/: functions-framework's Flask app keeps that path for its own files.
        Rule("/assets/console.css", endpoint="stylesheet"),
        Rule("/api/deliveries", endpoint="api_deliveries"),
        Rule("/api/deliveries/<path:delivery_id>", endpoint="api_delivery"),
        Rule("/api/stats", endpoint="api_stats"),
        Rule("/api/suppressions", endpoint="api_suppressions"),
    ],
    strict_slashes=False,
)
_ALLOWED = ("GET", "HEAD")


class Console:
    def __init__(
        self, store: ConsoleStore, cursors: Cursors, now: Callable[[], datetime] | None = None
    ) -> None:
        self.store = store
        self.cursors = cursors
        self.now = now or (lambda: datetime.now(UTC))
        self.pages = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.pages.filters.update(when=_when, seconds=_seconds, percent=_percent)
        self.pages.globals.update(quote=lambda text: quote(text, safe=""))

    def handle(self, request: Request) -> Response:
        api = request.path.startswith("/api/")
        try:
            response = self._answer(request, api)
        except Exception as error:
            # A bug, or a database in a shape the console does not expect: the framework's
            # answer would be an HTML page without the headers below. The details go to the
            # log, never to the browser.
            _log_failure(request.path, error)
            response = self._failure(api)
        response.headers.update(SECURITY_HEADERS)
        return response

    def _answer(self, request: Request, api: bool) -> Response:
        """The route's response, or the error response of an expected refusal."""
        try:
            if request.method not in _ALLOWED:
                raise MethodNotAllowed(valid_methods=list(_ALLOWED))
            endpoint, args = ROUTES.bind_to_environ(request.environ).match(request.path, "GET")
            params = {key: request.args[key] for key in request.args}
            views.no_nul(params)
            response: Response = getattr(self, str(endpoint))(params, **args)
        except views.BadParameter as error:
            response = self._error(api, 400, "bad_parameter", str(error), error.parameter)
        except psycopg.OperationalError as error:
            print(f"email-console: database unavailable: {error}", file=sys.stderr, flush=True)
            response = self._error(api, 503, "unavailable", "the ledger database is unreachable")
        except _Missing as error:
            response = self._error(api, 404, "not_found", error.message)
        except MethodNotAllowed as error:
            response = self._error(api, 405, "method_not_allowed", "the console is read-only")
            response.headers["Allow"] = ", ".join(error.valid_methods or _ALLOWED)
        except HTTPException as error:
            code = error.code or 404
            response = self._error(api, code, "not_found", "no such page")
        return response

    # --- the JSON API ---------------------------------------------------------------------

    def api_delivery(self, params: Mapping[str, str], delivery_id: str) -> Response:
        views.only(params, ())
        report = self._report(views.delivery_id(delivery_id))
        if report is None:
            raise _Missing(f"no delivery with id {delivery_id}")
        return _json(report)

    def api_deliveries(self, params: Mapping[str, str]) -> Response:
        search = views.delivery_search(params, self.now(), self.cursors)
        page = self.store.deliveries(search)
        # The address as searched for (its stored form): either spelling of a domain unmasks.
        items = [views.delivery_json(row, search.recipient) for row in page.rows]
        cursor = views.next_cursor(page, self.cursors.for_delivery)
        return _json(views.page_json("deliveries", items, cursor))

    def api_stats(self, params: Mapping[str, str]) -> Response:
        label, window = views.stats_window(params)
        result = self.store.stats(window, buckets=views.CHART_BUCKETS)
        return _json(views.stats_json(label, window, result))

    def api_suppressions(self, params: Mapping[str, str]) -> Response:
        search = views.suppression_search(params, self.cursors)
        page = self.store.suppressions(search)
        items = [views.suppression_json(row, search.address) for row in page.rows]
        cursor = views.next_cursor(page, self.cursors.for_suppression)
        return _json(views.page_json("suppressions", items, cursor))

    # --- the pages --------------------------------------------------------------------------

    def search_page(self, params: Mapping[str, str]) -> Response:
        views.only(params, ("q", "cursor"))
        q = params.get("q", "").strip()
        if len(q) > views.MAX_ADDRESS:
            raise views.BadParameter("q", f"must be at most {views.MAX_ADDRESS} characters")
        after = views.cursor(params, self.cursors.delivery_after)
        context: dict[str, Any] = {"q": q, "searched": None, "suppression": None, "missing": False}
        if q and is_delivery_id(q) and self.store.delivery(q) is not None:
            # One search answers "what happened to delivery X": straight to its timeline.
            return Response(status=303, headers={"Location": f"/deliveries/{quote(q, safe='')}"})
        if q and "@" in q:
            searched = views.address(q, "q")
            context["searched"] = searched
            context["suppression"] = self._suppression(searched)
            search = DeliverySearch(recipient=searched, after=after, limit=50)
        elif q:
            context["missing"] = True
            search = DeliverySearch(limit=0)
        else:
            search = DeliverySearch(after=after, limit=25)
        page = self.store.deliveries(search) if search.limit else None
        rows = [] if page is None else page.rows
        context["deliveries"] = [views.delivery_json(row, context["searched"]) for row in rows]
        cursor = views.next_cursor(page, self.cursors.for_delivery) if page else None
        context["older"] = "/?" + urlencode({"q": q, "cursor": cursor}) if cursor else None
        return self._page("search.html", **context)

    def delivery_page(self, params: Mapping[str, str], delivery_id: str) -> Response:
        views.only(params, ())
        report = self._report(views.delivery_id(delivery_id))
        if report is None:
            raise _Missing(f"no delivery with id {delivery_id}")
        return self._page("delivery.html", timeline=_timeline(report), **report)

    def stats_page(self, params: Mapping[str, str]) -> Response:
        label, window = views.stats_window(params)
        result = self.store.stats(window, buckets=views.CHART_BUCKETS)
        doc = views.stats_json(label, window, result)
        starts = [datetime.fromisoformat(row["start"]) for row in doc["timeline"]]
        fmt = "%H:%M" if window.total_seconds() <= 2 * 86400 else "%b %d"
        bars = chart.stacked_bars(result.timeline, starts, fmt)
        return self._page("stats.html", stats=doc, chart=bars)

    def stylesheet(self, params: Mapping[str, str]) -> Response:
        views.only(params, ())
        return Response(_stylesheet(), content_type="text/css; charset=utf-8")

    # --- shared ----------------------------------------------------------------------------

    def _report(self, delivery_id: str) -> dict[str, Any] | None:
        row = self.store.delivery(delivery_id)
        if row is None:
            return None
        provider_events = self.store.provider_events(delivery_id)
        return {
            "delivery": views.delivery_json(row),
            "events": [views.event_json(event) for event in self.store.events(delivery_id)],
            "provider_events": [views.provider_event_json(event) for event in provider_events],
            "suppression": self._suppression(row["recipient"]) if row["recipient"] else None,
        }

    def _suppression(self, address: str) -> dict[str, Any] | None:
        entry = self.store.suppression(address)
        return None if entry is None else views.suppression_json(entry)

    def _page(self, template: str, status: int = 200, **context: Any) -> Response:
        body = self.pages.get_template(template).render(**context)
        return Response(body, status=status, content_type="text/html; charset=utf-8")

    def _error(
        self, api: bool, status: int, code: str, message: str, parameter: str | None = None
    ) -> Response:
        if api:
            doc: dict[str, Any] = {"error": code, "message": message}
            if parameter is not None:
                doc["parameter"] = parameter
            return _json(doc, status)
        return self._page("error.html", status, status_code=status, message=message)

    def _failure(self, api: bool) -> Response:
        """500, in the console's usual shape when it can be rendered, as plain text if not."""
        message = "the console failed on this request; its log says why"
        try:
            return self._error(api, 500, "internal", message)
        except Exception:  # the error page itself failed (say, a broken template)
            return Response(message + "\n", status=500, content_type="text/plain; charset=utf-8")


class _Missing(NotFound):
    """An unknown delivery: 404, with a message that names what was asked for."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@cache
def _stylesheet() -> bytes:
    return (HERE / "static" / "console.css").read_bytes()


def _log_failure(path: str, error: Exception) -> None:
    """One line: where it failed (file, line, function of each frame) and the error, its
    message sanitised (no addresses, no links: it may quote a row or the request)."""
    frames = " < ".join(
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in reversed(traceback.extract_tb(error.__traceback__))
    )
    print(
        f"email-console: internal error on {sanitise(path, 200)}: {type(error).__name__}:"
        f" {sanitise(str(error))} at {frames}",
        file=sys.stderr,
        flush=True,
    )


def _json(doc: Any, status: int = 200) -> Response:
    body = json.dumps(doc, indent=2, sort_keys=True)
    return Response(body + "\n", status=status, content_type="application/json")


def _timeline(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ledger events and provider events in one list, in the order they happened. The audit
    rows of provider-status changes are left out: the provider events themselves say it,
    at the time it happened rather than when the report arrived (the API keeps both)."""
    entries = [
        {"kind": "ledger", "at": event["created_at"], **event}
        for event in report["events"]
        if "provider_status" not in event["payload"]
    ]
    entries += [
        {"kind": "provider", "at": event["occurred_at"], **event}
        for event in report["provider_events"]
    ]
    return sorted(entries, key=lambda entry: entry["at"] or "")


def _when(value: str | None) -> str:
    if not value:
        return "—"
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


# --- the instance's console (main.py) ---------------------------------------------------------


def build(settings: ConsoleSettings) -> Console:
    """The instance's console; its pool (the reader login's) opens in the background."""
    pool = open_pool(settings.database, "email-console")
    return Console(ConsoleStore(pool), Cursors(settings.cursor_key))


# The console target's settings, parsed at import, and its console, made on first use.
INSTANCE: Instance[ConsoleSettings, Console] = Instance(console_settings, build)
