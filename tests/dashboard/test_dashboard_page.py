"""The dashboard's HTML and live JSON over HTTP (no browser): figures, escaping, access."""

from __future__ import annotations

import html
import re

import pytest

import client as sdk
from cli.main import main
from service.dashboard import charts, render, static_file, view
from service.dashboard.view import human_bytes
from storage.models import Checkpoint
from tests.conftest import Models, Stack
from tests.infra import TEST_ADMIN_KEY, push_dir

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


def test_every_stored_figure_is_one_definition_and_says_what_it_counts(
    embedded: Stack, models: Models, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19: the tile, the base's bar, the base's line, the checkpoint rows and
    ``slim stats`` show the same stored bytes, split into labelled parts — an upload that was
    never committed is counted once, as "uploads not compressed yet"."""
    client = push_two(embedded, models)
    left = embedded.client.post(
        "/v1/checkpoints",
        json={"name": "left-over", "base_id": client.list_bases()[0].id, "method": "magnitude"},
    ).json()
    push_dir(embedded.client, "checkpoints", left["id"], models.finetune)
    stats = embedded.client.get("/v1/stats").json()
    parts = stats["stored_parts"]
    assert parts["pending"] > 0 and parts["deltas"] > 0 and parts["bases"] > 0
    assert sum(parts.values()) == stats["stored_bytes"]

    page = embedded.client.get("/dashboard").text
    figures = dict(re.findall(r'data-total="([\w-]+)">([^<]*)<', page))
    assert figures["stored"] == human_bytes(stats["stored_bytes"])
    for part in ("bases", "deltas", "pending"):
        assert figures[f"stored-{part}"] == human_bytes(parts[part])
    assert "uploads not compressed yet" in page and "checkpoint deltas" in page
    # one base: its bar and its line hold the whole total, split the same way
    bar = re.search(r'class="bar-value"[^>]*>([^<]*) stored<', page)
    assert bar is not None and bar.group(1) == human_bytes(stats["stored_bytes"])
    line = re.sub(r"\s+", " ", re.search(r'<article class="base".*?<p>(.*?)</p>', page, re.S)[1])
    assert f"Stored {human_bytes(stats['stored_bytes'])} = base files" in line
    assert f"base files {human_bytes(parts['bases'])}" in line
    assert f"uploads not compressed yet {human_bytes(parts['pending'])}" in html.unescape(line)
    # the rows: a compressed checkpoint stores its delta, the left-over its upload
    rows = {c.name: c for c in client.list_checkpoints()}
    cell = re.search(
        rf'data-checkpoint-id="{left["id"]}".*?<td class="n" title="([^"]*)">([^<]*)</td>',
        page,
        re.S,
    )
    assert cell is not None and "uploads not compressed yet" in cell.group(1)
    ready = re.search(
        rf'data-checkpoint-id="{rows["ft-a"].id}".*?<td class="n" title="([^"]*)">([^<]*)</td>',
        page,
        re.S,
    )
    assert ready is not None and ready.group(2) == human_bytes(rows["ft-a"].stored_bytes)

    capsys.readouterr()
    assert main(["stats", "--url", embedded.url, "--api-key", TEST_ADMIN_KEY]) == 0
    out = capsys.readouterr().out
    assert f"stored: {human_bytes(stats['stored_bytes'])}" in out
    assert f"{human_bytes(parts['pending'])}  uploads not compressed yet" in out
    assert "failed" not in out.split("saved")[0]  # an empty part is not listed
    client.close()


def test_auto_trail_is_drawn_like_a_search_trace_with_its_floor_and_choice() -> None:
    """Both trail shapes (CONTRACT.md and the older ``fidelity_holdout`` records) draw the
    candidates against the floor, mark passed and rejected ones and ring the stored one."""
    steps_new = [
        {"method": "magnitude", "keep": 0.01, "value_bits": 4, "estimated_bits": 0.1,
         "fidelity": 0.93, "floor": 0.99, "passed": False, "part": "all", "examples": 500,
         "seconds": 3.0},
        {"method": "dare", "keep": 0.03, "value_bits": 3, "estimated_bits": 0.2,
         "fidelity": 0.9912, "floor": 0.99, "passed": True, "part": "holdout", "examples": 250,
         "seconds": 40.0},
        {"encoded": "dare", "keep": 0.03, "value_bits": 3, "fidelity": 0.9912,
         "bits_per_param": 0.21, "reason": "the smallest candidate that met the floor"},
    ]  # fmt: skip
    steps_old = [
        {"method": "magnitude", "keep": 0.01, "value_bits": 4, "estimated_bits": 0.1,
         "fidelity_holdout": 0.95, "fitness": 0.9, "evaluations": 1, "passed": False},
        {"method": "dare", "keep": 0.03, "value_bits": 3, "estimated_bits": 0.2,
         "fidelity_holdout": 0.9867, "fitness": 0.9, "evaluations": 1, "passed": True},
        {"encoded": "dare", "keep": 0.03, "value_bits": 3, "fidelity_search": 0.99,
         "bits_per_param": 0.21},
    ]  # fmt: skip
    for steps, seconds in ((steps_new, 43.0), (steps_old, 1115.3)):
        ckpt = Checkpoint(
            name="a", method="auto", params={"min_fidelity": 0.99, "keep": None},
            fitness={"method": "auto:dare", "keep": 0.03, "value_bits": 3, "fidelity": 0.99,
                     "total_seconds": seconds},
            trace=[{"auto": steps}, {"evaluation": 1, "best_fitness": 0.5}],
            search_seconds=0.0,
        )  # fmt: skip
        trail = view.auto_trail(ckpt)
        assert trail is not None and trail.floor == 0.99 and trail.encoded == "dare"
        assert trail.chosen == "dare keep 0.03 3-bit" and trail.seconds == seconds
        assert [s.passed for s in trail.steps] == [False, True]
        assert [s.chosen for s in trail.steps] == [False, True]
        svg = str(charts.trail(trail.steps, trail.floor, "t", empty_message="none"))
        assert 'class="trail-floor"' in svg and "floor 0.99" in svg
        assert svg.count('class="trail-step trail-fail"') == 1
        assert svg.count('class="trail-step trail-pass chosen"') == 1
        assert "does not search" not in svg
    assert view.auto_trail(Checkpoint(name="n", method="nps", trace=[])) is None
    lossless = Checkpoint(name="l", method="auto", params={}, fitness={}, trace=[
        {"auto": [{"encoded": "lossless", "reason": "no lossy candidate met the floor"}]}
    ])  # fmt: skip
    trail = view.auto_trail(lossless)
    assert trail is not None and trail.steps == [] and trail.reason
    svg = str(charts.trail(trail.steps, None, "t", empty_message="auto judged no candidate"))
    assert "auto judged no candidate" in svg and "does not search" not in svg


def test_queued_and_running_jobs_look_different_and_auto_reports_its_candidate() -> None:
    def job(state: str, progress: dict) -> view.JobRow:
        return view.JobRow(
            id=state * 3, kind="compress", checkpoint_id="c", checkpoint_name=state,
            state=state, phase=progress.get("phase"), generation=progress.get("generation"),
            generations=progress.get("generations"), best_fitness=None, evaluations=None,
            error_code=None, error_detail=None, attempts=1, max_attempts=3,
            progress=progress,
        )  # fmt: skip

    auto = job(
        "running",
        {"phase": "auto", "candidate_index": 3, "candidates_total": 12,
         "candidate": {"method": "dare", "keep": 0.03, "value_bits": 3},
         "fidelity": 0.9912, "floor": 0.99, "passed": True, "elapsed_seconds": 41.2,
         "eta_seconds": 95.0},
    )  # fmt: skip
    assert auto.steps == (3, 12)
    assert auto.progress_text == (
        "auto · candidate 3/12 · dare keep 0.03 3-bit · fidelity 0.9912 vs floor 0.99 passed"
        " · 41 s elapsed · about 95 s left"
    )
    judging = job("running", {**auto.progress, "fidelity": None, "passed": None,
                              "eta_seconds": None})  # fmt: skip
    assert "judging against floor 0.99" in judging.progress_text
    assert "time left unknown" in judging.progress_text
    nps = job("running", {"phase": "search", "generation": 4, "generations": 30})
    queued = job("queued", {})
    html_ = render("_jobs.html", active=[auto, nps, queued], failed=[])
    assert '<progress max="12" value="3">' in html_ and '<progress max="30" value="4">' in html_
    assert html_.count("<progress") == 2  # the queued job has none
    assert 'class="job state-queued"' in html_ and "waiting for a worker" in html_
    assert 'class="badge state-running"' in html_ and 'class="badge state-queued"' in html_
    css = static_file("dashboard.css").decode()
    assert ".job.state-running" in css and ".job.state-queued" in css


def test_savings_bar_labels_fit_the_chart() -> None:
    """The value labels of the longest bar and the note stay inside the drawing (a label
    used to run past the right edge)."""
    bars = [charts.Bar("base", 192_600_000, 184_400_000, "base files 90.9 MB + 10 checkpoints")]
    svg = str(charts.savings(bars, "t", human_bytes))
    width = int(re.search(r'viewBox="0 0 (\d+) ', svg)[1])
    for x, text in re.findall(r'class="bar-value" x="([\d.]+)"[^>]*>([^<]*)<', svg):
        assert float(x) + 6.5 * len(text) <= width, text  # ~6.5 user units per 11px glyph
    assert 'class="bar-note"' in svg


def test_checkpoint_view_shows_its_repository_history(embedded: Stack, models: Models) -> None:
    client = sdk.SlimClient(embedded.url, TEST_ADMIN_KEY)
    client.push_base(models.base, "tiny")
    for directory, method in ((models.finetune, "lossless"), (models.finetune2, "magnitude")):
        _, job, _ = client.push(directory, "tiny", name="ft", method=method, keep=None)
        client.wait(job.id, poll_seconds=0.1, timeout=120)
    two, one = client.list_revisions("ft")
    page = embedded.client.get(f"/dashboard?checkpoint={one.checkpoint_id}").text
    table = page[page.index('<table id="history">') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r'<tr data-commit="([0-9a-f]{40})"( class="selected")?', table)
    assert rows == [(two.commit_id, ""), (one.commit_id, ' class="selected"')]
    assert "History of <strong>ft</strong>" in table
    assert ">lossless<" in table and ">magnitude<" in table
    assert human_bytes(two.stored_bytes) in table and human_bytes(one.stored_bytes) in table
    assert f"<code>{two.commit_id[:12]}</code>" in table and ">main<" in table
    assert f'href="?checkpoint={two.checkpoint_id}"' in table
    client.close()
