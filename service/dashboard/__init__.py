"""The storage dashboard: server-rendered HTML with inline SVG charts, plus a small script that
polls a JSON endpoint every 2 s for live totals and jobs.

- :mod:`service.dashboard.view` reads what the page shows from the database;
- :mod:`service.dashboard.charts` draws the charts as SVG (every label escaped);
- ``templates/`` (Jinja2, autoescaped) and ``static/`` (the script and the stylesheet).

Nothing is fetched from outside the server (the machine it runs on may have no internet), and
the page runs no inline script or style, so it is served under a strict
Content-Security-Policy.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import jinja2

from service.dashboard.view import human_bytes, parts_text, ratio_text
from storage.models import JobState

#: Static files the dashboard serves, with their media types.
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("service.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        human_bytes=human_bytes,
        ratio_text=ratio_text,
        parts_text=parts_text,
        fmt=lambda value, spec: "–" if value is None else spec.format(value),
        job_states=[s.value for s in JobState],
    )
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


@cache
def static_file(name: str) -> bytes:
    return resources.files("service.dashboard").joinpath("static", name).read_bytes()
