"""The supervisor loop: launch, watch, classify, decide, resume. One branch per state."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from ..errors import ExitCode
from ..knobs import REGISTRY
from ..policy import CheckpointInfo, Decision, Failure, GiveUpReason, RungRef, decide, effective_batch
from ..protocol import (CKPT_TRAINER_STATE, ENV_ATTEMPT, ENV_CHECKPOINT_DIR, ENV_ERROR_FILE, ENV_INJECT, ENV_KNOBS,
                        ENV_OBSERVE, ENV_RESUME_FROM, ENV_RUN_DIR, ENV_SUPERVISOR_PID, ENV_VRAM_LIMIT, ERROR_JSON,
                        KNOBS_JSON, POLICY_COPY, STDERR_LOG, FailureKind, Phase, RunStatus, atomic_write_json,
                        find_oom, read_error_records)
from .checkpoints import checkpoint_step, quarantine_after_nan, scan_checkpoints
from .classify import classify
from .command import build_command
from .gpu import wait_gpu_released
from .history import attempt_views, data_profile, decision_dict, failure_dict, memory_growth
from .journal import AttemptRecord, Journal, RunLock, RunRecord, load_record
from .launch import bootstrap_env, bootstrap_outcome, launch_plan  # issue 4: the in-child bootstrap
from .process import (TAIL_BYTES, TAIL_LINES, ChildOutcome, StopFlag, Watch, process_started, reap_orphan,
                      run_child)
from .progress import ProgressTail, completed_step
from .ranks import rank_records, root_cause_text
from .recipe import observe_attempt
from .resume_point import checkpoint_dir, move_aside_unloadable, own_test, resume_point, usable_checkpoints
from .spec import RunSpec, policy_knobs, say
from .tree import run_processes, stop_processes

GIVE_UP_EXIT = {GiveUpReason.NO_PROGRESS: ExitCode.NO_PROGRESS,
                GiveUpReason.UNRECOVERABLE: ExitCode.CHILD_FAILED}


def supervise(spec: RunSpec) -> ExitCode:
    """Run ``spec`` to the end; the run dir says everything that happened."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    load_record(spec.run_dir)  # a foreign dir is refused before the lock file is written into it
    with RunLock(spec.run_dir):
        journal = _open_journal(spec)
        from .process import handle_stop_signals, tolerate_gone_output  # here: the module's imports are shared

        stop = StopFlag()
        # SIGINT/SIGTERM/SIGHUP stop the run (the child saves); a closed stderr (EPIPE) never ends it
        with handle_stop_signals(stop), tolerate_gone_output():
            try:
                return _loop(spec, journal, stop)
            except OSError as exc:  # the run dir stopped taking writes (disk full, remounted read-only)
                return _run_dir_failed(spec, journal, exc)


def _run_dir_failed(spec: RunSpec, journal: Journal, exc: OSError) -> ExitCode:
    """Stop what runs (its guard saves on SIGTERM), record ``failed`` if the disk still lets us,
    and say how to go on: the child's checkpoints are kept, ``--run-dir`` continues the run."""
    stop_processes(run_processes(spec.run_dir), _watch(spec, journal).grace_s)
    cause = (f"the run dir stopped taking writes: {exc} — free space on (or make writable) {spec.run_dir}, "
             f"then continue with `oomguard run --run-dir {spec.run_dir}`")
    record = journal.record
    record.status, record.exit_code, record.ended = RunStatus.FAILED.value, int(ExitCode.RUN_DIR_FAILED), time.time()
    record.root_cause = cause
    try:
        journal.save()
        journal.event("run_ended", status=record.status, exit_code=record.exit_code, root_cause=cause)
    except OSError:
        pass  # the state on disk stays "running": a continuation treats it as a dead supervisor's
    print(f"[oomguard] {cause}", file=sys.stderr, flush=True)
    return ExitCode.RUN_DIR_FAILED


