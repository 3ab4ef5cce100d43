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
from ..policy import (CheckpointInfo, Decision, Failure, GiveUpReason, RungRef,
                      decide, effective_batch)
from ..knobs import REGISTRY
from ..protocol import (CKPT_TRAINER_STATE, ENV_ATTEMPT, ENV_OBSERVE, EVENT_CHANGE_NOT_APPLIED, EVENT_CHANGE_VERIFIED, ENV_CHECKPOINT_DIR, ENV_ERROR_FILE, ENV_INJECT, ENV_KNOBS,
                        ENV_RESUME_FROM, ENV_RUN_DIR, ENV_SUPERVISOR_PID, ENV_VRAM_LIMIT, ERROR_JSON,
                        KNOBS_JSON, POLICY_COPY, FailureKind, RunStatus, atomic_write_json,
                        read_error_records)
from .checkpoints import CheckpointScan, move_aside_incomplete, quarantine_after_nan, scan_checkpoints
from .classify import classify
from .command import build_command
from .gpu import wait_gpu_released
from .checkpoints import checkpoint_step
from .command import flags_in_command, placeholders_in
from .history import attempt_views, data_profile, decision_dict, failure_dict, memory_growth
from .journal import AttemptRecord, Journal, RunLock, RunRecord, load_record
from .observation import NOT_APPLIED, VERIFIED, Observation, capabilities, observation_of, verify
from .launch import bootstrap_env, bootstrap_outcome, launch_plan  # issue 4: the in-child bootstrap
from .process import ChildOutcome, StopFlag, Watch, process_started, reap_orphan, run_child
from .progress import ProgressTail, completed_step
from .ranks import rank_records, root_cause_text
from .spec import RunSpec, policy_knobs
from .tree import run_processes, stop_processes

GIVE_UP_EXIT = {GiveUpReason.NO_PROGRESS: ExitCode.NO_PROGRESS,
                GiveUpReason.UNRECOVERABLE: ExitCode.CHILD_FAILED}


