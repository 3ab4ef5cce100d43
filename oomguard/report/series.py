"""Per-step series of a run for the HTML report: memory, trainer logs and the attempts they belong to.

Read from what the report already loaded (``run.json`` and the journal lines). The guard's ``memory``
events carry the allocator figures per optimizer step (bytes; on CPU only ``host_rss``); its
``trainer_log`` events the numbers the Trainer logged (``loss``, ``learning_rate``, ``grad_norm``…).
A line belongs to the attempt whose time span holds it, so a rollback (attempt 3 trains steps 12-15
again) is its own segment. A run journaled before ``trainer_log`` existed falls back to the newest
checkpoint's ``trainer_state.json`` ``log_history`` (one lineage, no attempt split). Stdlib only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..protocol import parse_size

__all__ = ["MEMORY_FIELDS", "Point", "Segment", "attempt_of", "checkpoint_log_history",
           "max_steps", "memory_caps", "memory_segments", "metric_segments", "resume_step", "trainer_logs"]

GIB = 2**30
# memory event field -> label; host_rss is what a CPU run has
MEMORY_FIELDS = {"allocated": "allocated", "reserved": "reserved", "step_peak": "step peak", "host_rss": "host RSS"}


@dataclasses.dataclass(frozen=True)
class Point:
    step: float
    value: float  # NaN/inf kept: the chart marks them


@dataclasses.dataclass(frozen=True)
class Segment:
    """One attempt's (or one source's) points of one quantity, in step order."""

    name: str
    attempt: int | None
    points: tuple[Point, ...]


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def attempt_of(attempts: list[dict[str, Any]], t: Any) -> int | None:
    """The attempt whose [started, ended] holds time ``t`` (the last one started before it, else)."""
    if not isinstance(t, (int, float)):
        return None
    found = None
    for a in attempts:
        start = _num(a.get("started"))
        if start is not None and start <= t:
            found = a.get("n")
    return found if isinstance(found, int) else None


def _group(rows: Iterable[tuple[int | None, float, float]], name: str) -> list[Segment]:
    by_attempt: dict[int | None, dict[float, float]] = {}
    for attempt, step, value in rows:
        by_attempt.setdefault(attempt, {})[step] = value  # a repeated step in one attempt: the last line
    return [Segment(name, n, tuple(Point(s, v) for s, v in sorted(pts.items())))
            for n, pts in sorted(by_attempt.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]


def memory_segments(run: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, list[Segment]]:
    """field -> its segments, GiB, from rank 0's ``memory`` events; fields no event has are left out."""
    attempts = [a for a in run.get("attempts", []) if isinstance(a, dict)]
    rows: dict[str, list[tuple[int | None, float, float]]] = {f: [] for f in MEMORY_FIELDS}
    for e in events:
        if e.get("event") != "memory" or e.get("rank", 0) not in (0, None) or _num(e.get("step")) is None:
            continue
        n = attempt_of(attempts, e.get("time"))
        for field in MEMORY_FIELDS:
            value = _num(e.get(field))
            if value is not None and (value > 0 or field != "host_rss"):
                rows[field].append((n, float(e["step"]), value / GIB))
    return {f: _group(r, MEMORY_FIELDS[f]) for f, r in rows.items() if r}


def trainer_logs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank 0's ``trainer_log`` events that carry a step and a logs dict."""
    return [e for e in events if e.get("event") == "trainer_log" and e.get("rank", 0) in (0, None)
            and _num(e.get("step")) is not None and isinstance(e.get("logs"), dict)]


def metric_segments(run: dict[str, Any], logs: list[dict[str, Any]], key: str) -> list[Segment]:
    """``logs[key]`` per step and attempt; a log entry without that key is skipped."""
    attempts = [a for a in run.get("attempts", []) if isinstance(a, dict)]
    rows = []
    for e in logs:
        value = _num(e["logs"].get(key))
        if value is not None:
            rows.append((e.get("attempt") if isinstance(e.get("attempt"), int) else attempt_of(attempts, e.get("time")),
                         float(e["step"]), value))
    return _group(rows, key)


def checkpoint_log_history(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The newest checkpoint's ``log_history`` as ``trainer_log``-shaped rows (no time, no attempt):
    for runs journaled before the guard wrote ``trainer_log`` events."""
    base = run.get("checkpoint_dir")
    if not isinstance(base, str) or not Path(base).is_dir():
        return []
    steps = sorted((int(p.name.rpartition("-")[2]), p) for p in Path(base).glob("checkpoint-*")
                   if p.name.rpartition("-")[2].isdigit() and (p / "trainer_state.json").is_file())
    for _, path in reversed(steps):
        try:
            history = json.loads((path / "trainer_state.json").read_text()).get("log_history")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(history, list):
            return [{"event": "trainer_log", "step": h["step"], "logs": h, "attempt": None} for h in history
                    if isinstance(h, dict) and _num(h.get("step")) is not None]
    return []


def max_steps(events: list[dict[str, Any]]) -> int | None:
    """The run's planned optimizer steps, as the guard's latest ``step`` event says (None: unknown)."""
    found = None
    for e in events:
        if e.get("event") == "step" and isinstance(e.get("max_steps"), int) and e["max_steps"] > 0:
            found = e["max_steps"]
    return found


def resume_step(attempt: dict[str, Any]) -> int | None:
    """The step an attempt resumed from (``.../checkpoint-12`` -> 12), or None."""
    tail = Path(str(attempt.get("resumed_from") or "")).name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def memory_caps(run: dict[str, Any], events: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """The card's memory, GiB, with what says so: the guard's ``vram_limit`` event (the emulated card and
    the allocator's share of it, the CUDA context being outside), else ``run.json`` ``vram_limit``, else
    the GPU's total. Empty when nothing is known (a CPU run)."""
    for e in events:
        if e.get("event") == "vram_limit" and (_num(e.get("limit")) or 0) > 0:
            caps = [(e["limit"] / GIB, "card (--vram-limit)")]
            if (_num(e.get("accounted")) or 0) > 0:
                caps.append((e["accounted"] / GIB, "allocator cap"))
            return caps
    if isinstance(run.get("vram_limit"), str):
        try:
            return [(parse_size(run["vram_limit"]) / GIB, "card (--vram-limit)")]
        except ValueError:
            pass
    gpu = run.get("gpu") if isinstance(run.get("gpu"), dict) else {}
    total = _num(gpu.get("total_gib"))
    if total and total > 0 and math.isfinite(total):
        return [(total, f"card ({gpu.get('name') or 'GPU'})")]
    return []
