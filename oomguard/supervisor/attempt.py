"""One attempt: its record and command before it starts, its env, and what it left when it ended.

The loop (``loop.py``) calls these in order: :func:`start_attempt`, :func:`child_env`, the launcher,
:func:`finish_attempt`. Times come from the loop's clock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from ..knobs import REGISTRY, effective_batch
from ..protocol import (
    CKPT_TRAINER_STATE,
    ENV_ATTEMPT,
    ENV_CHECKPOINT_DIR,
    ENV_CULPRIT,
    ENV_ERROR_FILE,
    ENV_INJECT,
    ENV_KNOBS,
    ENV_NAN_SKIP_STEPS,
    ENV_OBSERVE,
    ENV_RESUME_FROM,
    ENV_RESUME_MODE,
    ENV_REWARM_STEPS,
    ENV_RUN_DIR,
    ENV_SUPERVISOR_PID,
    ENV_VRAM_LIMIT,
    ERROR_JSON,
    KNOBS_JSON,
    ErrorRecord,
    Event,
    ResumeMode,
    atomic_write_json,
)
from ..protocol.run_record import Failure, RungRef
from .alloc_env import alloc_env
from .checkpoints import checkpoint_step, scan_checkpoints
from .command import build_command
from .culprit import next_order, verify_culprit
from .evidence import attempt_failure, error_records
from .journal import AttemptRecord, Journal
from .launch import bootstrap_env, bootstrap_outcome, launch_plan  # issue 4: the in-child bootstrap
from .process import ChildOutcome, Watch
from .progress import completed_step
from .ranks import rank_records, root_cause_text
from .recipe import observe_attempt
from .resume_point import checkpoint_dir
from .spare import spares_for
from .spec import RunSpec, policy_knobs, say
from .trackers import tracker_env

if TYPE_CHECKING:
    from .grow_back import Grown

__all__ = ["Plan", "child_env", "finish_attempt", "max_step", "start_attempt", "watch_of"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the next attempt runs: the rung applied before it, the checkpoint it resumes from
    (None: a fresh start, or attempt 1's own choice) and how it loads that checkpoint."""

    rung: RungRef | None = None
    resume_from: str | None = None
    resume_mode: ResumeMode = ResumeMode.NORMAL
    rewarm_steps: int = 0  # re-enter warm-up over this many optimizer steps (a NaN rollback's decision)
    grow: "Grown | None" = None  # issue 18 item 5: the knobs come from a grow-back (verified in the child)


def watch_of(spec: RunSpec) -> Watch:
    limits = spec.policy.limits
    return Watch(heartbeat_dir=spec.run_dir, hang_timeout_s=limits.hang_timeout_s, echo=spec.echo,
                 startup_timeout_s=limits.startup_timeout_s, condense=not spec.verbose,
                 spares=spares_for(spec.run_dir, spec.warm_spare), linger_s=limits.failed_rank_linger_s)


def start_attempt(spec: RunSpec, journal: Journal, plan: Plan, now: float) -> AttemptRecord:
    """The next attempt's record (journaled) and command: the recorded command with the orders so far."""
    record = journal.record
    n = len(record.attempts) + 1
    built = build_command(record.command, record.orders, spec.extra_flags, plan.resume_from)
    attempt = AttemptRecord(n=n, started=now, knobs=dict(record.config), rung=plan.rung,
                            resumed_from=plan.resume_from, command=list(built.argv), delivered=dict(built.delivered),
                            orders=dict(record.orders), resumed_step=checkpoint_step(plan.resume_from),
                            rewarm_steps=plan.rewarm_steps if plan.resume_from else 0,
                            culprit=next_order(record))  # issue 19: the split steps / quarantined rows so far
    record.attempts.append(attempt)
    atomic_write_json(journal.attempt_dir(n) / KNOBS_JSON, attempt.knobs)
    journal.save()
    batch = effective_batch(attempt.knobs, spec.world_size)  # what the batch rung keeps constant
    rung = plan.rung.to_dict() if plan.rung else None
    journal.event(Event.ATTEMPT_STARTED, attempt=n, knobs=attempt.knobs, rung=rung, orders=attempt.orders,
                  resumed_from=plan.resume_from, command=attempt.command, delivered=attempt.delivered,
                  world_size=spec.world_size, effective_batch=batch, launch=launch_plan(attempt.command).to_dict())
    say(spec, f"attempt {n}: " + (" ".join(f"{k}={v}" for k, v in attempt.knobs.items()) or "the command as written")
         + (f" · {spec.world_size} processes, global effective batch {batch}" if spec.world_size > 1 else "")
         + (f" · resuming from {Path(plan.resume_from).name}" if plan.resume_from else ""))
    return attempt


