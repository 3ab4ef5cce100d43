"""The morning summary: root cause first, then every change made to the requested recipe.

Built from ``run.json`` and ``events.jsonl`` only, so ``oomguard report DIR`` on a finished
(or dead) run prints the same thing the supervisor printed at its end.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..knobs import CORE, effective_batch
from ..protocol import EVENT_STEP, EVENTS_JSONL, RUN_JSON, read_jsonl
from ..supervisor.journal import event_problem, read_run_json, record_problems

__all__ = ["GrowBack", "Recovery", "RunSummary", "next_step_time", "seconds_to_next_step", "where_text", "plain_steps",
           "plural", "load_run", "summarize", "summarize_loaded", "has_root_cause", "render_text", "grow_line",
           "MAX_PROBLEM_LINES"]



@dataclasses.dataclass(frozen=True)
class Recovery:
    attempt: int
    kind: str
    step: int | None
    phase: str
    reason: str
    resumed_from: str | None
    steps_redone: int | None  # completed steps the resume point is behind the failure
    seconds_to_next_step: float | None  # failure -> next completed optimizer step
    truncation_share: float | None = None  # share of training tokens beyond the new max_seq_length
    changes: tuple[dict[str, Any], ...] = ()  # the decision's {knob, old, new}
    rung: dict[str, Any] | None = None  # {ladder, index} of the rung taken


@dataclasses.dataclass(frozen=True)
class GrowBack:
    """Issue 18 item 5: an attempt that ended without a failure yet with a retry decision: it stopped at a
    checkpoint so the next one runs the batch from before a ``halve_batch`` rung."""

    attempt: int  # the attempt that stopped for it
    reason: str
    resumed_from: str | None
    steps_redone: int | None  # completed steps the resume point is behind the stop
    seconds_to_next_step: float | None  # the stop -> the next completed optimizer step
    changes: tuple[dict[str, Any], ...] = ()
    verified: bool | None = None  # the next attempt's ``grow_back`` event; None: no verdict journaled
    why: str | None = None  # why not, where not verified


@dataclasses.dataclass(frozen=True)
class RunSummary:
    status: str
    exit_code: int | None
    attempts: int
    wall_s: float
    root_cause: str | None
    requested: dict[str, Any]
    final: dict[str, Any]
    world_size: int
    recoveries: tuple[Recovery, ...]
    final_step: int | None
    skipped_checkpoints: tuple[str, ...]
    requested_source: str = "command"
    checks: dict[str, str] = dataclasses.field(default_factory=dict)  # knob -> the latest verdict on its change
    not_applied: tuple[str, ...] = ()  # one line per change the child did not show
    problems: tuple[str, ...] = ()  # what is wrong with the run's files (skipped journal lines, a bad decision)
    failures: int = 0  # attempts that ended in a failure
    guard_notes: tuple[str, ...] = ()  # the stack outside the tested range, degraded guard parts, an LR note
    split_steps: tuple[tuple[int, int], ...] = ()  # issue 19: (optimizer step, factor) trained as smaller micro-batches
    quarantined: tuple[int, ...] = ()  # issue 19: training-set rows never trained (skipped in the ledger)
    grow_backs: tuple[GrowBack, ...] = ()  # issue 18 item 5: returns to the batch before a halve_batch rung


def _step_of(path: str | None) -> int | None:
    if not path:
        return None
    tail = Path(path).name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def next_step_time(events: list[dict[str, Any]], attempt: dict[str, Any] | None, since: float) -> float | None:
    """When ``attempt`` (a run.json attempt) completed its first optimizer step after ``since``: the time of
    its first ``step`` event (any rank), or None when it made none. An event names its attempt; one
    without that field counts by time from the attempt's start."""
    if not attempt:
        return None
    n, started = attempt.get("n"), attempt.get("started") or since
    times = [e["time"] for e in events
             if e.get("event") == EVENT_STEP and isinstance(e.get("time"), (int, float)) and e["time"] > since
             and (e.get("attempt") == n if isinstance(e.get("attempt"), int) else e["time"] >= started)]
    return min(times, default=None)


def seconds_to_next_step(events: list[dict[str, Any]], failed: dict[str, Any],
                         nxt: dict[str, Any] | None) -> float | None:
    """A recovery's cost in time: from the failure (the failed attempt's end, as the supervisor saw it)
    to the next attempt's first completed optimizer step (its first ``step`` event)."""
    failed_at = failed.get("ended")
    if not isinstance(failed_at, (int, float)):
        return None
    at = next_step_time(events, nxt, failed_at)
    return at - failed_at if at is not None else None


