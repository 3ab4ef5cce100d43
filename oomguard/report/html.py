"""``oomguard report DIR --html FILE``: one self-contained HTML page of a run.

Memory per step (allocated / reserved / step peak, the card's memory, OOM points, rung markers), the
Trainer's loss, learning rate and grad norm per step with one colour per attempt (a rollback shows as
a new attempt over steps already drawn), a timeline of the attempts with their restart cost, and the
requested → final table with each change's verification. The numbers are the ``oomguard.report/1``
document's (``export.build_document``) plus the journal's per-step events (``series``). Nothing is
fetched: inline CSS and SVG only, no script, no external URL.
"""

from __future__ import annotations

import math
import time
from html import escape
from pathlib import Path
from typing import Any

from .. import __version__
from .export import build_document
from .plot import Level, Line, Mark, line_chart
from .series import (
    MEMORY_FIELDS,
    Segment,
    checkpoint_log_history,
    max_steps,
    memory_caps,
    memory_segments,
    metric_segments,
    resume_step,
    trainer_logs,
)
from .summary import load_run, plural
from .tables import attempts_section, header_section, knobs_section

__all__ = ["ATTEMPT_COLORS", "render_html", "render_run_html", "write_html"]

ATTEMPT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
MEMORY_COLORS = {"allocated": "#1f77b4", "reserved": "#ff7f0e", "step_peak": "#8e24aa", "host_rss": "#2ca02c"}
FAIL_COLOR = "#d62728"
METRICS = (("loss", "loss", "loss"), ("learning_rate", "learning rate", "learning rate"),
           ("grad_norm", "grad norm", "gradient norm"))

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:1000px;margin:0 auto;padding:18px 20px 40px}
h1{font-size:20px;margin:6px 0 4px}h2{font-size:16px;margin:26px 0 6px}
section{background:#fff;border:1px solid #e2e4e8;border-radius:8px;padding:10px 16px 14px;margin:12px 0}
.status{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600;font-size:13px}
.succeeded{background:#2e7d32}.gave_up,.failed{background:#c62828}.interrupted,.running{background:#ef6c00}
.muted{color:#666}.small{font-size:12px}code{font-size:12px;background:#f0f1f3;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;
border-bottom:1px solid #eee;vertical-align:top}th{color:#555;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.legend{font-size:12px;color:#444;margin:2px 0 0}.legend span{margin-right:14px;white-space:nowrap}
.legend i{display:inline-block;width:18px;height:3px;vertical-align:middle;margin-right:5px}
.verified{color:#2e7d32}.not_applied{color:#c62828;font-weight:600}.unverified{color:#ef6c00}
tr.changed td{font-weight:600}ul{margin:4px 0;padding-left:20px}svg.chart{display:block;margin-top:6px}
"""


def _color(n: int | None) -> str:
    return ATTEMPT_COLORS[((n or 1) - 1) % len(ATTEMPT_COLORS)]


def _changes_text(decision: dict[str, Any] | None) -> str:
    changes = [c for c in (decision or {}).get("changes") or () if isinstance(c, dict)]
    return ", ".join(f"{c.get('knob')} {c.get('old')} → {c.get('new')}" for c in changes) or "same knobs"


def step_marks(run: dict[str, Any], *, fail_y: float, only_oom: bool = False) -> list[Mark]:
    """A rule where each later attempt started (its resume step: the rung's changes), a point where
    each attempt failed (after its last completed step, so at step + ½; ``only_oom``: OOMs only)."""
    attempts = [a for a in run.get("attempts", []) if isinstance(a, dict)]
    marks = []
    for prev, a in zip([None, *attempts], attempts):
        if prev is not None:
            at = resume_step(a)
            where = f"resumed from step {at}" if at is not None else "from the start"
            changes = _changes_text(prev.get("decision"))
            marks.append(Mark(float(at or 0), f"attempt {a.get('n')} {where}: {changes}", _color(a.get("n")),
                              tag=f"{a.get('n')}: {changes}"))
        f = a.get("failure")
        if isinstance(f, dict) and not (only_oom and "oom" not in str(f.get("kind"))):
            step = f.get("step") if isinstance(f.get("step"), int) else 0
            marks.append(Mark(step + 0.5, f"attempt {a.get('n')}: {f.get('kind')} after step {f.get('step')}",
                              FAIL_COLOR, y=fail_y, shape="dot" if "oom" in str(f.get("kind")) else "cross"))
    return marks


def _legend(items: list[tuple[str, str]], dashed: list[tuple[str, str]] = ()) -> str:
    spans = [f'<span><i style="background:{c}"></i>{escape(t)}</span>' for t, c in items]
    spans += [f'<span><i style="background:repeating-linear-gradient(90deg,{c} 0 5px,transparent 5px 8px)">'
              f'</i>{escape(t)}</span>' for t, c in dashed]
    return f'<div class="legend">{"".join(spans)}</div>'


def _attempt_lines(segments: list[Segment]) -> list[Line]:
    return [Line(f"attempt {s.attempt}" if s.attempt else s.name, _color(s.attempt),
                 [(p.step, p.value) for p in s.points]) for s in segments]


def _attempt_legend(segments: list[Segment]) -> list[tuple[str, str]]:
    seen = dict.fromkeys(s.attempt for s in segments)
    return [(f"attempt {n}" if n else "checkpoint log history", _color(n)) for n in seen]


def memory_section(run: dict[str, Any], events: list[dict[str, Any]]) -> str:
    segs = memory_segments(run, events)
    caps = memory_caps(run, events)
    cuda = [f for f in ("allocated", "reserved", "step_peak") if f in segs]
    fields = cuda or (["host_rss"] if "host_rss" in segs else [])
    if not fields:
        return ('<section><h2>Memory per step</h2><p class="muted">No memory events in the journal '
                "(the guard writes them from the first optimizer step).</p></section>")
    lines = [Line(f"{MEMORY_FIELDS[f]} (attempt {s.attempt})", MEMORY_COLORS[f], [(p.step, p.value) for p in s.points])
             for f in fields for s in segs[f]]
    top = caps[0][0] if caps else math.inf
    levels = [Level(gib, f"{label} {gib:.2f} GiB", "#555" if i == 0 else "#999") for i, (gib, label) in enumerate(caps)]
    note = "" if cuda else ('<p class="muted small">No CUDA allocator figures (a CPU run): host RSS of the '
                            "training process.</p>")
    chart = line_chart("memory", lines, marks=step_marks(run, fail_y=top, only_oom=True), levels=levels if cuda else [],
                       y_label="GiB", y_zero=True, x_extent=_extent(events))
    legend = _legend([(MEMORY_FIELDS[f], MEMORY_COLORS[f]) for f in fields] + [("OOM", FAIL_COLOR)],
                     dashed=[("card memory", "#555")] if caps and cuda else [])
    return f"<section><h2>Memory per step</h2>{note}{chart}{legend}{_rules_note()}</section>"


def _extent(events: list[dict[str, Any]]) -> tuple[float, ...]:
    planned = max_steps(events)
    return (0.0,) if planned is None else (0.0, float(planned))


def _rules_note() -> str:
    return ('<p class="muted small">Dashed rules: where each later attempt resumed (hover for the rung taken); '
            "points: where an attempt failed.</p>")


def metrics_section(run: dict[str, Any], events: list[dict[str, Any]]) -> str:
    logs, source = trainer_logs(events), "the guard's trainer_log events"
    if not logs:
        logs, source = checkpoint_log_history(run), "the newest checkpoint's trainer_state.json (one lineage)"
    parts = []
    for key, title, y_label in METRICS:
        segs = [s for s in metric_segments(run, logs, key) if s.points]
        if not segs:
            continue
        values = [p.value for s in segs for p in s.points]
        marks = step_marks(run, fail_y=math.inf)
        nan = [Mark(p.step, f"attempt {s.attempt}: {key} = {p.value} at step {p.step:g}", FAIL_COLOR, y=math.inf,
                    shape="cross") for s in segs for p in s.points if not math.isfinite(p.value)]
        chart = line_chart(key, _attempt_lines(segs), marks=marks + nan, y_label=y_label, x_extent=_extent(events),
                           y_zero=key == "learning_rate" and min(values, default=0) >= 0)
        parts.append(f"<h2>{escape(title.capitalize())} per step</h2>{chart}"
                     f"{_legend(_attempt_legend(segs) + [('failure / NaN', FAIL_COLOR)])}")
    if not parts:
        return ('<section><h2>Loss and learning rate</h2><p class="muted">No trainer logs in the journal or the '
                "checkpoints.</p></section>")
    return (f'<section>{"".join(parts)}<p class="muted small">From {escape(source)}; one colour per attempt, so '
            "steps trained again after a rollback are drawn twice.</p></section>")


def render_html(run: dict[str, Any], events: list[dict[str, Any]], problems: list[str], *, run_dir: str = "") -> str:
    doc = build_document(run, events, problems)
    title = f"oomguard report · {Path(run_dir).name or 'run'} · {doc['status']}"
    body = [header_section(doc, run, run_dir), memory_section(run, events), metrics_section(run, events),
            attempts_section(doc, run, events), knobs_section(doc, events)]
    foot = (f'<p class="muted small">oomguard {escape(__version__)} · {escape(doc["schema"])} · written '
            f'{escape(time.strftime("%Y-%m-%d %H:%M:%S"))} · {plural(len(events), "journal line")}</p>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main>{"".join(body)}{foot}</main></body></html>\n')


def render_run_html(run_dir: str | Path) -> str:
    """The page of a run dir (RunDirError, exit 2, when no report can be made of it)."""
    return render_html(*load_run(run_dir), run_dir=str(run_dir))


def write_html(run_dir: str | Path, out: str | Path) -> Path:
    out = Path(out)
    text = render_run_html(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