def supervise(spec: RunSpec) -> ExitCode:
    """Run ``spec`` to the end; the run dir says everything that happened."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    load_record(spec.run_dir)  # a foreign dir is refused before the lock file is written into it
    with RunLock(spec.run_dir):
        journal = _open_journal(spec)
        stop = StopFlag()
        previous = {s: signal.signal(s, lambda n, _f: stop.set(n)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return _loop(spec, journal, stop)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


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
            _say(spec, f"starting from policy {spec.policy.name}'s knobs (not the command's): "
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
    _observe(spec, journal, attempt, events)  # where it saved, what it ran: the dead supervisor never read it
    attempt.max_step = _max_step(journal, events, attempt, [])
    journal.event("attempt_abandoned", attempt=attempt.n, pid=attempt.pid, max_step=attempt.max_step,
                  orphan=orphan or "no process of it was left")


def _copy_policy(spec: RunSpec) -> None:
    source = getattr(spec.policy, "source", None)
    if source and Path(source).is_file():
        shutil.copyfile(source, spec.run_dir / POLICY_COPY)


def _loop(spec: RunSpec, journal: Journal, stop: StopFlag) -> ExitCode:
    record = journal.record
    rung, resume = _continuation(spec, journal)
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
            reason = decision.give_up or GiveUpReason.LADDER_EXHAUSTED
            status = RunStatus.FAILED if reason == GiveUpReason.UNRECOVERABLE else RunStatus.GAVE_UP
            return _end(journal, status, GIVE_UP_EXIT.get(reason, ExitCode.GAVE_UP),
                        give_up=reason.value, root_cause=decision.reason)
        _between_attempts(spec, journal, outcome, decision, stop)
        if stop.is_set:
            return _end(journal, RunStatus.INTERRUPTED, ExitCode.INTERRUPTED,
                        root_cause=f"interrupted by {signal.Signals(stop.signum).name} between attempts")
        record.config = dict(decision.knobs)
        record.orders.update({c.knob: c.new for c in decision.changes})  # orders from now on
        rung, resume = decision.rung, decision.resume_from


def _continuation(spec: RunSpec, journal: Journal) -> tuple[RungRef | None, str | None]:
    """Where a continued run picks up. A retry the previous supervisor decided but did not
    start (it died, or was stopped, between attempts) is carried out as decided; otherwise
    the same knobs resume from the newest complete checkpoint."""
    record = journal.record
    if not record.attempts:
        return None, None
    decision = record.attempts[-1].decision or {}
    if decision.get("action") == "retry" and record.attempts[-1].failure:
        record.config = dict(decision["knobs"])
        rung = decision.get("rung")
        ref = RungRef(ladder=FailureKind(rung["ladder"]), index=rung["index"]) if rung else None
        planned = decision.get("resume_from")
        usable = {str(c.path) for c in _usable_checkpoints(spec, journal)}
        return ref, planned if planned in usable else _resume_point(journal, spec, None)
    return None, _resume_point(journal, spec, None)


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
    _say(spec, f"attempt {n}: " + (" ".join(f"{k}={v}" for k, v in attempt.knobs.items()) or "the command as written")
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
        ENV_KNOBS: json.dumps(attempt.orders), ENV_RESUME_FROM: attempt.resumed_from or "",
        ENV_VRAM_LIMIT: spec.vram_limit or "", ENV_INJECT: spec.inject or "",
        ENV_SUPERVISOR_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1",
        ENV_OBSERVE: ",".join(k for k in policy_knobs(spec.policy) if k not in REGISTRY),
    })
    if spec.redirect_checkpoints:  # the user's --checkpoint-dir: the child's output_dir moves there
        env[ENV_CHECKPOINT_DIR] = str(spec.checkpoint_dir)
    else:
        env.pop(ENV_CHECKPOINT_DIR, None)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # DESIGN §6
    return bootstrap_env(env, attempt.command, attempt.delivered)


def _watch(spec: RunSpec, journal: Journal) -> Watch:
    limits = spec.policy.limits
    return Watch(heartbeat_dir=spec.run_dir, hang_timeout_s=limits.hang_timeout_s, echo=spec.echo)


def _finish_attempt(spec: RunSpec, journal: Journal, attempt: AttemptRecord,
                    outcome: ChildOutcome) -> Failure | None:
    records = read_error_records(journal.attempt_dir(attempt.n) / ERROR_JSON)
    events = journal.events()  # read once: progress and the bootstrap's outcome both come from it
    _observe(spec, journal, attempt, events)
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
        _say(spec, f"attempt {attempt.n} failed{on_rank}: {failure.kind.value} at step {failure.step} "
             f"({failure.phase.value}): {failure.detail}")
    return failure


def _observe(spec: RunSpec, journal: Journal, attempt: AttemptRecord, events: list[dict[str, Any]]) -> None:
    """Take what the child reported it runs (Trust rules 2 and 3): the first report is the run's
    ``requested``; every report sets the knobs now, where checkpoints go, what a change can reach;
    each order is checked against it (``change_verified`` / ``change_not_applied``)."""
    record = journal.record
    seen = observation_of(events, attempt.n, attempt.started)
    if seen.seen:
        attempt.observed = seen.payload()
        attempt.knobs = {**{k: v for k, v in attempt.knobs.items() if k not in seen.fields}, **seen.knobs}
        record.config = dict(attempt.knobs)
        if record.requested_source != "observed":
            record.requested = {**record.requested, **seen.knobs}
            record.requested_source = "observed"
            journal.event("requested_observed", attempt=attempt.n, knobs=record.requested, fields=seen.fields)
        _checkpoint_dir_from(journal, seen.output_dir)
    plan = launch_plan(attempt.command)
    flags = flags_in_command(record.command, knobs=list(record.config), extra_flags=spec.extra_flags)
    record.capabilities = capabilities(seen, flags, in_process=plan.delivery.value == "bootstrap",
                                       placeholders=placeholders_in(record.command))
    _verify(spec, journal, attempt, seen, events)


def _checkpoint_dir_from(journal: Journal, output_dir: str | None) -> None:
    record = journal.record
    if output_dir and output_dir != record.checkpoint_dir:
        journal.event("checkpoint_dir", path=output_dir, previous=record.checkpoint_dir or None,
                      reported_by="the child's Trainer (args.output_dir)")
        record.checkpoint_dir = output_dir


def _verify(spec: RunSpec, journal: Journal, attempt: AttemptRecord, seen: Observation,
            events: list[dict[str, Any]]) -> None:
    record = journal.record
    profile = data_profile(e for e in events if e.get("time", 0) >= attempt.started)
    for check in verify(attempt.orders, seen, longest_row=profile.max_len if profile else None):
        attempt.verified[check.knob] = check.status
        if check.status == NOT_APPLIED:
            record.unavailable[check.knob] = check.why
            if check.observed is not None:
                record.config[check.knob] = attempt.knobs[check.knob] = check.observed
        event = {VERIFIED: EVENT_CHANGE_VERIFIED, NOT_APPLIED: EVENT_CHANGE_NOT_APPLIED}.get(check.status)
        if event:
            journal.event(event, attempt=attempt.n, knob=check.knob, expected=check.expected,
                          observed=check.observed, why=check.why or None)
        if check.status == NOT_APPLIED:
            _say(spec, f"change not applied: {check.knob} → {check.expected}: {check.why}")


def _own_footprint() -> dict[str, int]:
    """The supervisor's own resident memory (bytes) and open descriptors: a soak checks both stay flat."""
    me = psutil.Process()
    return {"rss": me.memory_info().rss, "fds": me.num_fds()}


