"""Opening a run dir: a new run's record, or the continuation of one — closing first the attempt
a dead supervisor left open (its child got SIGTERM and saved; whatever is left of it is stopped)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from ..protocol import POLICY_COPY, STDERR_LOG, ErrorRecord, Event, RunStatus, find_oom
from ..protocol.run_record import AttemptRecord, Failure, RunRecord
from .attempt import max_step, watch_of
from .evidence import attempt_failure, error_records
from .journal import Journal, load_record
from .process import TAIL_BYTES, TAIL_LINES, ChildOutcome, reap_orphan
from .ranks import root_cause_text
from .recipe import observe_attempt
from .spec import RunSpec, say
from .tree import run_processes, stop_processes

__all__ = ["open_journal"]


def open_journal(spec: RunSpec, now: float) -> Journal:
    """The run dir's journal: a new record (``run_started``) or the one on disk, running again
    (``run_continued``), its last attempt closed if a dead supervisor left it open."""
    record = load_record(spec.run_dir)
    if record is None:
        return _new_run(spec, now)
    journal = Journal(spec.run_dir, record)
    was = record.status
    record.status = RunStatus.RUNNING
    record.ended = record.exit_code = record.give_up = record.root_cause = None
    if record.attempts and record.attempts[-1].ended is None:
        _close_abandoned(spec, journal, record.attempts[-1], now)
    journal.save()
    journal.event(Event.RUN_CONTINUED, after_attempts=len(record.attempts), knobs=record.config, previous_status=was)
    return journal


def _new_run(spec: RunSpec, now: float) -> Journal:
    record = RunRecord(status=RunStatus.RUNNING, command=list(spec.command), policy=spec.policy.name,
                       policy_file=str(getattr(spec.policy, "source", "")), requested=dict(spec.requested),
                       config={**spec.requested, **spec.orders},
                       checkpoint_dir=str(spec.checkpoint_dir) if spec.checkpoint_dir else "",
                       world_size=spec.world_size, gpu=dataclasses.asdict(spec.gpu) if spec.gpu else None,
                       vram_limit=spec.vram_limit, inject=spec.inject, orders=dict(spec.orders),
                       start_from_policy=spec.start_from_policy, started=now, updated=now)
    journal = Journal(spec.run_dir, record)
    _copy_policy(spec)
    journal.save()
    journal.event(Event.RUN_STARTED, command=list(spec.command), policy=spec.policy.name,
                  knobs=record.requested, world_size=spec.world_size, gpu=record.gpu,
                  policy_orders=record.orders or None)
    if record.orders:
        say(spec, f"starting from policy {spec.policy.name}'s knobs (not the command's): "
             + ", ".join(f"{k}={v}" for k, v in record.orders.items()))
    return journal


def _copy_policy(spec: RunSpec) -> None:
    source = getattr(spec.policy, "source", None)
    if source and Path(source).is_file():
        shutil.copyfile(source, spec.run_dir / POLICY_COPY)


def _close_abandoned(spec: RunSpec, journal: Journal, attempt: AttemptRecord, now: float) -> None:
    """The previous supervisor died (SIGKILL, power) mid-attempt: its run.json says ``running``
    and the attempt never ended. Its child got SIGTERM (PR_SET_PDEATHSIG) and saved; whatever
    is left of the group is stopped before a new child may touch the checkpoints."""
    grace_s = watch_of(spec).grace_s
    orphan = reap_orphan(attempt.pid, attempt.pid_started, grace_s) if attempt.pid else None
    ranks = run_processes(spec.run_dir)  # a launcher's ranks lead their own groups (supervisor/tree.py)
    if ranks:
        killed = stop_processes(ranks, grace_s)
        orphan = (orphan + "; " if orphan else "") + (
            f"{len(ranks)} more process(es) of this run dir were still running (pids "
            f"{', '.join(str(p.pid) for p in ranks)}); {killed} needed SIGKILL")
    attempt.ended = now
    attempt.interrupted = "supervisor died"
    events = journal.events()
    observe_attempt(spec, journal, attempt, events)  # where it saved, what it ran: the dead supervisor never read it
    records = error_records(journal, attempt.n)
    attempt.max_step = max_step(journal, events, attempt, records)
    failure = _abandoned_failure(spec, journal, attempt, records, events)
    if failure is not None:  # the child had failed on its own: decided on in the loop's continuation
        attempt.interrupted, attempt.failure = None, failure
    failed = attempt.failure.to_dict() if attempt.failure else None
    journal.event(Event.ATTEMPT_ABANDONED, attempt=attempt.n, pid=attempt.pid, max_step=attempt.max_step,
                  orphan=orphan or "no process of it was left", failure=failed,
                  root_cause=root_cause_text(failed, spec.world_size) if failed else None)


def _abandoned_failure(spec: RunSpec, journal: Journal, attempt: AttemptRecord, records: list[ErrorRecord],
                       events: list[dict[str, Any]]) -> Failure | None:
    """How the abandoned attempt's child failed, from what it left (error record, stderr log), or
    None when nothing says it failed on its own (it was stopped with its supervisor, and saved).
    Its exit code died with the supervisor: a record or a traceback/OOM line is the evidence."""
    tail = _log_tail(journal.attempt_dir(attempt.n) / STDERR_LOG)
    saved_on_stop = any(e.get("event") == Event.SHUTDOWN_SAVED and e.get("time", 0) >= attempt.started for e in events)
    if not records and (saved_on_stop or not ("Traceback (most recent call last)" in tail or find_oom(tail))):
        return None
    outcome = ChildOutcome(exit_code=1, signal=None, hung=False, interrupted_by=None, duration_s=0.0,
                           host_mem_peak_percent=0.0, stderr_tail=tail, pids=frozenset())
    return attempt_failure(spec, outcome, records, events, attempt.started, attempt.max_step)


def _log_tail(path: Path) -> str:
    """The last TAIL_LINES lines of a child's log (what run_child reads back for a live child)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-TAIL_LINES:])
