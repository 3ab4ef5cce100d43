"""The supervisor loop: launch, watch, classify, decide, act, resume. One branch per state.

Two seams, as in torch.distributed.elastic's agent: ``launch`` runs one child to its end and says
how it ended (default :func:`~oomguard.supervisor.process.run_child`, the only ``Popen``), ``clock``
tells the time and sleeps (default the system's). The loop's unit tests pass fakes of both: no
subprocess, no torch. Decisions are ``policy.decide()``'s alone; the loop gathers the evidence
once, carries the decision out (checkpoints set aside, knobs, resume point and mode) and journals.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

from ..errors import ExitCode
from ..policy import Decision, DecisionAction, GiveUpReason, decide
from ..protocol import Event, ResumeMode, RunStatus
from .attempt import Plan, child_env, finish_attempt, start_attempt, watch_of
from .cluster import Cluster
from .console import say as console_say
from .evidence import gather_evidence
from .gpu import wait_gpu_released
from .grow_back import Grown, GrowTail, GrowWatch
from .journal import AttemptRecord, Journal, RunLock, load_record
from .opening import open_journal
from .process import SCHEDULER_SIGNALS, STOP_SIGNALS, ChildOutcome, StopFlag, Watch, process_started, run_child
from .progress import ProgressTail
from .resume_point import set_aside, survey_checkpoints, tidy_checkpoints
from .spec import Recovery, RunSpec, say
from .tree import run_processes, stop_processes

__all__ = ["ChildLauncher", "Clock", "GIVE_UP_EXIT", "SYSTEM_CLOCK", "SystemClock", "supervise"]

log = logging.getLogger("oomguard.supervisor")

# The exit code of a run that gives up, per reason (a test checks every GiveUpReason has one).
GIVE_UP_EXIT: dict[GiveUpReason, ExitCode] = {
    GiveUpReason.LADDER_EXHAUSTED: ExitCode.GAVE_UP, GiveUpReason.MAX_ATTEMPTS: ExitCode.GAVE_UP,
    GiveUpReason.WALL_CLOCK: ExitCode.GAVE_UP, GiveUpReason.NO_PROGRESS: ExitCode.NO_PROGRESS,
    GiveUpReason.UNRECOVERABLE: ExitCode.CHILD_FAILED, GiveUpReason.QUARANTINE_LIMIT: ExitCode.GAVE_UP,
}


class Clock(Protocol):
    """Wall-clock time (``time``: attempt start/end, the run's budget) and the backoff's waits."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.time``, ``time.monotonic``, ``time.sleep``."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class ChildLauncher(Protocol):
    """Runs one attempt's command to its end (``process.run_child``'s signature)."""

    def __call__(self, argv: Sequence[str], env: Mapping[str, str], attempt_dir: Path, watch: Watch,
                 stop: StopFlag, on_tick: Callable[[], None] | None = None,
                 on_start: Callable[[int], None] | None = None) -> ChildOutcome: ...


class _Run:
    """One supervision: the spec, its journal, the stop flag and the two seams; ``cluster`` this node's
    side of a multi-node job's agreement (``cluster.py``), None for one node."""

    def __init__(self, spec: RunSpec, journal: Journal, stop: StopFlag, launch: ChildLauncher, clock: Clock,
                 cluster: "Cluster | None" = None):
        self.spec, self.journal, self.stop, self.launch, self.clock = spec, journal, stop, launch, clock
        self.cluster = cluster


def supervise(spec: RunSpec, *, launch: ChildLauncher = run_child, clock: Clock = SYSTEM_CLOCK) -> ExitCode:
    """Run ``spec`` to the end; the run dir says everything that happened."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    load_record(spec.run_dir)  # a foreign dir is refused before the lock file is written into it
    with RunLock(spec.run_dir):
        journal = open_journal(spec, clock.time())
        from .process import handle_stop_signals, tolerate_gone_output  # here: the module's imports are shared

        stop = StopFlag()
        cluster = Cluster(spec.node, spec.node_timeout_s, clock, peer_stop_s=spec.policy.limits.failed_rank_linger_s) \
            if spec.node is not None else None
        code: ExitCode | None = None
        # SIGINT/SIGTERM/SIGHUP stop the run (the child saves); a closed stderr (EPIPE) never ends it
        with handle_stop_signals(stop), tolerate_gone_output():
            run = _Run(spec, journal, stop, launch, clock, cluster)
            try:
                if cluster is not None:
                    cluster.start()
                code = _loop(run)
            except OSError as exc:  # the run dir stopped taking writes (disk full, remounted read-only)
                code = _run_dir_failed(run, exc)
            finally:
                if cluster is not None:
                    cluster.close(int(code) if code is not None else None)
            return code


def _loop(run: _Run) -> ExitCode:
    if run.cluster is not None:  # one node of several: the leader decides, the others follow
        from .node_loop import node_loop

        return node_loop(run)
    plan = _continuation(run)
    if isinstance(plan, Decision):
        return _give_up(run, plan)
    while True:
        attempt = start_attempt(run.spec, run.journal, plan, run.clock.time())
        watch = GrowWatch(run.spec, run.journal, attempt, plan.grow)  # issue 18 item 5: one node only
        outcome = _stopped_through_the_child(run, attempt, _launch(run, attempt, plan.resume_mode, watch=watch))
        failure = finish_attempt(run.spec, run.journal, attempt, outcome, run.clock.time())
        grow = watch.finish(failure is None and outcome.interrupted_by is None)  # stopped to grow back: not the end
        if outcome.interrupted_by is not None:
            return _interrupted(run, outcome.interrupted_by)
        if failure is None and grow is None:
            return _end(run, RunStatus.SUCCEEDED, ExitCode.SUCCESS)
        decision = grow or _decide(run)
        if decision.action is DecisionAction.GIVE_UP:
            return _give_up(run, decision)
        _between_attempts(run, outcome, decision)
        if run.stop.is_set:
            return _interrupted(run, run.stop.signum, " between attempts")
        plan = _carry_out(run, decision, decision.resume_from)
        plan = dataclasses.replace(plan, grow=Grown(grow, watch.words)) if grow is not None else plan


def _continuation(run: _Run) -> Plan | Decision:
    """Where a continued run picks up. A failure the previous supervisor did not live to decide on
    is decided now (defect 10); a retry decided but not started (it died, or was stopped, between
    attempts) is carried out as decided; otherwise the same knobs resume from the newest complete
    checkpoint. A Decision back is a give-up that ends the run before any attempt."""
    record = run.journal.record
    if not record.attempts:
        return Plan()
    last = record.attempts[-1]
    if last.failure and last.decision is None:
        decided = _decide(run)
        if decided.action is DecisionAction.GIVE_UP:
            return decided
    events = run.journal.events()
    survey = survey_checkpoints(run.journal, events)
    tidy_checkpoints(run.journal, survey, events)
    usable = [str(s.path) for s in survey.complete]
    newest = usable[0] if usable else None
    decision = last.decision
    if decision is not None and decision.action is DecisionAction.RETRY and last.failure:
        return _carry_out(run, decision, decision.resume_from if decision.resume_from in usable else newest)
    return Plan(resume_from=newest)


def _carry_out(run: _Run, decision: Decision, resume_from: str | None) -> Plan:
    """The knobs a retry decided are the run's from now on; the next attempt's plan."""
    record = run.journal.record
    record.config = dict(decision.knobs)
    record.orders.update({c.knob: c.new for c in decision.changes})  # orders from now on
    return Plan(decision.rung, resume_from, decision.resume_mode if resume_from else ResumeMode.NORMAL,
                decision.rewarm_steps if resume_from else 0)


def _launch(run: _Run, attempt: AttemptRecord, mode: ResumeMode, stop: StopFlag | None = None,
            also: Callable[[], None] | None = None, watch: GrowWatch | None = None) -> ChildOutcome:
    """The attempt's child, run to its end through the launcher seam; its pid journaled as it starts.
    ``stop``/``also``: a multi-node run's flag (the other nodes can stop it too) and per-poll watch;
    ``watch``: the grow-back watch, fed by the status line's tail."""
    def started(pid: int) -> None:
        attempt.pid, attempt.pid_started = pid, process_started(pid)
        run.journal.save()

    # oomguard's line, under -q too
    progress = (GrowTail(run.journal, attempt.n, True, watch) if watch else ProgressTail(run.journal, attempt.n)).tick

    def tick() -> None:
        progress()
        if also is not None:
            also()

    return run.launch(attempt.command, child_env(run.spec, run.journal, attempt, mode),
                      run.journal.attempt_dir(attempt.n), watch_of(run.spec), stop or run.stop,
                      tick if also is not None else progress, on_start=started)


def _decide(run: _Run) -> Decision:
    """Gather the evidence once, let the policy decide, carry out what it sets aside, journal it."""
    journal = run.journal
    events = journal.events()
    survey = survey_checkpoints(journal, events)
    decision = decide(run.spec.policy, gather_evidence(run.spec, journal, survey, events, run.clock.time()))
    moved = set_aside(journal, decision.quarantine)
    tidy_checkpoints(journal, survey, events, moved=moved)
    attempt = journal.record.attempts[-1]
    attempt.decision = decision
    journal.save()
    journal.event(Event.DECISION, attempt=attempt.n, **decision.to_dict())
    say(run.spec, decision.reason)
    if decision.action is DecisionAction.RETRY:
        _tell_recovery(run, decision)
    return decision


def _tell_recovery(run: _Run, decision: Decision) -> None:
    """``spec.on_recovery`` (a notifier) hears of the recovery; nothing it raises stops the run."""
    hook = run.spec.on_recovery
    attempt = run.journal.record.attempts[-1]
    if hook is None or attempt.failure is None:
        return
    notice = Recovery(run_dir=str(run.spec.run_dir), attempt=attempt.n, kind=attempt.failure.kind.value,
                      step=attempt.failure.step, reason=decision.reason,
                      changes=tuple(f"{c.knob}: {c.old} → {c.new}" for c in decision.changes),
                      resume_from=decision.resume_from)
    try:
        hook(notice)
    except Exception as exc:  # a notifier's failure is never the run's
        log.warning("on_recovery hook failed: %r", exc, exc_info=True)
        say(run.spec, f"the recovery notifier failed ({type(exc).__name__}: {exc}); the run goes on — "
                      "check the notifier's settings")


def _between_attempts(run: _Run, outcome: ChildOutcome, decision: Decision) -> None:
    released, waited = wait_gpu_released(outcome.pids, run.spec.policy.limits.gpu_release_timeout_s)
    if waited > 0.5 or not released:
        run.journal.event(Event.GPU_RELEASE_WAIT, released=released, waited_s=round(waited, 2))
    deadline = run.clock.monotonic() + decision.backoff_s
    while run.clock.monotonic() < deadline and not run.stop.is_set:
        run.clock.sleep(0.1)


def _stopped_through_the_child(run: _Run, attempt: AttemptRecord, outcome: ChildOutcome) -> ChildOutcome:
    """A scheduler may signal every process of the job (a SLURM job step, a container) and the child's
    guard save and exit before the supervisor hears anything: its ``shutdown_saved`` (reason "received
    SIGx") makes the attempt interrupted by that signal, not a crash to retry; so does a child killed by
    the very signal the supervisor got."""
    if outcome.interrupted_by is not None:
        return outcome
    if run.stop.is_set and outcome.signal is not None and outcome.signal == run.stop.signum:
        # the same signal reached the child (SLURM signals every process of a step) and ended it before
        # its handlers were up (torchrun's agent has none for SIGUSR1 by default): not a crash to retry
        return dataclasses.replace(outcome, interrupted_by=run.stop.signum)
    names = {f"received {s.name}": s for s in STOP_SIGNALS}
    for e in reversed(run.journal.events()):
        if e.get("event") == Event.SHUTDOWN_SAVED and e.get("time", 0) >= attempt.started \
                and e.get("reason") in names:
            return dataclasses.replace(outcome, interrupted_by=int(names[e["reason"]]))
    return outcome


def _interrupted(run: _Run, signum: int | None, when: str = "") -> ExitCode:
    """A stop from outside: a scheduler's signal ends the run "requeue me" (ExitCode.REQUEUE), a person's
    (SIGINT, SIGHUP) ExitCode.INTERRUPTED; either way ``oomguard run --run-dir D`` continues it."""
    name = signal.Signals(signum).name if signum else "a stop signal"
    code = ExitCode.REQUEUE if signum in SCHEDULER_SIGNALS else ExitCode.INTERRUPTED
    return _end(run, RunStatus.INTERRUPTED, code, root_cause=f"interrupted by {name}{when}")


def _give_up(run: _Run, decision: Decision) -> ExitCode:
    reason = decision.give_up or GiveUpReason.LADDER_EXHAUSTED
    status = RunStatus.FAILED if reason is GiveUpReason.UNRECOVERABLE else RunStatus.GAVE_UP
    return _end(run, status, GIVE_UP_EXIT[reason], give_up=reason, root_cause=decision.reason)


def _end(run: _Run, status: RunStatus, code: ExitCode, *, give_up: GiveUpReason | None = None,
         root_cause: str | None = None) -> ExitCode:
    record = run.journal.record
    record.status, record.exit_code, record.ended = status, int(code), run.clock.time()
    record.give_up, record.root_cause = give_up, root_cause
    run.journal.save()
    run.journal.event(Event.RUN_ENDED, status=status.value, exit_code=int(code),
                      give_up=give_up.value if give_up else None, root_cause=root_cause)
    return code


def _run_dir_failed(run: _Run, exc: OSError) -> ExitCode:
    """Stop what runs (its guard saves on SIGTERM), record ``failed`` if the disk still lets us,
    and say how to go on: the child's checkpoints are kept, ``--run-dir`` continues the run."""
    spec, record = run.spec, run.journal.record
    stop_processes(run_processes(spec.run_dir), watch_of(spec).grace_s)
    cause = (f"the run dir stopped taking writes: {exc} — free space on (or make writable) {spec.run_dir}, "
             f"then continue with `oomguard run --run-dir {spec.run_dir}`")
    record.status, record.exit_code, record.ended = RunStatus.FAILED, int(ExitCode.RUN_DIR_FAILED), run.clock.time()
    record.root_cause = cause
    try:
        run.journal.save()
        run.journal.event(Event.RUN_ENDED, status=record.status.value, exit_code=record.exit_code, root_cause=cause)
    except OSError:
        pass  # the state on disk stays "running": a continuation treats it as a dead supervisor's
    console_say(cause)
    return ExitCode.RUN_DIR_FAILED