def where_text(step: Any) -> str:
    """A failure's ``step`` is the last completed optimizer step: "after step 3", or, with none
    completed (or none known), "before the first optimizer step"."""
    return f"after step {step}" if isinstance(step, int) and not isinstance(step, bool) else \
        "before the first optimizer step"


def _failure_text(failure: dict[str, Any] | None, world_size: int) -> str | None:
    """"rank 1: cuda_oom after step 3: <detail>" — the failing rank first when several processes ran."""
    if not failure:
        return None
    text = f"{failure.get('kind', '?')} {where_text(failure.get('step'))}"
    detail = str(failure.get("detail") or "").strip()
    text += f": {detail}" if detail else ""
    return f"rank {failure.get('rank', 0)}: {text}" if world_size > 1 else text


_HEAD = re.compile(r"^((?:rank \d+: )?)([^:]*)")


def plain_steps(text: str) -> str:
    """One wording for a failure's step in texts written elsewhere (run.json's root cause, a decision's
    reason): "at step N" -> "after step N", "at step None" -> "before the first optimizer step".
    Only the head (before the first ": ") is touched: the child's own message stays as it was."""
    def fix(m: re.Match) -> str:
        head = re.sub(r"\bat step None(?: \(unknown\))?", "before the first optimizer step", m.group(2))
        head = re.sub(r"\bat step (\d+)", r"after step \1", head)
        return m.group(1) + head.replace(" (unknown)", "")
    return _HEAD.sub(fix, text, count=1)


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _retry_cost(a: dict[str, Any], nxt: dict[str, Any] | None, events: list[dict[str, Any]],
                step: Any) -> dict[str, Any]:
    """What a retry after attempt ``a`` (stopped after optimizer step ``step``) cost: where the next attempt
    resumed, the completed steps that resume point is behind ``step``, the seconds to the next step."""
    resumed = nxt.get("resumed_from") if nxt else (a.get("decision") or {}).get("resume_from")
    ck = _step_of(resumed)
    redone = (step - ck) if isinstance(step, int) and ck is not None else None
    return {"resumed_from": resumed, "steps_redone": redone,
            "seconds_to_next_step": seconds_to_next_step(events, a, nxt)}


def _verdict(events: list[dict[str, Any]], attempt: int, ran: bool) -> tuple[bool | None, str | None]:
    """The supervisor's last ``grow_back`` verdict on ``attempt`` (Trust rule 3): (verified, why); verified
    None where there is none (``ran``: whether that attempt started at all)."""
    e = next((e for e in reversed(events) if e.get("event") == "grow_back" and e.get("attempt") == attempt), None)
    if e is None:
        return None, (f"no grow_back verdict journaled for attempt {attempt}" if ran else "no later attempt ran it")
    return e.get("verified") is True, (str(e["why"]) if e.get("why") else None)


def _retries(run: dict[str, Any], events: list[dict[str, Any]]) -> tuple[list[Recovery], list[GrowBack]]:
    """Every retry decision: after a failure (a recovery) and, with no failure, a grow-back."""
    recoveries, grow_backs = [], []
    attempts = run.get("attempts", [])
    for a, nxt in zip(attempts, attempts[1:] + [None]):
        f, d = a.get("failure"), a.get("decision") or {}
        if d.get("action") != "retry":
            continue
        changes = tuple(c for c in d.get("changes") or () if isinstance(c, dict))
        if not f:
            verified, why = _verdict(events, a["n"] + 1, nxt is not None)
            grow_backs.append(GrowBack(attempt=a["n"], reason=d.get("reason", ""), changes=changes,
                                       verified=verified, why=why, **_retry_cost(a, nxt, events, a.get("max_step"))))
            continue
        recoveries.append(Recovery(attempt=a["n"], kind=f.get("kind", "?"), step=f.get("step"),
                                   phase=f.get("phase", "unknown"), reason=d.get("reason", ""),
                                   truncation_share=d.get("truncation_share"), changes=changes, rung=d.get("rung"),
                                   **_retry_cost(a, nxt, events, f.get("step"))))
    return recoveries, grow_backs


