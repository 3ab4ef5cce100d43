"""The loop of one node's supervisor in a job of several nodes: the leader (node 0) decides, every
other node follows. The agreement goes through the job's shared dir (``cluster.py``); each node's
own run dir keeps the single-node layout and journal.

Leader, per attempt of the job: publish the plan → run its part → say it ended → wait for every other
node's end (their ranks' error records come with it) → classify the job's failure from every node's
records (the root-cause rank, wherever it ran) → ``policy.decide()`` → the checkpoint complete on every
node → publish the verdict and the next plan. Follower: wait for the live leader's plan → run its part
with the plan's knobs and checkpoint → say it ended → wait for the verdict → end as the job ends, or
take the next plan. Each node stops its own part when another node's part failed (after
``limits.failed_rank_linger_s``; the c10d rendezvous usually ends it first), and a node whose peer is gone past
``--node-timeout`` ends with ``ExitCode.NODE_LOST`` and says which node and how to go on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExitCode
from ..policy import Decision, DecisionAction, GiveUpReason
from ..protocol import (
    ERROR_JSON,
    ErrorRecord,
    Event,
    FailureKind,
    Phase,
    ResumeMode,
    RunStatus,
    rank_file,
    write_error_record,
)
from ..protocol.run_record import Failure, RungRef
from .attempt import Plan, finish_attempt, start_attempt
from .cluster import AttemptWatch, NodeEnd, NodePlan, PeerStop, Verdict, common_checkpoint
from .evidence import error_records
from .journal import AttemptRecord
from .loop import (
    _between_attempts,
    _carry_out,
    _continuation,
    _decide,
    _end,
    _give_up,
    _interrupted,
    _launch,
    _stopped_through_the_child,
)
from .process import ChildOutcome
from .resume_point import checkpoint_dir, survey_checkpoints
from .spec import say

if TYPE_CHECKING:
    from .loop import _Run

__all__ = ["node_loop"]


def node_loop(run: "_Run") -> ExitCode:
    assert run.cluster is not None
    return _lead(run) if run.cluster.role.leader else _follow(run)


# ---- the leader ------------------------------------------------------------------------------------

def _lead(run: "_Run") -> ExitCode:
    cluster = run.cluster
    _close_open_plans(run)
    n = max(cluster.attempts(), default=0) + 1
    plan = _continuation(run)
    if isinstance(plan, Decision):
        return _job_ends(run, n, _give_up(run, plan))
    while True:
        _publish_plan(run, n, plan)
        attempt = start_attempt(run.spec, run.journal, plan, run.clock.time())
        outcome = _node_attempt(run, attempt, plan, n)
        cluster.publish_end(NodeEnd(node=0, attempt=n, ok=outcome.exit_code == 0 and outcome.interrupted_by is None,
                                    exit_code=outcome.exit_code, signal=outcome.signal,
                                    interrupted_by=outcome.interrupted_by))
        ends = cluster.wait_ends(n, stopped=lambda: run.stop.urgent)
        if isinstance(ends, str):
            finish_attempt(run.spec, run.journal, attempt, outcome, run.clock.time())
            return _node_lost(run, n, ends)
        ends = ends or {}
        _take_records(run, attempt, ends)
        failure = finish_attempt(run.spec, run.journal, attempt, outcome, run.clock.time())
        signum = outcome.interrupted_by or next((e.interrupted_by for e in ends.values() if e.interrupted_by), None)
        if signum is not None:
            return _job_ends(run, n, _interrupted(run, signum))
        if _job_failure(run, attempt, failure, ends) is None:
            return _job_ends(run, n, _end(run, RunStatus.SUCCEEDED, ExitCode.SUCCESS))
        decision = _decide(run)
        if decision.action is DecisionAction.GIVE_UP:
            return _job_ends(run, n, _give_up(run, decision))
        resume_from, note = common_checkpoint(decision.resume_from, {0: _own_end(run, n), **ends})
        if note:
            say(run.spec, note)
        _between_attempts(run, outcome, decision)
        if run.stop.is_set:
            return _job_ends(run, n, _interrupted(run, run.stop.signum, " between attempts"))
        plan = _carry_out(run, decision, resume_from)
        _verdict(run, Verdict(n, "retry", failure=_failure_dict(attempt), decision=decision.to_dict()),
                 resume_from=resume_from, note=note)
        n += 1


def _close_open_plans(run: "_Run") -> None:
    """A leader that starts again closes the attempts its predecessor left open: their followers take
    the next plan instead of waiting for a verdict that would never come."""
    for n in run.cluster.attempts():
        if run.cluster.read_verdict(n) is None:
            _verdict(run, Verdict(n, "abandoned"), note="closed by the leader's new supervisor")


def _publish_plan(run: "_Run", n: int, plan: Plan) -> None:
    record = run.journal.record
    run.cluster.attempt = n
    run.cluster.publish_plan(NodePlan(attempt=n, session=run.cluster.session, config=dict(record.config),
                                      orders=dict(record.orders), rung=plan.rung.to_dict() if plan.rung else None,
                                      resume_from=plan.resume_from, resume_mode=plan.resume_mode.value,
                                      rewarm_steps=plan.rewarm_steps))
    _plan_event(run, n, plan)


def _take_records(run: "_Run", attempt: AttemptRecord, ends: dict[int, NodeEnd]) -> None:
    """The other nodes' ranks' error records, beside this node's in the attempt's dir (each file is named
    by its global rank: no two nodes write the same name): the classification and the journal see every rank."""
    target = run.journal.attempt_dir(attempt.n) / ERROR_JSON
    for end in ends.values():
        for data in end.records:
            try:
                record = ErrorRecord.from_dict(data)
            except (KeyError, TypeError, ValueError):
                continue  # a record the node could not parse either: its failure still comes with its end
            if not rank_file(target, record.rank).exists():  # a node's own record of a rank is never replaced
                write_error_record(target, record)


def _job_failure(run: "_Run", attempt: AttemptRecord, own: Failure | None, ends: dict[int, NodeEnd]) -> Failure | None:
    """The job's failure in this attempt: this node's classification over every rank's records, unless it
    is only a crash (a peer went away) and another node says better (a host OOM seen there, its own kind);
    a node that ended badly without saying why is a crash on that node. Recorded as the attempt's failure."""
    theirs = [(k, Failure.from_dict(e.failure)) for k, e in sorted(ends.items()) if e.failure]
    chosen = own
    if own is None or own.kind is FailureKind.CRASH:
        better = next((f for _, f in theirs if f.kind is not FailureKind.CRASH), None)
        chosen = better or own or (theirs[0][1] if theirs else None)
    if chosen is None:
        bad = next(((k, e) for k, e in sorted(ends.items()) if not e.ok), None)
        if bad is not None:
            chosen = Failure(kind=FailureKind.CRASH, step=bad[1].max_step, phase=Phase.UNKNOWN,
                             detail=f"node {bad[0]}'s part ended ({'abandoned' if bad[1].abandoned else 'failed'}) "
                                    "without a record")
    if chosen != own:
        attempt.failure = chosen
        run.journal.save()
    return chosen


