"""The dashboard in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright's Python package; no browser download), against a real ``slim serve``.

Two fine-tunes of a tiny instantiable BERT are compressed with the fidelity evaluation (so the
bits/param–fidelity chart has points and ``magnitude-scaled`` leaves a search trace), then a
long ``nps`` search runs while the page is open: its progress must change on screen without a
reload, and when it ends the tables follow. The browser signs in with a read-only key. The screenshot is saved as
``tests/artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import client as sdk
from service.dashboard.view import human_bytes
from tests.client.helpers import REPO, serve, tiny_bert, write_calibration
from tests.infra import TEST_ADMIN_KEY

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = REPO / "tests" / "artifacts" / "dashboard.png"


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        if os.environ.get("SLIM_REQUIRE_BROWSER"):
            pytest.fail("Debian's chromium is missing; run `make system-deps` as root")
        pytest.skip("Debian's chromium is not installed (`make system-deps` installs it)")
    return CHROMIUM


def test_dashboard_totals_charts_and_live_progress(chromium: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base_dir, (ft1, ft2) = tiny_bert(tmp_path)
    calibration = write_calibration(tmp_path / "calibration.jsonl", n=12)
    with serve(tmp_path / "data") as server:
        reader = server.create_key("read")  # before any job writes to the SQLite file
        client = sdk.SlimClient(server.url, TEST_ADMIN_KEY)
        client.push_base(base_dir, "tiny-bert")
        names = {"scaled": (ft1, "magnitude-scaled", 0.02), "dare": (ft2, "dare", 0.3)}
        for name, (directory, method, keep) in names.items():
            _, job, _ = client.push(
                directory, "tiny-bert", name=name, method=method, keep=keep,
                calibration=calibration,
            )  # fmt: skip
            client.wait(job.id, poll_seconds=0.2, timeout=300)
        _, job, _ = client.push(
            ft2, "tiny-bert", name="auto", min_fidelity=0.8, calibration=calibration,
            options={"generations": 2},
        )  # fmt: skip
        client.wait(job.id, poll_seconds=0.2, timeout=300)
        # A search long enough to watch (cancelled at the end).
        _, live_job, _ = client.push(
            ft1, "tiny-bert", name="nps-live", method="nps", keep=0.02,
            calibration=calibration, options={"generations": 500},
        )  # fmt: skip
        # and one behind it that waits for the single worker (deleted at the end)
        waiting, _, _ = client.push(
            ft2, "tiny-bert", name="nps-waiting", method="nps", keep=0.05,
            calibration=calibration, options={"generations": 500},
        )  # fmt: skip
        stats = client.stats()

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{server.url}/dashboard")
            assert "/signin" in page.url  # a browser without a key signs in first
            page.fill("#key", reader)
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r"/dashboard$"))

            total = lambda key: page.text_content(f'[data-total="{key}"]')  # noqa: E731
            assert total("logical") == human_bytes(stats.logical_bytes)
            assert total("stored") == human_bytes(stats.stored_bytes)
            parts = stats.raw["stored_parts"]
            assert total("stored-bases") == human_bytes(parts["bases"])
            assert total("stored-deltas") == human_bytes(parts["deltas"])
            assert "checkpoint deltas" in (page.text_content(".stored-tile") or "")
            assert total("bases") == "1" and total("checkpoints") == "5"
            rows = page.locator("#checkpoints .scroll tbody tr")
            assert rows.count() == 5
            assert "auto → " in (rows.nth(2).text_content() or "")
            table = page.text_content("#checkpoints .scroll table") or ""
            assert "scaled" in table and "dare" in table and "magnitude-scaled" in table

            # Charts: a savings bar pair, a point per compressed checkpoint, a search trace.
            assert page.locator("svg.savings rect.bar-stored").count() >= 1
            assert page.locator("svg.scatter g.point circle").count() >= 2
            # the newest checkpoint with a trail is auto's: drawn like a search trace
            assert page.locator("svg.auto-trail .trail-step").count() >= 1
            assert page.locator("svg.auto-trail .trail-floor").count() >= 1
            assert page.locator("svg.auto-trail .trail-step.chosen").count() == 1
            caption = page.text_content("#trace figcaption") or ""
            assert "Auto's trail of auto" in caption and "Stored " in caption
            assert "does not search" not in (page.text_content("#trace") or "")
            page.goto(f"{server.url}/dashboard?checkpoint={client.get_checkpoint('scaled').id}")
            assert page.locator("svg.trace .trace-point").count() >= 5
            assert "scaled" in (page.text_content("#trace figcaption") or "")
            page.goto(f"{server.url}/dashboard")

            # The running job's progress changes on the page (polled, no reload).
            panel = page.locator("#jobs-panel")
            expect(panel).to_contain_text("nps-live", timeout=60_000)
            # queued and running jobs look different: a bar only on the running one
            queued = page.locator('.job.state-queued:has-text("nps-waiting")')
            expect(queued).to_contain_text("waiting for a worker", timeout=60_000)
            assert queued.locator("progress").count() == 0
            running = page.locator('.job.state-running:has-text("nps-live")')
            expect(running.locator("progress[max]")).to_have_count(1, timeout=120_000)
            colours = page.evaluate(
                """() => ['running', 'queued'].map(s => getComputedStyle(
                    document.querySelector('.job.state-' + s)).borderLeftColor)"""
            )
            assert colours[0] != colours[1]
            expect(panel).to_contain_text(re.compile(r"generation \d+/500"), timeout=120_000)
            first = panel.inner_text()
            page.wait_for_function(
                """(before) => {
                    const now = document.getElementById('jobs-panel').innerText;
                    return /generation \\d+\\/500/.test(now) && now !== before;
                }""",
                arg=first,
                timeout=60_000,
            )
            assert page.url.endswith("/dashboard")  # updated in place
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # The job ends (cancelled): tables and totals follow without a reload.
            client.delete_checkpoint(waiting.id)
            client.cancel_job(live_job.id)
            row = page.locator('#checkpoints tr:has-text("nps-live") .badge')
            expect(row).to_have_text("failed", timeout=60_000)
            expect(panel).not_to_contain_text("nps-live")
            assert total("jobs-cancelled") == "1" and total("jobs-running") == "0"
            browser.close()
        client.close()
    assert SCREENSHOT.stat().st_size > 10_000
    print(f"dashboard screenshot: {SCREENSHOT}")
