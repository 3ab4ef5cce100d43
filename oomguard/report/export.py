"""``oomguard report DIR --json``: the summary as one versioned JSON document.

Same sources as the text summary (``run.json`` and ``events.jsonl``), same numbers; the shape is
``REPORT_JSON_SCHEMA`` in ``oomguard/report/schema.py`` (``"schema": "oomguard.report/1"``). A field
is added without a version change only when it is optional; renaming or removing one, or changing
its meaning, makes ``oomguard.report/2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..knobs import CORE, effective_batch
from .summary import RunSummary, has_root_cause, load_run, plain_steps, summarize_loaded

__all__ = ["SCHEMA_ID", "VERIFICATIONS", "build_document", "report_document"]


SCHEMA_ID = "oomguard.report/1"
VERIFICATIONS = ("verified", "not_applied", "unverified")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _failure(f: Any) -> dict[str, Any] | None:
    if not isinstance(f, dict):
        return None
    return {"kind": str(f.get("kind", "?")), "step": _int(f.get("step")), "phase": str(f.get("phase") or "unknown"),
            "detail": str(f.get("detail") or ""), "rank": _int(f.get("rank")) or 0}


def _rung(r: Any) -> dict[str, Any] | None:
    if not isinstance(r, dict) or not isinstance(r.get("ladder"), str) or _int(r.get("index")) is None:
        return None
    return {"ladder": r["ladder"], "index": r["index"]}


def _attempt(a: dict[str, Any]) -> dict[str, Any]:
    verified = {str(k): str(v) for k, v in _dict(a.get("verified")).items()}
    return {"n": _int(a.get("n")), "started": _num(a.get("started")), "ended": _num(a.get("ended")),
            "exit_code": _int(a.get("exit_code")), "max_step": _int(a.get("max_step")),
            "failure": _failure(a.get("failure")), "interrupted": _str(a.get("interrupted")),
            "rung": _rung(a.get("rung")), "resumed_from": _str(a.get("resumed_from")),
            "knobs": _dict(a.get("knobs")), "orders": _dict(a.get("orders")), "verified": verified}


def _verification(requested: Any, final: Any, check: str | None) -> str | None:
    """The text summary's marks as values: only a change the child showed is ``verified``."""
    if check == "not_applied":
        return "not_applied"
    if requested == final:
        return None if check is None else check if check in VERIFICATIONS else "unverified"
    return "verified" if check == "verified" else "unverified"


def _knobs(s: RunSummary) -> list[dict[str, Any]]:
    out = []
    for k in [*CORE, *sorted((set(s.requested) | set(s.final)) - set(CORE))]:
        if k not in s.requested and k not in s.final:
            continue
        req, fin = s.requested.get(k), s.final.get(k)
        out.append({"knob": k, "requested": req, "final": fin, "changed": req != fin,
                    "verification": _verification(req, fin, s.checks.get(k))})
    return out


def _root_cause(s: RunSummary, run: dict[str, Any]) -> dict[str, Any] | None:
    if not has_root_cause(s):
        return None
    first = next((a for a in run.get("attempts", []) if isinstance(a, dict) and a.get("failure")), None)
    return {"text": plain_steps(s.root_cause.strip().splitlines()[0]), "full_text": s.root_cause,
            "give_up": _str(run.get("give_up")), "attempt": _int(first.get("n")) if first else None,
            "failure": _failure(first.get("failure")) if first else None}


def _not_applied(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for e in events:
        if e.get("event") != "change_not_applied":
            continue
        item = {"knob": str(e.get("knob")), "expected": e.get("expected"), "attempt": _int(e.get("attempt")),
                "why": str(e.get("why") or "")}
        key = (item["knob"], repr(item["expected"]), item["attempt"], item["why"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _changes(changes: Any) -> list[dict[str, Any]]:
    return [{"knob": str(c.get("knob")), "old": c.get("old"), "new": c.get("new")} for c in changes]


def _grow_backs(s: RunSummary) -> list[dict[str, Any]]:
    """Issue 18 item 5 (optional field of oomguard.report/1): each return to the batch before a halve_batch rung;
    ``verified``: the next attempt's child showed it (null: no verdict journaled)."""
    return [{"attempt": g.attempt, "reason": g.reason, "resumed_from": g.resumed_from, "changes": _changes(g.changes),
             "verified": g.verified, "why": g.why,
             "cost": {"steps_redone": g.steps_redone, "seconds_to_next_step": g.seconds_to_next_step}}
            for g in s.grow_backs]


def build_document(run: dict[str, Any], events: list[dict[str, Any]], problems: list[str]) -> dict[str, Any]:
    s = summarize_loaded(run, events, problems)
    eb_req, eb_fin = effective_batch(s.requested, s.world_size), effective_batch(s.final, s.world_size)
    recoveries = [{"attempt": r.attempt, "kind": r.kind, "step": _int(r.step), "phase": r.phase,
                   "reason": plain_steps(r.reason), "rung": _rung(r.rung), "resumed_from": r.resumed_from,
                   "changes": _changes(r.changes),
                   "truncation_share": _num(r.truncation_share),
                   "cost": {"steps_redone": r.steps_redone, "seconds_to_next_step": r.seconds_to_next_step}}
                  for r in s.recoveries]
    shares = [x["truncation_share"] for x in recoveries if x["truncation_share"] is not None]
    return {
        "schema": SCHEMA_ID,
        "status": s.status,
        "exit_code": _int(s.exit_code),
        "give_up": _str(run.get("give_up")),
        "root_cause": _root_cause(s, run),
        "policy": _str(run.get("policy")),
        "started": _num(run.get("started")),
        "ended": _num(run.get("ended")),
        "wall_s": float(s.wall_s),
        "final_step": s.final_step,
        "world_size": s.world_size,
        "requested_source": s.requested_source,
        "attempts": [_attempt(a) for a in run.get("attempts", []) if isinstance(a, dict)],
        "knobs": _knobs(s),
        "not_applied": _not_applied(events),
        "recoveries": recoveries,
        "grow_backs": _grow_backs(s),
        # the share of the training tokens beyond the final max_seq_length, as the last length rung measured it
        "tokens_cut": {"share": shares[-1] if shares else None,
                       "max_seq_length": {"requested": s.requested.get("max_seq_length"),
                                          "final": s.final.get("max_seq_length")}},
        "effective_batch": {"requested": eb_req, "final": eb_fin,
                            "kept": None if eb_req is None else eb_req == eb_fin, "world_size": s.world_size},
        "skipped_checkpoints": list(s.skipped_checkpoints),
        "problems": list(s.problems),
        "guard_notes": list(s.guard_notes),
        "culprits": {"split": [{"step": step, "factor": factor} for step, factor in s.split_steps],
                     "quarantined_rows": list(s.quarantined)},
    }


def report_document(run_dir: str | Path) -> dict[str, Any]:
    """The ``oomguard.report/1`` document of a run dir (RunDirError, exit 2, when none can be made)."""
    return build_document(*load_run(run_dir))
