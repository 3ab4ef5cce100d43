"""The run record as the pure policy sees it, and back: journal dicts <-> policy records.

Pure functions (no I/O): ``run.json`` keeps plain JSON, ``decide()`` takes frozen records.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..policy import AttemptView, DataProfile, Decision, Failure, RungRef
from ..protocol import FailureKind, Phase
from .journal import RunRecord


def failure_dict(failure: Failure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    out = {"kind": failure.kind.value, "step": failure.step, "phase": failure.phase.value,
           "detail": failure.detail, "rank": failure.rank}
    if failure.memory_growth:
        out["memory_growth"] = failure.memory_growth
    if failure.usage:
        out["usage"] = True
    return out


def data_profile(events: Iterable[dict[str, Any]]) -> DataProfile | None:
    """The newest ``data_profile`` event the child wrote, as the policy's record."""
    found = [e for e in events if e.get("event") == "data_profile"]
    if not found:
        return None
    e = found[-1]
    return DataProfile(count=int(e["count"]), quantiles=tuple((float(q), int(v)) for q, v in e["quantiles"]),
                       max_len=int(e["max_len"]), packed=bool(e.get("packed")))


def memory_growth(events: Iterable[dict[str, Any]], since: float) -> float | None:
    """Bytes/step of the last ``memory_growth`` a child reported after ``since`` (None: flat)."""
    found = [e for e in events if e.get("event") == "memory_growth" and e.get("time", 0) >= since]
    slope = found[-1].get("slope_bytes_per_step") if found else None
    return float(slope) if isinstance(slope, (int, float)) and slope > 0 else None


def attempt_views(record: RunRecord) -> list[AttemptView]:
    views = []
    for a in record.attempts:
        f = a.failure
        failure = Failure(kind=FailureKind(f["kind"]), step=f.get("step"), phase=phase_of(f.get("phase")),
                          detail=f.get("detail", ""), rank=f.get("rank", 0),
                          memory_growth=f.get("memory_growth"), usage=bool(f.get("usage"))) if f else None
        rung = RungRef(ladder=FailureKind(a.rung["ladder"]), index=a.rung["index"]) if a.rung else None
        views.append(AttemptView(n=a.n, knobs=a.knobs, rung=rung, failure=failure, max_step=a.max_step,
                                 resumed_step=a.resumed_step))
    return views


def phase_of(value: str | None) -> Phase:
    return Phase(value) if value else Phase.UNKNOWN


def decision_dict(d: Decision) -> dict[str, Any]:
    return {"action": d.action, "reason": d.reason, "knobs": dict(d.knobs),
            "rung": {"ladder": d.rung.ladder.value, "index": d.rung.index} if d.rung else None,
            "changes": [{"knob": c.knob, "old": c.old, "new": c.new} for c in d.changes],
            "resume_from": d.resume_from, "resume_class": d.resume_class.value if d.resume_class else None,
            "give_up": d.give_up.value if d.give_up else None, "backoff_s": d.backoff_s,
            "truncation_share": d.truncation_share, "effective_batch": list(d.effective_batch) if d.effective_batch else None,
            "lr_note": d.lr_note}