def _open_journal(spec: RunSpec) -> Journal:
    record = load_record(spec.run_dir)
    if record is None:
        record = RunRecord(status=RunStatus.RUNNING.value, command=list(spec.command), policy=spec.policy.name,
                           policy_file=str(getattr(spec.policy, "source", "")), requested=dict(spec.requested),
                           config={**spec.requested, **spec.orders},
                           checkpoint_dir=str(spec.checkpoint_dir) if spec.checkpoint_dir else "",
                           world_size=spec.world_size, gpu=dataclasses.asdict(spec.gpu) if spec.gpu else None,
                           vram_limit=spec.vram_limit, inject=spec.inject, orders=dict(spec.orders),
                           start_from_policy=spec.start_from_policy)
        journal = Journal(spec.run_dir, record)
        _copy_policy(spec)
        journal.save()
        journal.event("run_started", command=list(spec.command), policy=spec.policy.name,
                      knobs=record.requested, world_size=spec.world_size, gpu=record.gpu,
                      policy_orders=record.orders or None)
        if record.orders:
            say(spec, f"starting from policy {spec.policy.name}'s knobs (not the command's): "
                 + ", ".join(f"{k}={v}" for k, v in record.orders.items()))
        return journal
    journal = Journal(spec.run_dir, record)
    was = record.status
    record.status = RunStatus.RUNNING.value
    record.ended = record.exit_code = record.give_up = record.root_cause = None
    if record.attempts and record.attempts[-1].ended is None:
        _close_abandoned(spec, journal, record.attempts[-1])
    journal.save()
    journal.event("run_continued", after_attempts=len(record.attempts), knobs=record.config, previous_status=was)
    return journal


def _close_abandoned(spec: RunSpec, journal: Journal, attempt: AttemptRecord) -> None:
    """The previous supervisor died (SIGKILL, power) mid-attempt: its run.json says ``running``
    and the attempt never ended. Its child got SIGTERM (PR_SET_PDEATHSIG) and saved; whatever
    is left of the group is stopped before a new child may touch the checkpoints."""
    grace_s = _watch(spec, journal).grace_s
    orphan = reap_orphan(attempt.pid, attempt.pid_started, grace_s) if attempt.pid else None
    ranks = run_processes(spec.run_dir)  # a launcher's ranks lead their own groups (supervisor/tree.py)
    if ranks:
        killed = stop_processes(ranks, grace_s)
        orphan = (orphan + "; " if orphan else "") + (
            f"{len(ranks)} more process(es) of this run dir were still running (pids "
            f"{', '.join(str(p.pid) for p in ranks)}); {killed} needed SIGKILL")
    attempt.ended = time.time()
    attempt.interrupted = "supervisor died"
    events = journal.events()
    observe_attempt(spec, journal, attempt, events)  # where it saved, what it ran: the dead supervisor never read it
    records = read_error_records(journal.attempt_dir(attempt.n) / ERROR_JSON)
    attempt.max_step = _max_step(journal, events, attempt, records)
    failure = _abandoned_failure(spec, journal, attempt, records, events)
    if failure is not None:  # the child had failed on its own: decided on in _continuation
        attempt.interrupted, attempt.failure = None, failure_dict(failure)
    journal.event("attempt_abandoned", attempt=attempt.n, pid=attempt.pid, max_step=attempt.max_step,
                  orphan=orphan or "no process of it was left", failure=attempt.failure,
                  root_cause=root_cause_text(attempt.failure, spec.world_size) if attempt.failure else None)