def child_env(spec: RunSpec, journal: Journal, attempt: AttemptRecord, mode: ResumeMode) -> dict[str, str]:
    """The environment contract (DESIGN §3) on top of ours: run dir, attempt, orders, resume point and mode."""
    env = dict(os.environ)
    env.update({
        ENV_RUN_DIR: str(spec.run_dir.absolute()), ENV_ATTEMPT: str(attempt.n),
        ENV_ERROR_FILE: str((journal.attempt_dir(attempt.n) / ERROR_JSON).absolute()),
        ENV_KNOBS: json.dumps(attempt.orders),
        ENV_VRAM_LIMIT: spec.vram_limit or "", ENV_INJECT: spec.inject or "",
        ENV_SUPERVISOR_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1",
        ENV_OBSERVE: ",".join(k for k in policy_knobs(spec.policy) if k not in REGISTRY),
        ENV_RESUME_MODE: mode.value,  # decided by policy.decide(); the child never infers it
        ENV_NAN_SKIP_STEPS: str(spec.policy.limits.nan_skip_steps),
        ENV_REWARM_STEPS: str(attempt.rewarm_steps),
        ENV_CULPRIT: json.dumps(attempt.culprit.to_dict()) if attempt.culprit else "",
    })
    if attempt.n == 1 and not attempt.resumed_from:
        # no supervisor choice yet: the command's own --resume_from_checkpoint stands (Trust rule 1),
        # and an empty value would read as "start fresh" and drop it (defect 4)
        env.pop(ENV_RESUME_FROM, None)
    else:
        env[ENV_RESUME_FROM] = attempt.resumed_from or ""  # "": a fresh start, by our choice
    if spec.redirect_checkpoints:  # the user's --checkpoint-dir: the child's output_dir moves there
        env[ENV_CHECKPOINT_DIR] = str(spec.checkpoint_dir)
    else:
        env.pop(ENV_CHECKPOINT_DIR, None)
    alloc = alloc_env(env, attempt.orders)  # DESIGN §6; issue 18 item 6: the expandable_segments rung
    env.update(alloc.updates)
    if alloc.note:  # the user's allocator config was changed: said, never silently (Trust rule 1)
        say(spec, f"attempt {attempt.n}: allocator: {alloc.note}")
    if attempt.n > 1:  # the tracker runs an earlier attempt opened (TensorBoard dir, W&B / MLflow run id)
        env.update(tracker_env(journal.events(), env))
    return bootstrap_env(env, attempt.command, attempt.delivered)


def finish_attempt(spec: RunSpec, journal: Journal, attempt: AttemptRecord, outcome: ChildOutcome,
                   now: float) -> Failure | None:
    """Read what the attempt left (records, events, checkpoints), record how it ended, journal it."""
    records = error_records(journal, attempt.n)
    events = journal.events()  # read once: progress and the bootstrap's outcome both come from it
    observe_attempt(spec, journal, attempt, events)
    attempt.max_step = max_step(journal, events, attempt, records)
    verify_culprit(spec, journal, attempt, events)
    failure = None if outcome.interrupted_by is not None else attempt_failure(
        spec, outcome, records, events, attempt.started, attempt.max_step)
    attempt.ended, attempt.exit_code, attempt.signal = now, outcome.exit_code, outcome.signal
    attempt.failure = failure
    if outcome.interrupted_by is not None:
        attempt.interrupted = signal.Signals(outcome.interrupted_by).name
    journal.save()
    failed = failure.to_dict() if failure else None
    journal.event(Event.ATTEMPT_ENDED, attempt=attempt.n, exit_code=outcome.exit_code, signal=outcome.signal,
                  duration_s=round(outcome.duration_s, 2), failure=failed, max_step=attempt.max_step,
                  interrupted_by=outcome.interrupted_by, world_size=spec.world_size,
                  root_cause=root_cause_text(failed, spec.world_size), ranks=rank_records(records),
                  bootstrap=bootstrap_outcome(launch_plan(attempt.command).delivery.value, events,
                                              attempt.started),
                  supervisor=_own_footprint())
    if failure is not None:
        on_rank = f" on rank {failure.rank}" if spec.world_size > 1 else ""
        say(spec, f"attempt {attempt.n} failed{on_rank}: {failure.kind.value} at step {failure.step} "
             f"({failure.phase.value}): {failure.detail}")
    return failure


def _own_footprint() -> dict[str, int]:
    """The supervisor's own resident memory (bytes) and open descriptors: a soak checks both stay flat."""
    me = psutil.Process()
    return {"rss": me.memory_info().rss, "fds": me.num_fds()}


def max_step(journal: Journal, events: list[dict[str, Any]], attempt: AttemptRecord,
             records: list[ErrorRecord]) -> int | None:
    """The newest optimizer step the attempt completed: its records, its progress events, the
    checkpoints written since it started (None: none; step 0 is not progress)."""
    steps = [r.step for r in records if r.step is not None]
    steps += [step for e in events if e.get("time", 0) >= attempt.started
              and (step := completed_step(e)) is not None]
    steps += [c.step for c in scan_checkpoints(checkpoint_dir(journal))
              if c.complete and _mtime(c.path) >= attempt.started]
    best = max(steps, default=0)
    return best if best > 0 else None


def _mtime(path: Path) -> float:
    try:
        return (path / CKPT_TRAINER_STATE).stat().st_mtime
    except OSError:
        return 0.0