def _read_run(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """run.json and its non-fatal problems; RunDirError (exit 2) when no summary can be made of it."""
    path = run_dir / RUN_JSON
    run = read_run_json(path)
    problems = record_problems(run)
    fatal = [f"{path}: {where}: {what}" for where, what, is_fatal in problems if is_fatal]
    if fatal:
        raise RunDirError("\n".join(fatal) + "\nfix run.json by hand or move the run dir aside; "
                          "no summary can be made from it")
    return run, [f"{path}: {where}: {what}" for where, what, _ in problems]


def _read_events(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The usable journal lines, and one line naming each skipped one (a line of wrong types)."""
    events, problems = [], []
    for n, e in enumerate(read_jsonl(run_dir / EVENTS_JSONL), 1):
        why = event_problem(e)
        if why is None:
            events.append(e)
        else:
            problems.append(f"{run_dir / EVENTS_JSONL}: event {n} ({str(e.get('event'))[:40]}) skipped: {why}")
    if len(problems) > MAX_PROBLEM_LINES:  # a garbled journal must not bury the summary
        problems = problems[:MAX_PROBLEM_LINES] + [f"{run_dir / EVENTS_JSONL}: {len(problems) - MAX_PROBLEM_LINES} "
                                                   "more line(s) skipped for wrong types"]
    return events, problems


MAX_PROBLEM_LINES = 10


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """run.json, the usable journal lines, and every problem found in either (RunDirError when fatal)."""
    run_dir = Path(run_dir)
    run, problems = _read_run(run_dir)
    events, skipped_lines = _read_events(run_dir)
    return run, events, problems + skipped_lines


def summarize(run_dir: str | Path) -> RunSummary:
    return summarize_loaded(*load_run(run_dir))


def summarize_loaded(run: dict[str, Any], events: list[dict[str, Any]], problems: list[str]) -> RunSummary:
    attempts = run.get("attempts", [])
    steps = [a.get("max_step") for a in attempts if isinstance(a.get("max_step"), int)]
    end = run.get("ended") or run.get("updated") or run.get("started", 0)
    first_failure = next((a["failure"] for a in attempts if a.get("failure")), None)
    root = run.get("root_cause") or _failure_text(first_failure, run.get("world_size", 1))
    skipped = tuple(sorted({str(e["path"]) for e in events
                            if e.get("event") == "checkpoint_skipped" and e.get("path")}))
    checks = {k: v for a in attempts for k, v in (a.get("verified") or {}).items()}
    missed = tuple(dict.fromkeys(
        f"{e.get('knob')} → {e.get('expected')} (attempt {e.get('attempt')}): {e.get('why')}"
        for e in events if e.get("event") == "change_not_applied"))
    recoveries, grow_backs = _retries(run, events)
    return RunSummary(status=run["status"], exit_code=run.get("exit_code"), attempts=len(attempts),
                      wall_s=end - run.get("started", end), root_cause=root, requested=run.get("requested", {}),
                      final=run.get("config", {}), world_size=run.get("world_size", 1),
                      recoveries=tuple(recoveries), final_step=max(steps) if steps else None,
                      skipped_checkpoints=skipped, requested_source=run.get("requested_source", "command"),
                      checks=checks, not_applied=missed, problems=tuple(problems),
                      failures=sum(1 for a in attempts if a.get("failure")), guard_notes=_guard_notes(events),
                      grow_backs=tuple(grow_backs), **_culprits(attempts))


def _culprits(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every step split and every row quarantined over the run (each decision's order holds all before it)."""
    split: dict[int, int] = {}
    rows: set[int] = set()
    for a in attempts:
        order = (a.get("decision") or {}).get("culprit") or {}
        for step, factor in (order.get("split") or {}).items():
            if str(step).isdigit() and isinstance(factor, int):
                split[int(step)] = max(factor, split.get(int(step), 1))
        rows |= {r for r in order.get("quarantine") or () if isinstance(r, int)}
    return {"split_steps": tuple(sorted(split.items())), "quarantined": tuple(sorted(rows))}


def _guard_notes(events: list[dict[str, Any]]) -> tuple[str, ...]:
    """One line per distinct stack warning (``guard_stack``), degraded guard part (``guard_degraded``) and
learning-rate note (``lr_note``)."""
    notes = []
    for e in events:
        if e.get("event") == "guard_stack" and not e.get("tested", True):
            notes += [f"guard stack: {line}" for line in [*e.get("outside", []), *e.get("missing", [])]]
        elif e.get("event") == "guard_degraded":
            notes.append(f"guard degraded: {e.get('part')}: {e.get('error')} ({e.get('consequence')})")
        elif e.get("event") == "lr_note":
            notes.append(f"note: {e.get('note')}")
    return tuple(dict.fromkeys(notes))


def _knob_lines(s: RunSummary) -> list[str]:
    lines = []
    for k in [*CORE, *sorted((set(s.requested) | set(s.final)) - set(CORE))]:
        if k not in s.requested and k not in s.final:
            continue
        req, fin = s.requested.get(k), s.final.get(k)
        lines.append(f"  {k:<30} {str(req):>10} → {str(fin):<10}{_mark(req, fin, s.checks.get(k))}")
    eb_req, eb_fin = effective_batch(s.requested, s.world_size), effective_batch(s.final, s.world_size)
    if eb_req is not None:
        note = "kept" if eb_req == eb_fin else "CHANGED"
        lines.append(f"  {'effective batch':<30} {eb_req:>10} → {eb_fin!s:<10}  ({note}, world size {s.world_size})")
    return lines


def _mark(requested: Any, final: Any, check: str | None) -> str:
    """A changed knob says whether the child showed it: only a verified change reads "changed"."""
    if check == "not_applied":
        return "  (not applied)"
    if requested == final:
        return ""
    return "  (changed)" if check == "verified" else "  (not verified in the child)"


def has_root_cause(s: RunSummary) -> bool:
    """A run that succeeded with no failure has no root cause, whatever a stale field says."""
    return bool(s.root_cause and s.root_cause.strip()) and not (s.status == "succeeded" and s.failures == 0)


def grow_line(attempt: int, reason: str, verified: bool | None, why: str | None) -> str:
    """"grew back after attempt 2: batch 4 → 8 (accumulation 2 → 1) after ... (in force in the child)". Trust
    rule 3: "grew back" only where the next attempt's child showed the grown batch; otherwise "grow back after
    attempt 2: ... (not applied: <why>)", or "(not verified in the child: <why>)" with no verdict journaled."""
    reason = re.sub(r"^grow back: ", "", reason.strip())  # the decision's own head, said once
    if verified:
        return f"grew back after attempt {attempt}: {reason} (in force in the child)"
    verdict = f"not verified in the child: {why}" if verified is None else f"not applied: {why or 'not shown'}"
    return f"grow back after attempt {attempt}: {reason} ({verdict})"


def render_text(s: RunSummary) -> str:
    head = {"succeeded": "finished", "gave_up": "GAVE UP", "failed": "FAILED", "interrupted": "was interrupted",
            "running": "is still running (or its supervisor died)"}.get(s.status, s.status)
    lines = [f"oomguard: run {head} after {plural(s.attempts, 'attempt')}, "
             f"{plural(len(s.recoveries), 'recovery', 'recoveries')}, "
             f"{s.wall_s:.0f} s; last step {s.final_step if s.final_step is not None else '-'}; "
             f"exit code {s.exit_code}"]
    if has_root_cause(s):
        # one line: the child's detail can run on (the full text is in run.json / error.json)
        lines.append(f"root cause: {plain_steps(s.root_cause.strip().splitlines()[0])}")
    for r in s.recoveries:
        cost = []
        if r.steps_redone is not None:
            cost.append(f"{plural(r.steps_redone, 'step')} redone")
        if r.seconds_to_next_step is not None:
            cost.append(f"{r.seconds_to_next_step:.1f} s to the next step")
        lines.append(f"  recovery after attempt {r.attempt}: {plain_steps(r.reason)}"
                     + (f" [cost: {', '.join(cost)}]" if cost else ""))
    lines += [f"  {grow_line(g.attempt, g.reason, g.verified, g.why)}" for g in s.grow_backs]
    for path in s.skipped_checkpoints:
        lines.append(f"  skipped incomplete checkpoint (kept on disk): {path}")
    for line in s.not_applied:
        lines.append(f"  change not applied: {line}")
    for line in s.problems:
        lines.append(f"  problem: {line}")
    for line in s.guard_notes:
        lines.append(f"  {line}")
    if s.split_steps:
        steps = ", ".join(f"step {step} ×{factor} ({s.checks.get(f'culprit_split@{step}', 'unverified')})"
                          for step, factor in s.split_steps)
        lines.append(f"  culprit steps trained as smaller micro-batches (same rows, same effective batch): {steps}")
    if s.quarantined:
        check = s.checks.get("quarantine", "unverified")
        lines.append(f"  quarantined rows (never trained, skipped in the ledger; {check}): {list(s.quarantined)}")
    source = "as the child ran it" if s.requested_source == "observed" else "from the command's flags only"
    lines.append(f"requested ({source}) → final:")
    lines += _knob_lines(s)
    return "\n".join(lines)