def _abandoned_failure(spec: RunSpec, journal: Journal, attempt: AttemptRecord, records: list,
                       events: list[dict[str, Any]]) -> Failure | None:
    """How the abandoned attempt's child failed, from what it left (error record, stderr log), or
    None when nothing says it failed on its own (it was stopped with its supervisor, and saved).
    Its exit code died with the supervisor: a record or a traceback/OOM line is the evidence."""
    tail = _log_tail(journal.attempt_dir(attempt.n) / STDERR_LOG)
    saved_on_stop = any(e.get("event") == "shutdown_saved" and e.get("time", 0) >= attempt.started for e in events)
    if not records and (saved_on_stop or not ("Traceback (most recent call last)" in tail or find_oom(tail))):
        return None
    outcome = ChildOutcome(exit_code=1, signal=None, hung=False, interrupted_by=None, duration_s=0.0,
                           host_mem_peak_percent=0.0, stderr_tail=tail, pids=frozenset())
    failure = classify(outcome, records, host_oom_percent=spec.policy.limits.host_oom_percent,
                       last_step=attempt.max_step)
    if failure is not None and failure.kind is FailureKind.CUDA_OOM:
        failure = dataclasses.replace(failure, memory_growth=memory_growth(events, attempt.started))
    return failure


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


def _copy_policy(spec: RunSpec) -> None:
    source = getattr(spec.policy, "source", None)
    if source and Path(source).is_file():
        shutil.copyfile(source, spec.run_dir / POLICY_COPY)


def _loop(spec: RunSpec, journal: Journal, stop: StopFlag) -> ExitCode:
    record = journal.record
    rung, resume, given_up = _continuation(spec, journal)
    if given_up is not None:
        return _give_up(journal, given_up)
    while True:
        attempt = _start_attempt(spec, journal, rung, resume)
        outcome = run_child(attempt.command, _child_env(spec, journal, attempt), journal.attempt_dir(attempt.n),
                            _watch(spec, journal), stop, ProgressTail(journal, attempt.n, spec.echo).tick,
                            on_start=lambda pid: _record_pid(journal, attempt, pid))
        failure = _finish_attempt(spec, journal, attempt, outcome)
        if outcome.interrupted_by is not None:
            return _end(journal, RunStatus.INTERRUPTED, ExitCode.INTERRUPTED,
                        root_cause=f"interrupted by {signal.Signals(outcome.interrupted_by).name}")
        if failure is None:
            return _end(journal, RunStatus.SUCCEEDED, ExitCode.SUCCESS)
        decision = _decide(spec, journal, failure)
        if decision.action == "give_up":
            return _give_up(journal, decision)
        _between_attempts(spec, journal, outcome, decision, stop)
        if stop.is_set:
            return _end(journal, RunStatus.INTERRUPTED, ExitCode.INTERRUPTED,
                        root_cause=f"interrupted by {signal.Signals(stop.signum).name} between attempts")
        record.config = dict(decision.knobs)
        record.orders.update({c.knob: c.new for c in decision.changes})  # orders from now on
        rung, resume = decision.rung, decision.resume_from


def _continuation(spec: RunSpec, journal: Journal) -> tuple[RungRef | None, str | None, Decision | None]:
    """Where a continued run picks up. A failure the previous supervisor did not live to decide on
    is decided now (defect 10); a retry decided but not started (it died, or was stopped, between
    attempts) is carried out as decided; otherwise the same knobs resume from the newest complete
    checkpoint. The third value is a give-up decision that ends the run before any attempt."""
    record = journal.record
    if not record.attempts:
        return None, None, None
    last = record.attempts[-1]
    if last.failure and last.decision is None:
        decided = _decide(spec, journal, attempt_views(record)[-1].failure)
        if decided.action == "give_up":
            return None, None, decided
    decision = last.decision or {}
    if decision.get("action") == "retry" and last.failure:
        record.config = dict(decision["knobs"])
        record.orders.update({c["knob"]: c["new"] for c in decision.get("changes") or []})  # as _loop does
        rung = decision.get("rung")
        ref = RungRef(ladder=FailureKind(rung["ladder"]), index=rung["index"]) if rung else None
        planned = decision.get("resume_from")
        usable = {str(c.path) for c in usable_checkpoints(journal)}
        return ref, planned if planned in usable else resume_point(journal), None
    return None, resume_point(journal), None


def _record_pid(journal: Journal, attempt: AttemptRecord, pid: int) -> None:
    attempt.pid, attempt.pid_started = pid, process_started(pid)
    journal.save()


