"""The dashboard's HTML and live JSON over HTTP (no browser): figures, escaping, access."""

from __future__ import annotations

import re

from cli import sdk
from service.dashboard import charts
from service.dashboard.view import human_bytes
from tests.conftest import Models, Stack
from tests.infra import TEST_ADMIN_KEY

HOSTILE = '<script>alert("x")</script>&co'


def push_two(stack: Stack, models: Models) -> sdk.SlimClient:
    client = sdk.SlimClient(stack.url, TEST_ADMIN_KEY)
    client.push_base(models.base, "tiny")
    for name, directory in (("ft-a", models.finetune), (HOSTILE, models.finetune2)):
        _, job, _ = client.push(directory, "tiny", name=name, method="magnitude", keep=0.1)
        client.wait(job.id, poll_seconds=0.1, timeout=120)
    return client


def test_page_shows_totals_checkpoints_and_escapes_names(embedded: Stack, models: Models) -> None:
    client = push_two(embedded, models)
    stats = client.stats()
    r = embedded.client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'self' only
    page = r.text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(" in page
    figures = dict(re.findall(r'data-total="([\w-]+)">([^<]*)<', page))
    assert figures["checkpoints"] == "2" and figures["bases"] == "1"
    assert figures["logical"] == human_bytes(stats.logical_bytes)
    assert figures["stored"] == human_bytes(stats.stored_bytes)
    assert figures["jobs-succeeded"] == "2"
    for c in client.list_checkpoints():
        assert f'data-checkpoint-id="{c.id}"' in page
    assert page.count('class="saving-row"') == 1  # one base
    assert '<svg class="chart savings"' in page and '<svg class="chart scatter"' in page
    client.close()


def test_live_json_and_static_files(embedded: Stack, models: Models) -> None:
    client = push_two(embedded, models)
    live = embedded.client.get("/dashboard/live").json()
    assert live["totals"]["checkpoints"] == "2" and live["active_jobs"] == 0
    assert "Nothing queued or running" in live["jobs_html"]
    client.delete_checkpoint("ft-a")
    again = embedded.client.get("/dashboard/live").json()
    assert again["fingerprint"] != live["fingerprint"] and again["totals"]["checkpoints"] == "1"
    js = embedded.anonymous.get("/dashboard/static/dashboard.js")
    assert js.status_code == 200 and "text/javascript" in js.headers["content-type"]
    assert embedded.anonymous.get("/dashboard/static/nope.js").status_code == 404
    client.close()


def test_read_only_key_sees_it_and_a_browser_without_one_signs_in(embedded: Stack) -> None:
    reader = embedded.client_for(embedded.new_key(role="read"))
    assert reader.get("/dashboard").status_code == 200
    assert reader.get("/dashboard/live").status_code == 200
    browser = embedded.anonymous.get("/dashboard", headers={"accept": "text/html"})
    assert browser.status_code == 303 and browser.headers["location"].startswith("/signin")
    assert embedded.anonymous.get("/dashboard/live").status_code == 401
    other = embedded.client_for(embedded.new_key(namespace="team-b", role="read"))
    assert 'data-total="checkpoints">0<' in other.get("/dashboard").text


def test_charts_escape_labels_and_place_points() -> None:
    points = [
        charts.Point(0.5, 0.97, "<b>a</b>", "a", "nps", "id-1"),
        charts.Point(16.0, 1.0, "b", "b", "lossless", "id-2"),
    ]
    svg = str(charts.scatter(points, "bits", "fidelity", "t"))
    assert "<b>a</b>" not in svg and "&lt;b&gt;a&lt;/b&gt;" in svg
    assert svg.count("<circle") == 2 and "(log scale)" in svg  # 32× spread: log axis
    assert "no search trace" in str(charts.line([], "x", "y", "t"))
    line = str(charts.line([(0, 0.5), (1, 0.7), (2, 0.9)], "gen", "best", "t"))
    assert line.count('class="trace-point"') == 3 and "<polyline" in line
