"""What the journal tells ``decide()``: the attempt history and the child's reports. Pure (no I/O).

The run record's members are already the policy's types (``protocol.run_record``): an attempt's
view is its record's fields, with no conversion. The child's reports come from journal events:
the data profile and the memory growth before a failure.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..policy import AttemptView, DataProfile, Decision, Failure
from ..protocol import Event
from ..protocol.run_record import RunRecord

__all__ = ["attempt_views", "data_profile", "decision_dict", "failure_dict", "memory_growth"]


def attempt_views(record: RunRecord) -> list[AttemptView]:
    """The history as ``decide()`` reads it."""
    return [AttemptView(n=a.n, knobs=a.knobs, rung=a.rung, failure=a.failure, max_step=a.max_step,
                        resumed_step=a.resumed_step, resumed_from=a.resumed_from) for a in record.attempts]


def data_profile(events: Iterable[dict[str, Any]]) -> DataProfile | None:
    """The newest ``data_profile`` event the child wrote, as the policy's record."""
    found = [e for e in events if e.get("event") == Event.DATA_PROFILE]
    if not found:
        return None
    e = found[-1]
    return DataProfile(count=int(e["count"]), quantiles=tuple((float(q), int(v)) for q, v in e["quantiles"]),
                       max_len=int(e["max_len"]), packed=bool(e.get("packed")))


def memory_growth(events: Iterable[dict[str, Any]], since: float) -> float | None:
    """Bytes/step of the last ``memory_growth`` a child reported after ``since`` (None: flat)."""
    found = [e for e in events if e.get("event") == Event.MEMORY_GROWTH and e.get("time", 0) >= since]
    slope = found[-1].get("slope_bytes_per_step") if found else None
    return float(slope) if isinstance(slope, (int, float)) and slope > 0 else None


def failure_dict(failure: Failure | None) -> dict[str, Any] | None:
    """The failure as run.json holds it (``Failure.to_dict``), None for none."""
    return failure.to_dict() if failure is not None else None


def decision_dict(decision: Decision) -> dict[str, Any]:
    """The decision as run.json and the ``decision`` event hold it (``Decision.to_dict``)."""
    return decision.to_dict()
