"""Server-rendered SVG charts for the dashboard (no JavaScript, no CDN).

Each builder takes plain numbers and labels and returns :class:`markupsafe.Markup` holding one
``<svg>`` element. Every label is escaped here; colours come from CSS classes (``m-<method>``,
``bar-logical``, ``bar-stored``) so the page's stylesheet owns the palette and no inline
``style`` attribute is needed (the page's Content-Security-Policy forbids them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

W, H = 640, 300  # default canvas (user units; the SVG scales to its container)
PAD_L, PAD_R, PAD_T, PAD_B = 64, 24, 16, 44


@dataclass(frozen=True)
class Point:
    """A scatter point: its position, a label, a tooltip and a CSS class suffix."""

    x: float
    y: float
    label: str
    title: str
    group: str
    ident: str = ""


@dataclass(frozen=True)
class Bar:
    """One row of the savings chart: logical vs stored bytes."""

    label: str
    logical: int
    stored: int
    note: str


def css_class(name: str) -> str:
    """A method name as a safe CSS class suffix."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower())[:40] or "x"


def _a(value: object) -> str:
    return escape(str(value), quote=True)


def _f(value: float) -> str:
    return f"{value:.1f}"


class _Axis:
    """Maps data values to pixels (linear, or log10 when the data spans more than 20×)."""

    def __init__(self, lo: float, hi: float, start: float, end: float, *, log: bool = False):
        self.log = log and lo > 0
        if self.log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-12:  # one value: a narrow window around it
            half = max(abs(hi) * 0.05, 1e-6)
            lo, hi = lo - half, hi + half
        pad = (hi - lo) * 0.08
        self.lo, self.hi = lo - pad, hi + pad
        self.start, self.end = start, end

    def __call__(self, v: float) -> float:
        v = math.log10(v) if self.log else v
        return self.start + (v - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self, n: int = 5) -> list[float]:
        if self.log:
            out = [10.0**e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1)]
            out += [m * t for t in list(out) for m in (2.0, 5.0)]
            return sorted(t for t in out if self.lo <= math.log10(t) <= self.hi)
        step = _nice((self.hi - self.lo) / n)
        first = math.ceil(self.lo / step) * step
        return [first + i * step for i in range(n + 2) if first + i * step <= self.hi + 1e-12]


def _nice(raw: float) -> float:
    exp = math.floor(math.log10(raw))
    frac = raw / 10**exp
    return (1 if frac <= 1 else 2 if frac <= 2 else 5 if frac <= 5 else 10) * 10**exp


def _tick(v: float) -> str:
    return f"{v:.3g}"


def _frame(x: _Axis, y: _Axis, xlabel: str, ylabel: str, *, x_ticks: bool = True) -> list[str]:
    parts = [
        f'<line class="axis" x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}"/>',
        f'<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}"/>',
    ]
    for t in y.ticks():
        py = _f(y(t))
        parts.append(
            f'<line class="grid" x1="{PAD_L}" y1="{py}" x2="{W - PAD_R}" y2="{py}"/>'
            f'<text class="tick" x="{PAD_L - 6}" y="{py}" text-anchor="end" '
            f'dominant-baseline="middle">{_tick(t)}</text>'
        )
    if x_ticks:
        for t in x.ticks():
            px = _f(x(t))
            parts.append(
                f'<text class="tick" x="{px}" y="{H - PAD_B + 16}" '
                f'text-anchor="middle">{_tick(t)}</text>'
            )
    parts.append(
        f'<text class="label" x="{(PAD_L + W - PAD_R) / 2:.0f}" y="{H - 6}" '
        f'text-anchor="middle">{escape(xlabel)}</text>'
        f'<text class="label" transform="translate(14 {(PAD_T + H - PAD_B) / 2:.0f}) '
        f'rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>'
    )
    return parts


