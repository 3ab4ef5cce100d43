"""Small inline-SVG charts for the HTML report: a line chart over steps and a timeline of bars.

Stdlib only, no script: every figure is drawn here, so the page needs no network and shows the same
in any browser. Each drawn series is a ``<polyline class="series">`` (one point: a ``<circle>``), each
marker has a ``<title>`` (the browser's tooltip), and the numbers behind a chart are in ``data-*``
attributes, so a test can read from the DOM what was drawn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from html import escape

__all__ = ["Bar", "Level", "Line", "Mark", "line_chart", "nice_ticks", "timeline_chart"]

WIDTH, HEIGHT = 960, 280
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 16, 44


@dataclasses.dataclass(frozen=True)
class Line:
    """One polyline: a quantity over steps (x, y); a non-finite y breaks the line there."""

    label: str
    color: str
    points: Sequence[tuple[float, float]]
    dash: str = ""
    width: float = 2.0


@dataclasses.dataclass(frozen=True)
class Mark:
    """A vertical rule at ``x`` (``y`` None: a resume, a rung) or a point (an OOM, a NaN) at (x, y);
    ``y`` beyond the axis is drawn at its edge."""

    x: float
    label: str
    color: str
    y: float | None = None
    shape: str = "rule"  # rule | dot | cross
    tag: str = ""  # a rule's short text, written at its top


@dataclasses.dataclass(frozen=True)
class Level:
    """A horizontal rule (the card's memory)."""

    y: float
    label: str
    color: str


@dataclasses.dataclass(frozen=True)
class Bar:
    """One span of a timeline row: [start, end] seconds, a fill, the text in it and its tooltip."""

    row: int
    start: float
    end: float
    color: str
    text: str = ""
    title: str = ""
    kind: str = "attempt"  # attempt | startup | gap


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2, 5 × 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = [first + i * step for i in range(math.ceil((hi - first) / step) + 1)]
    return [round(t, 12) for t in ticks]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}" if abs(v) >= 1000 else f"{v:.1e}"
    return f"{v:.4g}"