def _start_attempt(spec: RunSpec, journal: Journal, rung: RungRef | None, resume: str | None) -> AttemptRecord:
    record = journal.record
    n = len(record.attempts) + 1
    built = build_command(record.command, record.orders, spec.extra_flags, resume)
    attempt = AttemptRecord(n=n, started=time.time(), knobs=dict(record.config),
                            rung={"ladder": rung.ladder.value, "index": rung.index} if rung else None,
                            resumed_from=resume, command=list(built.argv), delivered=dict(built.delivered),
                            orders=dict(record.orders), resumed_step=checkpoint_step(resume))
    record.attempts.append(attempt)
    atomic_write_json(journal.attempt_dir(n) / KNOBS_JSON, attempt.knobs)
    journal.save()
    batch = _global_batch(attempt.knobs, spec.world_size)  # what the batch rung keeps constant
    journal.event("attempt_started", attempt=n, knobs=attempt.knobs, rung=attempt.rung, orders=attempt.orders,
                  resumed_from=resume, command=attempt.command, delivered=attempt.delivered,
                  world_size=spec.world_size, effective_batch=batch, launch=launch_plan(attempt.command).to_dict())
    say(spec, f"attempt {n}: " + (" ".join(f"{k}={v}" for k, v in attempt.knobs.items()) or "the command as written")
         + (f" · {spec.world_size} processes, global effective batch {batch}" if spec.world_size > 1 else "")
         + (f" · resuming from {Path(resume).name}" if resume else ""))
    return attempt


def _global_batch(knobs: dict[str, Any], world_size: int) -> int | None:
    """per-device batch × accumulation × world size; None when the knobs do not say."""
    try:
        return effective_batch(knobs, world_size)
    except (KeyError, TypeError, ValueError):
        return None


def _child_env(spec: RunSpec, journal: Journal, attempt: AttemptRecord) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        ENV_RUN_DIR: str(spec.run_dir.absolute()), ENV_ATTEMPT: str(attempt.n),
        ENV_ERROR_FILE: str((journal.attempt_dir(attempt.n) / ERROR_JSON).absolute()),
        ENV_KNOBS: json.dumps(attempt.orders),
        ENV_VRAM_LIMIT: spec.vram_limit or "", ENV_INJECT: spec.inject or "",
        ENV_SUPERVISOR_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1",
        ENV_OBSERVE: ",".join(k for k in policy_knobs(spec.policy) if k not in REGISTRY),
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
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # DESIGN §6
    return bootstrap_env(env, attempt.command, attempt.delivered)


def _watch(spec: RunSpec, journal: Journal) -> Watch:
    limits = spec.policy.limits
    return Watch(heartbeat_dir=spec.run_dir, hang_timeout_s=limits.hang_timeout_s, echo=spec.echo,
                 startup_timeout_s=limits.startup_timeout_s)