def _svg(kind: str, body: Sequence[str], title: str, height: int = H) -> Markup:
    return Markup(
        f'<svg class="chart {kind}" viewBox="0 0 {W} {height}" role="img" '
        f'aria-label="{_a(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def empty(kind: str, message: str) -> Markup:
    """A placeholder chart saying why there is nothing to draw."""
    return _svg(
        kind,
        [
            f'<text class="empty" x="{W / 2:.0f}" y="60" text-anchor="middle">{escape(message)}</text>'
        ],
        message,
        height=100,
    )


def scatter(points: Sequence[Point], xlabel: str, ylabel: str, title: str) -> Markup:
    """Points (e.g. bits/param against fidelity), one CSS class per group, labelled."""
    if not points:
        return empty("scatter", "no checkpoint with both a size and a fidelity yet")
    xs, ys = [p.x for p in points], [p.y for p in points]
    spread = max(xs) / min(xs) if min(xs) > 0 else 1.0
    x = _Axis(min(xs), max(xs), PAD_L, W - PAD_R, log=spread > 20)
    y = _Axis(min(ys), max(ys), H - PAD_B, PAD_T)
    body = _frame(x, y, xlabel + (" (log scale)" if x.log else ""), ylabel)
    for p in points:
        cx, cy = _f(x(p.x)), _f(y(p.y))
        body.append(
            f'<g class="point m-{css_class(p.group)}" data-id="{_a(p.ident)}">'
            f'<circle cx="{cx}" cy="{cy}" r="5"/>'
            f'<text class="point-label" x="{cx}" y="{float(cy) - 9:.1f}" '
            f'text-anchor="middle">{escape(p.label)}</text>'
            f"<title>{escape(p.title)}</title></g>"
        )
    return _svg("scatter", body, title)


def line(steps: Sequence[tuple[float, float]], xlabel: str, ylabel: str, title: str) -> Markup:
    """A line through (step, value) points, e.g. best fitness by generation."""
    if not steps:
        return empty("trace", "no search trace (this method does not search)")
    x = _Axis(min(s for s, _ in steps), max(s for s, _ in steps), PAD_L, W - PAD_R)
    y = _Axis(min(v for _, v in steps), max(v for _, v in steps), H - PAD_B, PAD_T)
    body = _frame(x, y, xlabel, ylabel)
    coords = " ".join(f"{_f(x(s))},{_f(y(v))}" for s, v in steps)
    body.append(f'<polyline class="trace-line" points="{coords}"/>')
    for s, v in steps:
        body.append(
            f'<circle class="trace-point" cx="{_f(x(s))}" cy="{_f(y(v))}" r="3">'
            f"<title>{_tick(s)}: {v:.6g}</title></circle>"
        )
    return _svg("trace", body, title)


def savings(bars: Sequence[Bar], title: str, size: Callable[[int], str]) -> Markup:
    """Two horizontal bars per row (logical and stored bytes) on one shared scale."""
    if not bars:
        return empty("savings", "no base yet")
    row, gap, left = 46, 14, 150
    height = PAD_T + len(bars) * (row + gap) + 30
    top = max(max(b.logical, b.stored) for b in bars) or 1
    span = W - left - 150
    body = []
    for i, b in enumerate(bars):
        y0 = PAD_T + i * (row + gap)
        wl = max(1.0, b.logical / top * span)
        ws = max(1.0, b.stored / top * span)
        body.append(
            f'<g class="saving-row">'
            f'<text class="bar-name" x="{left - 8}" y="{y0 + row / 2:.0f}" text-anchor="end" '
            f'dominant-baseline="middle">{escape(b.label)}</text>'
            f'<rect class="bar-logical" x="{left}" y="{y0}" width="{wl:.1f}" height="{row / 2 - 2:.0f}">'
            f"<title>logical {escape(size(b.logical))}</title></rect>"
            f'<text class="bar-value" x="{left + wl + 6:.1f}" y="{y0 + row / 4:.0f}" '
            f'dominant-baseline="middle">{escape(size(b.logical))} logical</text>'
            f'<rect class="bar-stored" x="{left}" y="{y0 + row / 2:.0f}" width="{ws:.1f}" '
            f'height="{row / 2 - 2:.0f}"><title>stored {escape(size(b.stored))}</title></rect>'
            f'<text class="bar-value" x="{left + ws + 6:.1f}" y="{y0 + 3 * row / 4:.0f}" '
            f'dominant-baseline="middle">{escape(size(b.stored))} stored · {escape(b.note)}</text>'
            f"</g>"
        )
    legend_y = height - 12
    body.append(
        f'<rect class="bar-logical" x="{left}" y="{legend_y - 8}" width="10" height="10"/>'
        f'<text class="tick" x="{left + 14}" y="{legend_y}">logical (as uploaded)</text>'
        f'<rect class="bar-stored" x="{left + 160}" y="{legend_y - 8}" width="10" height="10"/>'
        f'<text class="tick" x="{left + 174}" y="{legend_y}">stored</text>'
    )
    return _svg("savings", body, title, height=height)
