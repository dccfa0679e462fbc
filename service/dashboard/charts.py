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


@dataclass(frozen=True)
class TrailStep:
    """One candidate ``auto`` judged: its place in the trail, its fidelity, the verdict."""

    index: int
    fidelity: float
    passed: bool
    label: str  # "dare keep 0.03 3-bit"
    title: str  # the tooltip: everything the step recorded
    chosen: bool = False


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


def trail(
    steps: Sequence[TrailStep], floor: float | None, title: str, *, empty_message: str
) -> Markup:
    """``auto``'s trail drawn like a search trace: candidate (in the order judged) on x, its
    fidelity on y, the floor as a dashed line; passed candidates filled, rejected ones hollow
    with a cross, the chosen one ringed."""
    if not steps:
        return empty("trace auto-trail", empty_message)
    values = [s.fidelity for s in steps] + ([floor] if floor is not None else [])
    x = _Axis(1, max(len(steps), 2), PAD_L, W - PAD_R)
    y = _Axis(min(values), max(values), H - PAD_B, PAD_T)
    body = _frame(x, y, "candidate (in the order auto judged them)", "fidelity", x_ticks=False)
    every = max(1, math.ceil(len(steps) / 12))
    for s in steps[::every]:
        body.append(
            f'<text class="tick" x="{_f(x(s.index))}" y="{H - PAD_B + 16}" '
            f'text-anchor="middle">{s.index}</text>'
        )
    if floor is not None:
        fy = _f(y(floor))
        body.append(
            f'<line class="trail-floor" x1="{PAD_L}" y1="{fy}" x2="{W - PAD_R}" y2="{fy}"/>'
            f'<text class="trail-floor-label" x="{W - PAD_R - 4}" y="{float(fy) - 5:.1f}" '
            f'text-anchor="end">floor {floor:.4g}</text>'
        )
    coords = " ".join(f"{_f(x(s.index))},{_f(y(s.fidelity))}" for s in steps)
    body.append(f'<polyline class="trail-line" points="{coords}"/>')
    for s in steps:
        cx, cy = x(s.index), y(s.fidelity)
        kind = "trail-pass" if s.passed else "trail-fail"
        mark = f'<circle cx="{_f(cx)}" cy="{_f(cy)}" r="5"/>'
        if not s.passed:
            mark += (
                f'<path d="M{cx - 3:.1f},{cy - 3:.1f}L{cx + 3:.1f},{cy + 3:.1f}'
                f'M{cx - 3:.1f},{cy + 3:.1f}L{cx + 3:.1f},{cy - 3:.1f}"/>'
            )
        if s.chosen:
            mark += f'<circle class="trail-chosen" cx="{_f(cx)}" cy="{_f(cy)}" r="9"/>'
        label = (
            f'<text class="point-label" x="{_f(cx)}" y="{cy - 11:.1f}" '
            f'text-anchor="middle">{escape(s.label)}</text>'
            if len(steps) <= 8 or s.chosen
            else ""
        )
        body.append(
            f'<g class="trail-step {kind}{" chosen" if s.chosen else ""}" data-index="{s.index}">'
            f"{mark}{label}<title>{escape(s.title)}</title></g>"
        )
    lx, ly = PAD_L, H + 12  # the legend: a row under the axis label
    body.append(
        f'<g class="trail-legend"><circle class="trail-pass" cx="{lx}" cy="{ly - 4}" r="4"/>'
        f'<text class="tick" x="{lx + 8}" y="{ly}">passed</text>'
        f'<circle class="trail-fail" cx="{lx + 64}" cy="{ly - 4}" r="4"/>'
        f'<text class="tick" x="{lx + 72}" y="{ly}">rejected</text>'
        f'<circle class="trail-chosen" cx="{lx + 136}" cy="{ly - 4}" r="6"/>'
        f'<text class="tick" x="{lx + 146}" y="{ly}">stored</text>'
        f'<line class="trail-floor" x1="{lx + 196}" y1="{ly - 4}" x2="{lx + 220}" y2="{ly - 4}"/>'
        f'<text class="tick" x="{lx + 226}" y="{ly}">floor</text></g>'
    )
    return _svg("trace auto-trail", body, title, height=H + 20)


def savings(bars: Sequence[Bar], title: str, size: Callable[[int], str]) -> Markup:
    """Two horizontal bars per row (logical and stored bytes) on one shared scale."""
    if not bars:
        return empty("savings", "no base yet")
    row, gap, left = 46, 30, 150
    height = PAD_T + len(bars) * (row + gap) + 30
    top = max(max(b.logical, b.stored) for b in bars) or 1
    span = W - left - 110  # room right of the longest bar for "999.9 MB logical"
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
            f'dominant-baseline="middle">{escape(size(b.stored))} stored</text>'
            f'<text class="bar-note" x="{left}" y="{y0 + row + 12:.0f}" '
            f'dominant-baseline="middle">{escape(b.note)}</text>'
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