def _own_end(run: "_Run", n: int) -> NodeEnd:
    return NodeEnd(node=run.cluster.role.rank, attempt=n, ok=True, checkpoints=_complete_steps(run))


def _complete_steps(run: "_Run") -> list[int] | None:
    """The steps of the complete checkpoints this node sees (None: it does not know where they go)."""
    if checkpoint_dir(run.journal) is None:
        return None
    survey = survey_checkpoints(run.journal, run.journal.events())
    return sorted(s.step for s in survey.complete if s.step is not None)


def _job_ends(run: "_Run", n: int, code: ExitCode) -> ExitCode:
    """The job is over (the leader ended its own run with ``code``): the verdict tells every node."""
    record = run.journal.record
    last = record.attempts[-1] if record.attempts else None
    _verdict(run, Verdict(n, "end", status=record.status.value, exit_code=int(code), root_cause=record.root_cause,
                          failure=_failure_dict(last), decision=last.decision.to_dict() if last and last.decision
                          else None))
    return code


def _failure_dict(attempt: AttemptRecord | None) -> dict | None:
    return attempt.failure.to_dict() if attempt is not None and attempt.failure else None


# ---- a follower ------------------------------------------------------------------------------------

def _follow(run: "_Run") -> ExitCode:
    cluster = run.cluster
    last = _close_own_abandoned(run)
    while True:
        got = cluster.next_plan(last, stopped=lambda: run.stop.is_set)
        if got is None:
            return _interrupted(run, run.stop.signum, " waiting for the leader's plan")
        if isinstance(got, str):
            return _node_lost(run, last + 1, got)
        if isinstance(got, Verdict):  # the job ended before another plan (the leader gave up on continuing)
            return _end_as_the_job(run, got)
        last = cluster.attempt = got.attempt
        plan = _adopt(run, got)
        cluster.joined(got.attempt)
        attempt = start_attempt(run.spec, run.journal, plan, run.clock.time())
        outcome = _node_attempt(run, attempt, plan, got.attempt)
        failure = finish_attempt(run.spec, run.journal, attempt, outcome, run.clock.time())
        cluster.publish_end(NodeEnd(node=cluster.role.rank, attempt=got.attempt,
                                    ok=failure is None and outcome.interrupted_by is None,
                                    exit_code=outcome.exit_code, signal=outcome.signal,
                                    interrupted_by=outcome.interrupted_by,
                                    failure=failure.to_dict() if failure else None,
                                    records=[r.to_dict() for r in error_records(run.journal, attempt.n)],
                                    checkpoints=_complete_steps(run), max_step=attempt.max_step))
        verdict = cluster.wait_verdict(got.attempt, stopped=lambda: False)
        if isinstance(verdict, str):
            return _node_lost(run, got.attempt, verdict)
        _take_verdict(run, attempt, verdict)
        if verdict.outcome == "end":
            return _end_as_the_job(run, verdict)


