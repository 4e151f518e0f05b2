"""The support console's pages in a real headless browser (Debian's chromium, Playwright):
what a support person does — search for a delivery, read its timeline, look at the stats —
and hostile text in the ledger shown as text, never run. Screenshots of each page are kept
under run/screenshots/ (not committed)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from playwright.sync_api import Page, expect

from tests.harness.browser import screenshot
from tests.harness.console import Console, provider_event, seed

XSS_WORKFLOW = '<img src=x onerror="window.__xss=1">'
XSS_ERROR = "<script>window.__xss=2</script> 550 rejected"
XSS_RECIPIENT = '"<svg/onload=window.__xss=3>"@example.com'


@pytest.fixture(scope="module")
def ledger_rows(admin_conn: psycopg.Connection[Any]) -> dict[str, str]:
    """A day of deliveries, the kind support is asked about."""
    rows = {
        "retried": seed(
            admin_conn,
            delivery_id="inv_2f6c9d1e",
            recipient="ada@example.com",
            transient_errors=1,
            created_ago=20 * 3600,
            send_seconds=31,
        ),
        "rejected": seed(
            admin_conn,
            workflow="password-reset",
            recipient="ada@example.com",
            outcome="failed",
            created_ago=3 * 3600,
        ),
        "hostile": seed(
            admin_conn,
            workflow=XSS_WORKFLOW,
            recipient=XSS_RECIPIENT,
            outcome="failed",
            error=("SMTP_550", XSS_ERROR),
            created_ago=3600,
        ),
    }
    provider_event(admin_conn, rows["retried"], "delivered", occurred_ago=19 * 3600)
    provider_event(admin_conn, rows["retried"], "opened", occurred_ago=18 * 3600)
    rows["complained"] = seed(
        admin_conn, workflow="verification-code", recipient="ada@example.com", created_ago=7200
    )
    provider_event(admin_conn, rows["complained"], "complained", occurred_ago=3000)
    provider_event(
        admin_conn,
        rows["hostile"],
        "bounced",
        occurred_ago=1800,
        bounce_type="<b>Permanent</b>",
        detail={"diagnostic": "<script>window.__xss=6</script>"},
    )
    for hour in range(0, 24, 2):
        for n in range(hour % 5 + 1):
            seed(
                admin_conn,
                workflow=("verification-code", "invite", "password-reset")[n % 3],
                recipient=f"user{hour}.{n}@example.org",
                created_ago=hour * 3600 + 600,
                send_seconds=1.5 + n,
            )
        if hour % 6 == 0:
            seed(
                admin_conn,
                recipient=f"gone{hour}@example.org",
                outcome="dead_letter",
                created_ago=hour * 3600 + 900,
            )
    seed(
        admin_conn,
        workflow="verification-code",
        recipient="late@example.org",
        outcome="retrying",
        created_ago=300,
    )
    return rows


def no_script_ran(page: Page) -> None:
    assert page.evaluate("() => window.__xss === undefined"), "an injected script ran"


def stylesheet_applied(page: Page) -> None:
    """The CSS loads from 'self' under the Content-Security-Policy."""
    colour = page.evaluate(
        "() => getComputedStyle(document.querySelector('header')).backgroundColor"
    )
    assert colour == "rgb(29, 35, 41)"


def test_search_for_a_delivery_and_open_its_timeline(
    page: Page, console: Console, ledger_rows: dict[str, str]
) -> None:
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text))
    page.goto(console.url + "/")
    expect(page.get_by_role("heading", name="Recent deliveries")).to_be_visible()
    page.get_by_role("searchbox").fill("inv_2f6c9d1e")
    page.get_by_role("button", name="Search").click()

    page.wait_for_url("**/deliveries/inv_2f6c9d1e")
    expect(page.locator("h1")).to_contain_text("inv_2f6c9d1e")
    expect(page.locator("h1 .status")).to_have_text(["sent", "opened"])
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text("a***@example.com")  # masked: found by id, not address
    assert "ada@example.com" not in page.content()
    steps = page.locator("ol.timeline li")
    # Send attempts, the transient error, the send, then what the provider reported.
    expect(steps).to_have_count(6)
    expect(steps.nth(1)).to_contain_text("retrying")
    expect(steps.nth(1)).to_contain_text("SMTP_421")
    expect(steps.nth(3)).to_contain_text("sent")
    expect(steps.nth(4)).to_contain_text("delivered")
    expect(steps.nth(5)).to_contain_text("opened")
    expect(steps.nth(5)).to_contain_text("reported by ses")
    # Another email to the same address drew a complaint: the address is suppressed.
    expect(page.locator(".suppression")).to_contain_text("Suppressed")
    expect(page.locator(".suppression")).to_contain_text("complaint")
    stylesheet_applied(page)
    screenshot(page, "console-timeline")
    assert not [text for text in violations if "Content Security Policy" in text], violations


def test_search_for_an_address(page: Page, console: Console, ledger_rows: dict[str, str]) -> None:
    page.goto(console.url + "/")
    page.get_by_role("searchbox").fill("Ada@Example.com")
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Deliveries to Ada@Example.com")
    rows = page.locator("table.deliveries tbody tr")
    expect(rows).to_have_count(3)
    # Searched for exactly: the full address, newest first.
    expect(rows.locator(".recipient")).to_have_text(["ada@example.com"] * 3)
    expect(rows.nth(0)).to_contain_text("complained")
    expect(rows.nth(1)).to_contain_text("SMTP_550")
    expect(rows.nth(2)).to_contain_text("inv_2f6c9d1e")
    expect(rows.nth(2)).to_contain_text("opened")
    expect(page.locator(".suppression")).to_contain_text("complaint")
    screenshot(page, "console-search")

    rows.nth(1).get_by_role("link").click()
    page.wait_for_url(f"**/deliveries/{ledger_rows['rejected']}")
    expect(page.locator("h1 .status")).to_have_text("failed")


def test_recent_deliveries_are_masked_and_paged(
    page: Page, console: Console, ledger_rows: dict[str, str]
) -> None:
    page.goto(console.url + "/")
    recipients = page.locator("table.deliveries .recipient").all_inner_texts()
    assert len(recipients) == 25
    assert all("***@" in text for text in recipients), recipients
    newest = page.locator("table.deliveries a.id").all_inner_texts()
    page.get_by_role("link", name="Older deliveries →").click()
    older = page.locator("table.deliveries a.id").all_inner_texts()
    assert older and not set(older) & set(newest)


def test_stats_page_draws_the_chart(
    page: Page, console: Console, ledger_rows: dict[str, str]
) -> None:
    page.goto(console.url + "/stats")
    expect(page.locator("h1")).to_have_text("Deliveries queued in the last 24h")
    chart = page.locator("svg#chart")
    expect(chart).to_be_visible()
    bars = chart.locator("rect.bar")
    assert bars.count() >= 12
    assert chart.bounding_box() is not None
    table = page.locator("table.stats")
    expect(table.locator("tr.total td").first).to_have_text("all")
    expect(table).to_contain_text("invite")
    screenshot(page, "console-stats")

    page.get_by_role("link", name="last week").click()
    expect(page.locator("h1")).to_have_text("Deliveries queued in the last 7d")
    expect(page.locator("svg#chart rect.bar").first).to_be_visible()


def test_hostile_text_is_shown_never_run(
    page: Page, console: Console, ledger_rows: dict[str, str]
) -> None:
    page.goto(console.url + f"/deliveries/{ledger_rows['hostile']}")
    expect(page.locator("dl.facts")).to_contain_text(XSS_WORKFLOW)
    expect(page.locator("dl.facts .error")).to_contain_text(XSS_ERROR)
    # A report about a delivery that was never sent changes nothing on it (migration 008), but
    # is kept with it: its hostile bounce type is in the timeline, as text.
    expect(page.locator("ol.timeline")).to_contain_text("<b>Permanent</b>")
    expect(page.locator("ol.timeline")).to_contain_text("<script>window.__xss=6</script>")
    no_script_ran(page)
    assert page.locator("img[src=x]").count() == 0 and page.locator("main script").count() == 0

    page.goto(console.url + "/?q=" + quote(XSS_RECIPIENT, safe=""))
    expect(page.locator("h1")).to_have_text(f"Deliveries to {XSS_RECIPIENT}")
    expect(page.locator("table.deliveries .recipient")).to_have_text(XSS_RECIPIENT)
    no_script_ran(page)

    hostile_query = "<script>window.__xss=4</script>"
    page.goto(console.url + "/?q=" + quote(hostile_query, safe=""))
    expect(page.locator("main")).to_contain_text(hostile_query)
    no_script_ran(page)

    # An id that is not one (a delivery id cannot hold <, > or quotes): a 400 page.
    response = page.goto(console.url + "/deliveries/" + quote('"><script>window.__xss=5</script>'))
    assert response is not None and response.status == 400
    expect(page.locator(".error-message")).to_contain_text("delivery_id: must be")
    no_script_ran(page)
    screenshot(page, "console-bad-id")