def _finish_attempt(spec: RunSpec, journal: Journal, attempt: AttemptRecord,
                    outcome: ChildOutcome) -> Failure | None:
    records = read_error_records(journal.attempt_dir(attempt.n) / ERROR_JSON)
    events = journal.events()  # read once: progress and the bootstrap's outcome both come from it
    observe_attempt(spec, journal, attempt, events)
    attempt.max_step = _max_step(journal, events, attempt, records)
    failure = None if outcome.interrupted_by is not None else classify(
        outcome, records, host_oom_percent=spec.policy.limits.host_oom_percent, last_step=attempt.max_step)
    if failure is not None and failure.kind is FailureKind.CUDA_OOM:
        failure = dataclasses.replace(failure, memory_growth=memory_growth(events, attempt.started))
    attempt.ended, attempt.exit_code, attempt.signal = time.time(), outcome.exit_code, outcome.signal
    attempt.failure = failure_dict(failure)
    if outcome.interrupted_by is not None:
        attempt.interrupted = signal.Signals(outcome.interrupted_by).name
    journal.save()
    journal.event("attempt_ended", attempt=attempt.n, exit_code=outcome.exit_code, signal=outcome.signal,
                  duration_s=round(outcome.duration_s, 2), failure=attempt.failure, max_step=attempt.max_step,
                  interrupted_by=outcome.interrupted_by, world_size=spec.world_size,
                  root_cause=root_cause_text(attempt.failure, spec.world_size), ranks=rank_records(records),
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


def _max_step(journal: Journal, events: list[dict[str, Any]], attempt: AttemptRecord, records: list) -> int | None:
    steps = [r.step for r in records if r.step is not None]
    steps += [step for e in events if e.get("time", 0) >= attempt.started
              and (step := completed_step(e)) is not None]
    steps += [c.step for c in scan_checkpoints(checkpoint_dir(journal))
              if c.complete and _mtime(c.path) >= attempt.started]
    best = max(steps, default=0)
    return best if best > 0 else None  # step 0 is "no optimizer step completed", not progress


def _mtime(path: Path) -> float:
    try:
        return (path / CKPT_TRAINER_STATE).stat().st_mtime
    except OSError:
        return 0.0


def _decide(spec: RunSpec, journal: Journal, failure: Failure) -> Decision:
    if failure.kind is FailureKind.NAN_LOSS:  # issue 5: checkpoints written after the NaN move aside
        quarantine_after_nan(checkpoint_dir(journal), journal.attempt_dir(len(journal.record.attempts)) / ERROR_JSON,
                             failure.step, journal.event, own=own_test(journal))
    if failure.kind is FailureKind.CRASH and failure.phase is Phase.CHECKPOINT_LOAD:
        move_aside_unloadable(journal, journal.record.attempts[-1])
    usable = usable_checkpoints(journal)
    bf16_ok = False if spec.gpu is None else None  # no GPU: the child trains in fp32 or CPU bf16 it chose itself
    if spec.gpu is not None and spec.gpu.compute_capability:
        bf16_ok = tuple(spec.gpu.compute_capability) >= (8, 0)
    record = journal.record
    reach = {k: v for k, v in record.capabilities.items() if k not in record.unavailable}
    decision = decide(spec.policy, attempt_views(record), [CheckpointInfo(str(c.path), c.step) for c in usable],
                      profile=data_profile(journal.events()), elapsed_s=time.time() - record.started,
                      world_size=spec.world_size, bf16_ok=bf16_ok, fp16_ok=spec.gpu is not None, capabilities=reach)
    journal.record.attempts[-1].decision = decision_dict(decision)
    journal.save()
    journal.event("decision", attempt=len(journal.record.attempts), **decision_dict(decision))
    say(spec, decision.reason)
    return decision


def _between_attempts(spec: RunSpec, journal: Journal, outcome: ChildOutcome, decision: Decision,
                      stop: StopFlag) -> None:
    released, waited = wait_gpu_released(outcome.pids, spec.policy.limits.gpu_release_timeout_s)
    if waited > 0.5 or not released:
        journal.event("gpu_release_wait", released=released, waited_s=round(waited, 2))
    deadline = time.monotonic() + decision.backoff_s
    while time.monotonic() < deadline and not stop.is_set:
        time.sleep(0.1)


def _give_up(journal: Journal, decision: Decision) -> ExitCode:
    reason = decision.give_up or GiveUpReason.LADDER_EXHAUSTED
    status = RunStatus.FAILED if reason == GiveUpReason.UNRECOVERABLE else RunStatus.GAVE_UP
    return _end(journal, status, GIVE_UP_EXIT.get(reason, ExitCode.GAVE_UP),
                give_up=reason.value, root_cause=decision.reason)


def _end(journal: Journal, status: RunStatus, code: ExitCode, *, give_up: str | None = None,
         root_cause: str | None = None) -> ExitCode:
    record = journal.record
    record.status, record.exit_code, record.ended = status.value, int(code), time.time()
    record.give_up, record.root_cause = give_up, root_cause
    journal.save()
    journal.event("run_ended", status=status.value, exit_code=int(code), give_up=give_up, root_cause=root_cause)
    return code