def _end_as_the_job(run: "_Run", verdict: Verdict) -> ExitCode:
    """This node's run ends as the leader ended the job: its status, exit code and root cause."""
    reason = (verdict.decision or {}).get("give_up")
    return _end(run, RunStatus(verdict.status), ExitCode(verdict.exit_code),
                give_up=GiveUpReason(reason) if reason else None,
                root_cause=verdict.root_cause and f"{verdict.root_cause} (the leader's verdict)")


def _close_own_abandoned(run: "_Run") -> int:
    """This node's part of attempts its previous supervisor joined and never ended (it died): ended now,
    abandoned, so the leader need not wait for them. Returns the newest such attempt (0: none)."""
    cluster, me = run.cluster, run.cluster.role.rank
    last_record = run.journal.record.attempts[-1] if run.journal.record.attempts else None
    newest = 0
    for n in cluster.attempts():
        if cluster.has_joined(n, me):
            newest = n
            if cluster.read_end(n, me) is None and cluster.read_verdict(n) is None:
                cluster.publish_end(NodeEnd(node=me, attempt=n, ok=False, abandoned=True,
                                            failure=_failure_dict(last_record),
                                            max_step=last_record.max_step if last_record else None))
    return newest


def _adopt(run: "_Run", got: NodePlan) -> Plan:
    """The leader's plan as this node's: its knobs and orders, its checkpoint (in this node's checkpoint
    dir when the command saves elsewhere here), its resume mode."""
    record = run.journal.record
    record.config, record.orders = dict(got.config), dict(got.orders)
    plan = Plan(RungRef.from_dict(got.rung) if got.rung else None, _local_checkpoint(run, got.resume_from),
                ResumeMode(got.resume_mode), got.rewarm_steps)
    _plan_event(run, got.attempt, plan)
    return plan


def _local_checkpoint(run: "_Run", resume_from: str | None) -> str | None:
    here = checkpoint_dir(run.journal)
    if resume_from is None or here is None or Path(resume_from).parent == here:
        return resume_from
    return str(here / Path(resume_from).name)


def _take_verdict(run: "_Run", attempt: AttemptRecord, verdict: Verdict) -> None:
    """The job's failure and the leader's decision become this node's record of the attempt: every node's
    run.json tells the same story (this node's own classification stays in its ``attempt_ended``)."""
    if verdict.failure:
        attempt.failure = Failure.from_dict(verdict.failure)
    if verdict.decision:
        attempt.decision = Decision.from_dict(verdict.decision)
    run.journal.save()
    run.journal.event(Event.NODE_VERDICT, job_attempt=verdict.attempt, node=run.cluster.role.rank,
                      outcome=verdict.outcome, exit_code=verdict.exit_code, root_cause=verdict.root_cause)


# ---- both ------------------------------------------------------------------------------------------

def _node_attempt(run: "_Run", attempt: AttemptRecord, plan: Plan, n: int) -> ChildOutcome:
    """This node's part of attempt ``n``, watched for the other nodes: when another node's part failed, or
    a node is lost, this node's child is stopped too (not an interruption of the run)."""
    stop = PeerStop(run.stop)
    outcome = _launch(run, attempt, plan.resume_mode, stop=stop, also=AttemptWatch(run.cluster, n, stop).tick)
    if stop.peer is None or run.stop.is_set:
        return _stopped_through_the_child(run, attempt, outcome)
    say(run.spec, f"node {run.cluster.role.rank}: stopped this node's part of attempt {n}: {stop.peer}")
    return dataclasses.replace(outcome, interrupted_by=None)


def _node_lost(run: "_Run", n: int, why: str) -> ExitCode:
    lost = next((k for k in run.cluster.role.others if f"node {k}'s" in why), -1)
    run.journal.event(Event.NODE_LOST, job_attempt=n, node=run.cluster.role.rank, lost=lost, why=why)
    cause = (f"{why}: the nodes of this job cannot agree on the next attempt; start every node's "
             f"`oomguard run --run-dir {run.cluster.role.job_dir}` again (SLURM: requeue the job): the run continues "
             "from the newest checkpoint complete on every node")
    code = _end(run, RunStatus.FAILED, ExitCode.NODE_LOST, root_cause=cause)
    return _job_ends(run, n, code) if run.cluster.role.leader else code


def _plan_event(run: "_Run", n: int, plan: Plan) -> None:
    role = run.cluster.role
    run.journal.event(Event.NODE_PLAN, job_attempt=n, node=role.rank, nodes=role.count, leader=role.leader,
                      knobs=dict(run.journal.record.config), resume_from=plan.resume_from)


def _verdict(run: "_Run", verdict: Verdict, resume_from: str | None = None, note: str | None = None) -> None:
    run.cluster.publish_verdict(verdict)
    run.journal.event(Event.NODE_VERDICT, job_attempt=verdict.attempt, node=run.cluster.role.rank,
                      outcome=verdict.outcome, exit_code=verdict.exit_code, root_cause=verdict.root_cause,
                      resume_from=resume_from, note=note)
