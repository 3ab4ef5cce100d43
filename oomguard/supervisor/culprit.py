"""Culprit batches on the supervisor's side (issue 19): the evidence the child left, the order the next
attempt is told, and the proof that an attempt applied it. Reads the run dir; never imports torch.

- :func:`culprit_views`: each attempt's view with the culprit order it ran under, the step it failed in
  (``ledger/rank<k>.inflight.jsonl``) and the tokens of the micro-batches it completed (the ledger);
- :func:`next_order`: the order the next attempt runs under (the last decision's; an interrupted attempt's
  own when no decision followed it); attempt 1 never has one (Trust rule 1);
- :func:`verify_culprit`: a split step is reported as made only from the child's ``culprit_split`` event,
  a quarantine only from the ledger's ``skipped`` rows (Trust rule 3), as ``AttemptRecord.verified``
  entries ``culprit_split@<step>`` and ``quarantine`` with a change_verified / change_not_applied event.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from ..policy.culprit import expand_runs, in_flight_from_line
from ..policy.records import AttemptView, CulpritOrder, InFlight
from ..protocol import EVENT_CHANGE_NOT_APPLIED, EVENT_CHANGE_VERIFIED, DecisionAction, Event, read_jsonl
from ..protocol.layout import LEDGER_DIR, ledger_file
from ..protocol.run_record import AttemptRecord, RunRecord
from .journal import Journal
from .observation import Verdict
from .spec import RunSpec, say

__all__ = ["QUARANTINE", "SPLIT", "culprit_views", "next_order", "quarantined_rows", "verify_culprit"]

SPLIT = "culprit_split"  # verified as culprit_split@<step>
QUARANTINE = "quarantine"


def _ledger_lines(run_dir: Path, rank: int = 0) -> list[dict[str, Any]]:
    return list(read_jsonl(ledger_file(run_dir, rank)))


def _in_flight(run_dir: Path, attempt: AttemptRecord) -> InFlight | None:
    """The attempt's in-flight record: the failing rank's (the root cause), else any rank's."""
    rank = attempt.failure.rank if attempt.failure else 0
    paths = sorted((run_dir / LEDGER_DIR).glob("rank*.inflight.jsonl"))
    own = ledger_file(run_dir, rank, kind="inflight")
    for path in sorted(paths, key=lambda p: p != own):
        found = [line for line in read_jsonl(path) if line.get("attempt") == attempt.n]
        if found:
            return in_flight_from_line(found[-1])
    return None


def culprit_views(views: Sequence[AttemptView], record: RunRecord, run_dir: Path) -> list[AttemptView]:
    """``views`` with each attempt's culprit evidence (see the module doc)."""
    lines = _ledger_lines(run_dir)
    out = []
    for view, attempt in zip(views, record.attempts):
        fitted = tuple(int(t) for line in lines if line.get("attempt") == attempt.n
                       for t in line.get("tokens") or ())
        out.append(dataclasses.replace(view, culprit=attempt.culprit, fitted_tokens=fitted,
                                       in_flight=_in_flight(run_dir, attempt) if attempt.failure else None))
    return out


def next_order(record: RunRecord) -> CulpritOrder | None:
    """The culprit order the next attempt runs under (None: none)."""
    if not record.attempts:
        return None
    last = record.attempts[-1]
    if last.decision is not None:
        return last.decision.culprit if last.decision.action is DecisionAction.RETRY else None
    return last.culprit


def quarantined_rows(record: RunRecord) -> list[int]:
    """Every row the run quarantined so far (the newest order holds them all)."""
    orders = [a.decision.culprit for a in record.attempts if a.decision and a.decision.culprit]
    return list(orders[-1].quarantine) if orders else []


def verify_culprit(spec: RunSpec, journal: Journal, attempt: AttemptRecord, events: list[dict[str, Any]]) -> None:
    """The verdicts on the attempt's culprit order, from the child's own events and ledger (Trust rule 3)."""
    order = attempt.culprit
    if not order:
        return
    mine = [e for e in events if e.get("attempt") == attempt.n]
    for step, factor in order.split:
        if step <= (attempt.resumed_step or 0):
            continue  # resumed past it: this attempt never trained that step
        _verdict(spec, journal, attempt, f"{SPLIT}@{step}", factor, *_split_verdict(mine, attempt, step, factor))
    if order.quarantine:
        lines = [line for line in _ledger_lines(spec.run_dir) if line.get("attempt") == attempt.n]
        verdict = _quarantine_verdict(lines, set(order.quarantine))
        if verdict[0] is not Verdict.UNVERIFIED or QUARANTINE not in _earlier_verdicts(journal, attempt):
            _verdict(spec, journal, attempt, QUARANTINE, list(order.quarantine), *verdict)


def _earlier_verdicts(journal: Journal, attempt: AttemptRecord) -> set[str]:
    """The names earlier attempts already have a verdict for (an attempt that never met the quarantined rows
    says nothing over one that did)."""
    return {k for a in journal.record.attempts if a.n < attempt.n for k in a.verified}


def _split_verdict(events: list[dict[str, Any]], attempt: AttemptRecord, step: int,
                   factor: int) -> tuple[Verdict, Any, str | None]:
    split = next((e for e in events if e.get("event") == Event.CULPRIT_SPLIT.value and e.get("step") == step), None)
    if split is not None:
        ok = split.get("factor") == factor and split.get("chunks", 0) > split.get("micro_batches", 0)
        return (Verdict.VERIFIED if ok else Verdict.NOT_APPLIED, split.get("factor"),
                None if ok else f"the child split step {step} by {split.get('factor')}, not {factor}")
    whole = next((e for e in events if e.get("event") == Event.CULPRIT_UNSPLITTABLE.value
                  and e.get("step") == step), None)
    if whole is not None:
        return Verdict.NOT_APPLIED, 1, f"the child could not split step {step}: {whole.get('why')}"
    if attempt.max_step is not None and attempt.max_step >= step:
        return Verdict.NOT_APPLIED, None, f"step {step} trained without a culprit_split event"
    return Verdict.UNVERIFIED, None, None


def _quarantine_verdict(lines: list[dict[str, Any]], rows: set[int]) -> tuple[Verdict, Any, str | None]:
    handed = [r for line in lines for r in expand_runs(line.get("samples") or ()) if r in rows]
    skipped = [r for line in lines for r in expand_runs(line.get("skipped") or ())]
    trained = sorted(set(handed) - set(skipped))
    if trained:
        return Verdict.NOT_APPLIED, sorted(set(skipped)), f"quarantined rows {trained} were trained"
    if not handed:
        return Verdict.UNVERIFIED, [], None
    return Verdict.VERIFIED, sorted(set(handed)), None


def _verdict(spec: RunSpec, journal: Journal, attempt: AttemptRecord, name: str, expected: Any,
             verdict: Verdict, observed: Any, why: str | None) -> None:
    attempt.verified[name] = verdict.value
    if verdict is Verdict.UNVERIFIED:
        return
    event = EVENT_CHANGE_VERIFIED if verdict is Verdict.VERIFIED else EVENT_CHANGE_NOT_APPLIED
    journal.event(event, attempt=attempt.n, knob=name, expected=expected, observed=observed, why=why)
    if verdict is Verdict.NOT_APPLIED:
        say(spec, f"change not applied: {name} → {expected}: {why}")