def _max_step(journal: Journal, events: list[dict[str, Any]], attempt: AttemptRecord, records: list) -> int | None:
    steps = [r.step for r in records if r.step is not None]
    steps += [step for e in events if e.get("time", 0) >= attempt.started
              and (step := completed_step(e)) is not None]
    steps += [c.step for c in scan_checkpoints(_ckpt_dir(journal))
              if c.complete and _mtime(c.path) >= attempt.started]
    best = max(steps, default=0)
    return best if best > 0 else None  # step 0 is "no optimizer step completed", not progress


def _ckpt_dir(journal: Journal) -> Path | None:
    """Where the child's Trainer saves: its reported output_dir, else its flag (None: unknown yet)."""
    return Path(journal.record.checkpoint_dir) if journal.record.checkpoint_dir else None


def _mtime(path: Path) -> float:
    try:
        return (path / CKPT_TRAINER_STATE).stat().st_mtime
    except OSError:
        return 0.0


def _usable_checkpoints(spec: RunSpec, journal: Journal) -> list[CheckpointScan]:
    scans = scan_checkpoints(_ckpt_dir(journal))
    for bad in (s for s in scans if not s.complete):
        journal.event("checkpoint_skipped", path=str(bad.path), step=bad.step, problems=list(bad.problems))
        _move_aside(journal, bad)  # issue 5
    return [s for s in scans if s.complete]


def _move_aside(journal: Journal, bad: CheckpointScan) -> None:
    """A resumed run would save into the skipped folder again and its stale files could survive."""
    try:
        moved = move_aside_incomplete(bad, len(journal.record.attempts))
    except OSError as exc:
        journal.event("checkpoint_moved_aside", path=str(bad.path), step=bad.step, moved_to=None,
                      error=f"{exc}: move it out of the checkpoint dir by hand before a resume rewrites it")
        return
    journal.event("checkpoint_moved_aside", path=str(bad.path), step=bad.step, moved_to=str(moved))


def _resume_point(journal: Journal, spec: RunSpec, _failure: Failure | None) -> str | None:
    usable = _usable_checkpoints(spec, journal)
    return str(usable[0].path) if usable else None


def _decide(spec: RunSpec, journal: Journal, failure: Failure) -> Decision:
    if failure.kind is FailureKind.NAN_LOSS:  # issue 5: checkpoints written after the NaN move aside
        quarantine_after_nan(_ckpt_dir(journal), journal.attempt_dir(len(journal.record.attempts)) / ERROR_JSON,
                             failure.step, journal.event)
    usable = _usable_checkpoints(spec, journal)
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
    _say(spec, decision.reason)
    return decision


def _between_attempts(spec: RunSpec, journal: Journal, outcome: ChildOutcome, decision: Decision,
                      stop: StopFlag) -> None:
    released, waited = wait_gpu_released(outcome.pids, spec.policy.limits.gpu_release_timeout_s)
    if waited > 0.5 or not released:
        journal.event("gpu_release_wait", released=released, waited_s=round(waited, 2))
    deadline = time.monotonic() + decision.backoff_s
    while time.monotonic() < deadline and not stop.is_set:
        time.sleep(0.1)


def _end(journal: Journal, status: RunStatus, code: ExitCode, *, give_up: str | None = None,
         root_cause: str | None = None) -> ExitCode:
    record = journal.record
    record.status, record.exit_code, record.ended = status.value, int(code), time.time()
    record.give_up, record.root_cause = give_up, root_cause
    journal.save()
    journal.event("run_ended", status=status.value, exit_code=int(code), give_up=give_up, root_cause=root_cause)
    return code


def _say(spec: RunSpec, text: str) -> None:
    if spec.echo:
        print(f"[oomguard] {text}", file=sys.stderr, flush=True)
