"""Browser tests of the dashboard: a real Chromium (Debian's, driven by Playwright) against
a real API process and a real Celery worker, seeded over HTTP once per session.

Without Chromium or Playwright the tests skip with the reason; with
PALIMPSEST_REQUIRE_SERVICES=1 (CI) their absence is a failure instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.stack import LocalStack
from tests.browser.seeding import Seeded, seed

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("PALIMPSEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = REPO / "test-output" / "screenshots"


def _unavailable(reason: str) -> None:
    if os.environ.get("PALIMPSEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required for the browser tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    if not Path(CHROMIUM).is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Error as exc:
            _unavailable(f"Chromium at {CHROMIUM} does not start: {exc}")
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """One embedded stack (SQLite database and broker) for the whole browser suite."""
    st = LocalStack(
        tmp_path_factory.mktemp("dashboard") / "stack",
        env={
            "PALIMPSEST_DEVICE": "cpu",
            "PALIMPSEST_TORCH_THREADS": "1",
            # Held (batched) jobs are sent within a second of their time.
            "PALIMPSEST_BATCH_RELEASE_INTERVAL": "1",
            # The seeded webhook's receiver is on loopback, refused by default.
            "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        },
    )
    st.start()
    try:
        try:
            yield seed(st)
        except Exception:
            print(st.tail())
            raise
    finally:
        st.stop()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture
def open_page(browser: Browser, seeded: Seeded) -> Iterator[Callable[[str | None], Page]]:
    """Pages in fresh contexts (own cookies), logged in with the given key (None: not)."""
    from playwright.sync_api import expect

    contexts: list[BrowserContext] = []

    def _open(key: str | None) -> Page:
        ctx = browser.new_context(base_url=seeded.base_url, viewport={"width": 1280, "height": 900})
        contexts.append(ctx)
        ctx.set_default_timeout(15_000)
        page = ctx.new_page()
        if key is not None:
            page.goto("/admin/login")
            page.fill("form#login input[name=key]", key)
            page.click("form#login button[type=submit]")
            page.wait_for_url(re.compile(r"/admin/?$"))
            expect(page.locator("[data-testid=whoami]")).to_be_visible()
        return page

    yield _open
    for ctx in contexts:
        ctx.close()
