"""The HTML report from hand-made records: every chart drawn from the journal's per-step events, one
colour per attempt, rung and failure markers, the card's memory, and nothing fetched from anywhere."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

from oomguard.report.html import ATTEMPT_COLORS, render_html, step_marks
from oomguard.report.plot import Line, Mark, line_chart, nice_ticks
from oomguard.report.series import (
    attempt_of,
    memory_caps,
    memory_segments,
    metric_segments,
    trainer_logs,
)

GIB = 2**30
KNOBS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_seq_length": 512}
HALVED = {**KNOBS, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
OOM = {"kind": "cuda_oom", "step": 4, "phase": "forward_backward", "detail": "CUDA out of memory", "rank": 0}
RETRY = {"action": "retry",
         "reason": "CUDA OOM at step 4: per_device_train_batch_size 8 → 4; resuming from checkpoint-4",
         "resume_from": "/x/checkpoint-4", "rung": {"ladder": "cuda_oom", "index": 1},
         "changes": [{"knob": "per_device_train_batch_size", "old": 8, "new": 4},
                     {"knob": "gradient_accumulation_steps", "old": 2, "new": 4}]}


def _run():
    attempts = [
        {"n": 1, "started": 100.0, "ended": 110.0, "exit_code": 1, "failure": OOM, "decision": RETRY, "knobs": KNOBS,
         "orders": {}, "rung": None, "resumed_from": None, "verified": {}, "max_step": 4},
        {"n": 2, "started": 112.0, "ended": 130.0, "exit_code": 0, "failure": None, "decision": None, "knobs": HALVED,
         "orders": HALVED, "rung": {"ladder": "cuda_oom", "index": 1}, "resumed_from": "/x/checkpoint-4",
         "verified": {"per_device_train_batch_size": "verified"}, "max_step": 8}]
    return {"status": "succeeded", "exit_code": 0, "started": 99.0, "ended": 131.0, "requested": dict(KNOBS),
            "config": dict(HALVED), "world_size": 1, "attempts": attempts, "requested_source": "observed",
            "root_cause": None, "policy": "test", "command": ["python", "train.py", "--x", "<evil>"],
            "vram_limit": "24GiB"}


def _events():
    ev = [{"time": 100.5, "event": "vram_limit", "rank": 0, "limit": 24 * GIB, "accounted": 23 * GIB}]
    for attempt, t0, steps in ((1, 101.0, range(1, 5)), (2, 114.0, range(5, 9))):
        for s in steps:
            t = t0 + s
            ev.append({"time": t, "event": "step", "rank": 0, "step": s, "max_steps": 8, "attempt": attempt})
            ev.append({"time": t, "event": "memory", "rank": 0, "step": s, "allocated": (5 + s) * GIB,
                       "reserved": (7 + s) * GIB, "step_peak": (9 + s) * GIB})
            ev.append({"time": t, "event": "trainer_log", "rank": 0, "step": s,
                       "logs": {"loss": 2.0 - s / 10, "learning_rate": 1e-4, "grad_norm": 1.0}})
    ev.append({"time": 115.0, "event": "change_verified", "source": "supervisor", "attempt": 2,
               "knob": "per_device_train_batch_size", "expected": 4, "observed": 4, "why": None})
    return ev


class _Svg(HTMLParser):
    """Collects each chart's drawn shapes and every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, list[tuple[str, dict]]] = {}
        self.current: str | None = None
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href", "xlink:href", "action") and v]
        if tag == "svg" and "chart" in (a.get("class") or ""):
            self.current = a["id"]
            self.charts[self.current] = []
        elif self.current:
            self.charts[self.current].append((tag, a))

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None


def _parse(page: str) -> _Svg:
    p = _Svg()
    p.feed(page)
    return p


def test_every_chart_is_drawn_with_real_coordinates():
    page = render_html(_run(), _events(), [], run_dir="/runs/a")
    p = _parse(page)
    assert set(p.charts) == {"memory", "loss", "learning_rate", "grad_norm", "timeline"}
    for chart in ("memory", "loss", "learning_rate", "grad_norm"):
        lines = [a for tag, a in p.charts[chart] if tag == "polyline" and a.get("class") == "series"]
        assert lines, chart
        for a in lines:
            pts = [tuple(map(float, xy.split(","))) for xy in a["points"].split()]
            assert len(pts) >= 2 and all(math.isfinite(x) and math.isfinite(y) for x, y in pts)
            assert all(0 <= x <= 960 and 0 <= y <= 280 for x, y in pts)
    bars = [a for tag, a in p.charts["timeline"] if tag == "rect"]
    assert len(bars) >= 2 and all(float(a["width"]) > 0 for a in bars)


