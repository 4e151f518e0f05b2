"""A real headless browser for page tests: Debian's chromium driven by Playwright for Python.

Playwright cannot download its own browser builds here, so it launches the system's
`/usr/bin/chromium` (installed by scripts/require-services.sh; CHROMIUM overrides the path)
with a fresh profile directory and everything that would reach the internet switched off.
Screenshots go under the run folder (`run/screenshots/`, gitignored), kept as test artifacts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "run" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # we run as root in CI; the sandbox refuses to start as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser_context() -> Iterator[BrowserContext]:
    """One chromium for the session, with a throwaway profile."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run `. scripts/require-services.sh`")
    profile = Path(tempfile.mkdtemp(prefix="email-chromium-"))
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900},
                java_script_enabled=True,  # so a script that slipped through would run
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context: BrowserContext) -> Iterator[Page]:
    tab = browser_context.new_page()
    try:
        yield tab
    finally:
        tab.close()


def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG under run/screenshots/, for a person to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