class _Frame:
    """Data -> pixel mapping of one chart."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], *, y_zero: bool, width: int, height: int):
        self.w, self.h = width, height
        x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y_zero:
            y_lo = min(0.0, y_lo)
        pad = (y_hi - y_lo) * 0.06 or abs(y_hi) * 0.1 or 1.0
        self.xt = nice_ticks(x_lo, x_hi if x_hi > x_lo else x_lo + 1)
        self.yt = nice_ticks(y_lo if y_zero else y_lo - pad, y_hi + pad)
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / ((self.x1 - self.x0) or 1) * (self.w - LEFT - RIGHT)

    def py(self, y: float) -> float:
        y = min(max(y, self.y0), self.y1)
        return self.h - BOTTOM - (y - self.y0) / ((self.y1 - self.y0) or 1) * (self.h - TOP - BOTTOM)


def _axes(f: _Frame, x_label: str, y_label: str, x_fmt=_fmt) -> list[str]:
    out = ['<g class="axes" font-size="11" fill="#555">']
    for t in f.yt:
        y = f.py(t)
        out.append(f'<line x1="{LEFT}" x2="{f.w - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_fmt(t))}</text>')
    for t in f.xt:
        x = f.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{f.h - BOTTOM}" stroke="#f0f0f0"/>'
                   f'<text x="{x:.1f}" y="{f.h - BOTTOM + 15}" text-anchor="middle">{escape(x_fmt(t))}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{f.w - LEFT - RIGHT}" height="{f.h - TOP - BOTTOM}" '
               'fill="none" stroke="#999"/>')
    out.append(f'<text x="{(LEFT + f.w - RIGHT) / 2:.0f}" y="{f.h - 6}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14,{(TOP + f.h - BOTTOM) / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text></g>')
    return out


def _runs(points: Iterable[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Consecutive finite points; a NaN/inf ends a run."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isfinite(x) and math.isfinite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _line(f: _Frame, line: Line) -> list[str]:
    out = []
    dash = f' stroke-dasharray="{line.dash}"' if line.dash else ""
    for run in _runs(line.points):
        title = f"<title>{escape(line.label)}: steps {_fmt(run[0][0])}–{_fmt(run[-1][0])}</title>"
        if len(run) == 1:
            x, y = run[0]
            out.append(f'<circle class="series" cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3" fill="{line.color}" '
                       f'data-label="{escape(line.label)}">{title}</circle>')
            continue
        pts = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in run)
        out.append(f'<polyline class="series" points="{pts}" fill="none" stroke="{line.color}" '
                   f'stroke-width="{line.width}"{dash} stroke-linejoin="round" data-label="{escape(line.label)}" '
                   f'data-n="{len(run)}">{title}</polyline>')
    return out


def _mark(f: _Frame, m: Mark) -> str:
    x, title = f.px(m.x), f"<title>{escape(m.label)}</title>"
    if m.y is None:
        tag = (f'<text x="{x + 4:.1f}" y="{TOP + 12}" font-size="10" fill="{m.color}">{escape(m.tag)}</text>'
               if m.tag else "")
        return (f'<g class="mark rule"><line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{f.h - BOTTOM}" '
                f'stroke="{m.color}" stroke-width="1.5" stroke-dasharray="5 3"/><rect x="{x - 4:.1f}" y="{TOP}" '
                f'width="8" height="{f.h - TOP - BOTTOM}" fill="transparent"/>{tag}{title}</g>')
    y = f.py(m.y)
    if m.shape == "cross":
        return (f'<g class="mark point" stroke="{m.color}" stroke-width="2.5"><line x1="{x - 6:.1f}" y1="{y - 6:.1f}" '
                f'x2="{x + 6:.1f}" y2="{y + 6:.1f}"/><line x1="{x - 6:.1f}" y1="{y + 6:.1f}" x2="{x + 6:.1f}" '
                f'y2="{y - 6:.1f}"/>{title}</g>')
    return (f'<g class="mark point"><circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{m.color}" stroke="#fff" '
            f'stroke-width="1.5"/>{title}</g>')


def line_chart(chart_id: str, lines: Sequence[Line], *, marks: Sequence[Mark] = (), levels: Sequence[Level] = (),
               x_label: str = "optimizer step", y_label: str = "", y_zero: bool = False,
               x_extent: Sequence[float] = (), width: int = WIDTH, height: int = HEIGHT) -> str:
    """An ``<svg class="chart">`` of ``lines`` with rules, points and horizontal levels; the x axis
    covers the data, the marks and ``x_extent`` (e.g. 0 and max_steps)."""
    xs = [x for ln in lines for x, y in ln.points if math.isfinite(x) and math.isfinite(y)]
    xs += [m.x for m in marks] + [x for x in x_extent if math.isfinite(x)]
    ys = [y for ln in lines for x, y in ln.points if math.isfinite(x) and math.isfinite(y)]
    ys += [lv.y for lv in levels]
    f = _Frame(xs, ys, y_zero=y_zero, width=width, height=height)
    out = [(f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" width="100%" '
            f'role="img" data-lines="{len(lines)}" data-marks="{len(marks)}" preserveAspectRatio="xMidYMid meet">')]
    out += _axes(f, x_label, y_label)
    for lv in levels:
        y = f.py(lv.y)
        out.append(f'<g class="level"><line x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{lv.color}" stroke-width="1.5" stroke-dasharray="8 4"/><text x="{width - RIGHT - 4}" '
                   f'y="{y - 4:.1f}" text-anchor="end" font-size="11" fill="{lv.color}">{escape(lv.label)}</text>'
                   f'<title>{escape(lv.label)}</title></g>')
    for ln in lines:
        out += _line(f, ln)
    out += [_mark(f, m) for m in marks]
    out.append("</svg>")
    return "".join(out)


def timeline_chart(chart_id: str, bars: Sequence[Bar], *, rows: Sequence[str], x_label: str = "seconds since start",
                   width: int = WIDTH) -> str:
    """An ``<svg class="chart timeline">``: one row per attempt, bars over wall-clock seconds."""
    row_h, height = 26, TOP + BOTTOM + 26 * max(1, len(rows))
    ends = [b.end for b in bars] or [1.0]
    f = _Frame([0.0, max(ends)], [0.0, 1.0], y_zero=True, width=width, height=height)
    out = [(f'<svg class="chart timeline" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" width="100%" '
            f'role="img" data-bars="{len(bars)}">'), '<g font-size="11" fill="#555">']
    for t in f.xt:
        x = f.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{height - BOTTOM}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{height - BOTTOM + 15}" text-anchor="middle">{escape(_fmt(t))}</text>')
    out.append(f'<text x="{(LEFT + width - RIGHT) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    for i, name in enumerate(rows):
        out.append(f'<text x="{LEFT - 6}" y="{TOP + i * row_h + 17}" text-anchor="end">{escape(name)}</text>')
    out.append("</g>")
    for b in bars:
        x0, x1 = f.px(b.start), f.px(max(b.end, b.start))
        y = TOP + b.row * row_h + 3
        h = row_h - 6 if b.kind != "gap" else 6
        y += 0 if b.kind != "gap" else (row_h - 6) / 2 - 3
        out.append(f'<g class="bar {b.kind}"><rect x="{x0:.1f}" y="{y:.1f}" width="{max(1.0, x1 - x0):.1f}" '
                   f'height="{h:.1f}" fill="{b.color}" rx="2"/>')
        if b.text and x1 - x0 > 7 * len(b.text):
            out.append(f'<text x="{x0 + 5:.1f}" y="{y + 16:.1f}" font-size="11" fill="#fff">{escape(b.text)}</text>')
        out.append(f"<title>{escape(b.title or b.text)}</title></g>")
    out.append("</svg>")
    return "".join(out)