def test_one_colour_per_attempt_and_markers_for_rung_failure_and_cap():
    page = render_html(_run(), _events(), [], run_dir="/runs/a")
    p = _parse(page)
    loss_colours = {a["stroke"] for tag, a in p.charts["loss"] if tag == "polyline"}
    assert loss_colours == {ATTEMPT_COLORS[0], ATTEMPT_COLORS[1]}
    assert "attempt 2 resumed from step 4: per_device_train_batch_size 8 → 4" in page
    assert "attempt 1: cuda_oom after step 4" in page
    assert "card (--vram-limit) 24.00 GiB" in page and "allocator cap 23.00 GiB" in page
    assert "✓ verified" in page and "0 steps redone" in page


def test_nothing_external_and_text_escaped():
    page = render_html(_run(), _events(), [], run_dir="/runs/<a>")
    p = _parse(page)
    assert p.refs == [] and not ({"script", "link", "img", "iframe"} & p.tags)
    assert not re.search(r"https?://|url\(|@import", page)
    assert "<evil>" not in page and "&lt;evil&gt;" in page and "&lt;a&gt;" in page


def test_a_run_without_per_step_events_still_renders_its_tables():
    run = _run()
    run.pop("vram_limit")
    page = render_html(run, [], [], run_dir="/runs/a")
    p = _parse(page)
    assert set(p.charts) == {"timeline"}
    assert "No memory events in the journal" in page and "No trainer logs" in page


def test_series_split_by_attempt_and_rollback_is_its_own_segment():
    run = _run()
    ev = _events() + [{"time": 125.0, "event": "trainer_log", "rank": 0, "step": 6, "logs": {"loss": float("nan")}},
                      {"time": 125.0, "event": "trainer_log", "rank": 1, "step": 6, "logs": {"loss": 9.0}}]
    segs = metric_segments(run, trainer_logs(ev), "loss")
    assert [s.attempt for s in segs] == [1, 2]
    assert [p.step for p in segs[1].points] == [5, 6, 7, 8] and math.isnan(segs[1].points[1].value)
    mem = memory_segments(run, ev)
    assert set(mem) == {"allocated", "reserved", "step_peak"} and mem["step_peak"][0].points[0].value == 10.0
    assert attempt_of(run["attempts"], 111.0) == 1 and attempt_of(run["attempts"], 50.0) is None


def test_memory_caps_from_the_event_else_run_json_else_gpu():
    run = _run()
    assert memory_caps(run, _events())[0] == (24.0, "card (--vram-limit)")
    assert memory_caps(run, []) == [(24.0, "card (--vram-limit)")]
    run.pop("vram_limit")
    run["gpu"] = {"name": "NVIDIA L4", "total_gib": 22.5}
    assert memory_caps(run, []) == [(22.5, "card (NVIDIA L4)")]
    run["gpu"] = None
    assert memory_caps(run, []) == []


def test_failure_point_sits_after_the_last_completed_step():
    marks = step_marks(_run(), fail_y=24.0)
    fail = [m for m in marks if m.y is not None]
    assert [(m.x, m.y) for m in fail] == [(4.5, 24.0)]
    assert [m.x for m in marks if m.y is None] == [4.0]


def test_line_chart_breaks_at_nan_and_clamps_marks():
    svg = line_chart("c", [Line("a", "#000", [(0, 1.0), (1, 2.0), (2, float("nan")), (3, 1.0), (4, 1.5)])],
                     marks=[Mark(2, "nan", "#f00", y=math.inf, shape="cross")])
    assert svg.count("<polyline") == 2 and "inf" not in svg and "nan" not in svg.replace(">nan<", "")


def test_nice_ticks_cover_the_range():
    assert nice_ticks(0, 24) == [0, 5, 10, 15, 20, 25]
    t = nice_ticks(0.0003, 0.001)
    assert t[0] <= 0.0003 and t[-1] >= 0.001 and len(t) <= 8
    assert nice_ticks(3, 3) == [3]


def test_a_grow_back_is_in_the_head_as_the_text_summary_says_it():
    run = _run()
    run["attempts"][1]["decision"] = {"action": "retry", "reason": "grow back: batch 4 → 8 after 3 steps below 50 %",
                                      "resume_from": "/x/checkpoint-8", "changes": RETRY["changes"], "rung": None}
    run["attempts"].append({**run["attempts"][0], "n": 3, "started": 132.0, "ended": 140.0, "exit_code": 0,
                            "failure": None, "decision": None, "resumed_from": "/x/checkpoint-8", "max_step": 12})
    events = [*_events(), {"time": 133.0, "event": "grow_back", "attempt": 3, "verified": True, "why": None}]
    page = render_html(run, events, [], run_dir="/runs/a")
    assert "Grow-backs:" in page and "grew back after attempt 2: batch 4 → 8 after 3 steps below 50 % (in force in " \
        "the child)" in page
    assert "Grow-backs:" not in render_html(_run(), _events(), [], run_dir="/runs/a")
