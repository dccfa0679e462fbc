"""``/docs`` and ``/redoc`` in a real headless Chromium (Debian's ``/usr/bin/chromium`` driven
by Playwright's Python package) against a live service, with no network beyond it.

Every request the browser makes is routed through the test: one that leaves the server is
aborted and fails the test, so a page that needed a CDN would render blank here exactly as it
would offline. In Swagger UI, "Try it out" on an authenticated route answers 401 before
"Authorize" and 200 after a read key is entered there. The screenshot is saved as
``tests/artifacts/docs.png``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Models, Stack
from tests.dashboard.test_dashboard_browser import CHROMIUM_ARGS, chromium  # noqa: F401
from tests.infra import make_base

pytestmark = pytest.mark.slow

SCREENSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "docs.png"


def _offline(context: Any, origin: str) -> list[str]:
    """Let the browser reach ``origin`` only; returns the list of everything else it tried."""
    elsewhere: list[str] = []

    def route(r: Any) -> None:
        url = r.request.url
        if url.startswith(origin + "/") or url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            elsewhere.append(url)
            r.abort()

    context.route("**/*", route)
    return elsewhere


def test_swagger_ui_renders_offline_and_authorizes(
    chromium: Path,  # noqa: F811
    embedded: Stack,
    models: Models,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    make_base(embedded.client, models.base, name="minilm")
    reader = embedded.new_key("default", "read")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        elsewhere = _offline(context, embedded.url)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        console: list[str] = []
        page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))

        page.goto(f"{embedded.url}/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("Slimstore")
        operation = page.locator("#operations-bases-list_bases")
        expect(operation).to_be_visible()
        expect(operation.locator(".authorization__btn")).to_be_visible()  # a locked route

        # "Try it out" without a key: the API's own 401.
        operation.locator(".opblock-summary").click()
        operation.locator("button.try-out__btn").click()
        operation.locator("button.execute").click()
        status = operation.locator(".live-responses-table tbody td.response-col_status").first
        expect(status).to_have_text(re.compile(r"^\s*401"))

        # Authorize with a read key, then the same request answers 200 with the base.
        page.locator(".scheme-container button.authorize").click()
        dialog = page.locator(".dialog-ux .modal-ux")
        expect(dialog).to_contain_text("bearer")
        dialog.locator("input").first.fill(reader)
        dialog.locator(".auth-btn-wrapper button.authorize").click()
        expect(dialog.locator(".auth-btn-wrapper button.authorize")).to_have_count(0)
        dialog.locator(".auth-btn-wrapper button.btn-done").click()
        operation.locator("button.execute").click()
        expect(status).to_have_text(re.compile(r"^\s*200"))
        body = operation.locator(".live-responses-table tbody .response-col_description pre").first
        expect(body).to_contain_text('"name": "minilm"')
        curl = operation.locator(".curl-command").first
        expect(curl).to_contain_text("Authorization: Bearer")

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        operation.locator(".live-responses-table").first.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOT))

        # ReDoc renders from the server's own script too.
        page.goto(f"{embedded.url}/redoc")
        expect(page.locator("h1").first).to_contain_text("Slimstore", timeout=30_000)
        expect(page.get_by_text("Download Checkpoint File").first).to_be_attached()
        browser.close()
    assert elsewhere == [], f"the docs pages reached beyond the server: {elsewhere}"
    assert errors == [], errors
    # The Content-Security-Policy refused nothing the pages need: at most ReDoc's footer logo.
    refused = [m for m in console if "Content Security Policy" in m]
    assert all("cdn.redoc.ly/redoc/logo-mini.svg" in m for m in refused), refused
    assert SCREENSHOT.stat().st_size > 10_000
