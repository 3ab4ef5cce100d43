"""``decide()``: from the evidence of a failed attempt to the next step. Pure: no clock, no I/O.

Every decision after a failure is made here (DESIGN §4, §10.1): which rung, which checkpoint to
resume from, which checkpoints to set aside first (written after a NaN, or one the child could not
load) and how the next child loads its checkpoint (``ResumeMode``). Budgets are checked first
(attempts, wall clock, no progress); then each failure kind has one handler (:data:`HANDLERS`).
Rung use counts come from the history's ``rung`` fields.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import PurePath
from typing import Any, Callable, Mapping, Sequence

from oomguard.knobs import effective_batch
from oomguard.policy.culprit import carried_order, judge_nan, judge_oom, same_grouping
from oomguard.policy.ladder import ladder_chain, lr_adjustment, truncation_share
from oomguard.policy.narrative import describe_cause, describe_changes, describe_checkpoint, describe_knobs
from oomguard.policy.records import (
    AttemptView,
    CheckpointInfo,
    CulpritOrder,
    DataProfile,
    Decision,
    DecisionAction,
    DeviceCapabilities,
    Evidence,
    Failure,
    GiveUpReason,
    KnobChange,
    ResumeClass,
    RungRef,
    SetAside,
    SetAsideReason,
)
from oomguard.policy.rungs import Pick, RungChoice, pick_rung
from oomguard.policy.schema import Policy
from oomguard.protocol import KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH, FailureKind, Phase, ResumeMode

__all__ = ["HANDLERS", "decide", "rung_uses"]


@dataclasses.dataclass
class _Context:
    """One decide() call: the evidence, the knobs now, and the words so far."""

    policy: Policy
    evidence: Evidence
    failure: Failure
    knobs: dict[str, Any]
    cause: str
    aside: tuple[SetAside, ...]  # what this decision sets aside, whatever else it decides
    checkpoints: list[CheckpointInfo]  # complete, and not set aside
    choice: RungChoice

    @property
    def attempts(self) -> Sequence[AttemptView]:
        return self.evidence.attempts

    @property
    def skipped(self) -> list[str]:
        return self.choice.skipped

    def pick(self, kind: FailureKind) -> Pick | None:
        return pick_rung(self.choice, ladder_chain(self.policy, kind))


def decide(policy: Policy, evidence: Evidence | Sequence[AttemptView],
           checkpoints: Sequence[CheckpointInfo] | None = None, *, profile: DataProfile | None = None,
           elapsed_s: float = 0.0, world_size: int = 1, bf16_ok: bool | None = None, fp16_ok: bool = True,
           capabilities: Mapping[str, str] | None = None) -> Decision:
    """What to do after the last attempt of ``evidence`` failed.

    The supervisor passes an :class:`Evidence`; the short form ``decide(policy, attempts, checkpoints,
    profile=..., world_size=..., bf16_ok=..., fp16_ok=..., capabilities=...)`` builds one (``capabilities``
    is ``Evidence.reach``: knob -> how a change reaches the child; a rung on a knob not listed is passed
    over, saying why; None: every knob)."""
    if not isinstance(evidence, Evidence):
        evidence = Evidence(attempts=tuple(evidence), checkpoints=tuple(checkpoints or ()), profile=profile,
                            device=DeviceCapabilities(bf16=bf16_ok, fp16=fp16_ok), reach=capabilities,
                            elapsed_s=elapsed_s, world_size=world_size)
    ctx = _context(policy, evidence)
    decision = _budget_give_up(ctx) or HANDLERS[ctx.failure.kind](ctx)
    rewarm = _rewarm_steps(ctx, decision)
    reason = decision.reason + (f"; re-entering warm-up over {rewarm} optimizer steps" if rewarm else "")
    return dataclasses.replace(decision, quarantine=ctx.aside, resume_mode=_resume_mode(ctx, decision),
                               rewarm_steps=rewarm, reason=reason, culprit=_culprit_order(ctx, decision))


def _culprit_order(ctx: _Context, decision: Decision) -> CulpritOrder | None:
    """The run's split steps and quarantined rows from the next attempt on: this decision's, else the last
    attempt's carried over (a split only while the knobs stay)."""
    if decision.action is not DecisionAction.RETRY:
        return decision.culprit
    if decision.culprit is not None:
        return decision.culprit
    return carried_order(ctx.attempts[-1].culprit, same_knobs=same_grouping(decision.knobs, ctx.knobs))


def _context(policy: Policy, ev: Evidence) -> _Context:
    failure, knobs = ev.failure, dict(ev.attempts[-1].knobs)
    aside = _set_aside(ev)
    gone = {s.path for s in aside}
    bf16_ok = policy.capabilities.bf16 if ev.device.bf16 is None else ev.device.bf16
    choice = RungChoice(policy, ev.attempts, knobs, ev.profile, bf16_ok, ev.device.fp16, ev.reach, held=ev.held)
    return _Context(policy, ev, failure, knobs, describe_cause(failure, policy.limits), aside,
                    [c for c in ev.usable if c.path not in gone], choice)


def _set_aside(ev: Evidence) -> tuple[SetAside, ...]:
    """Checkpoints no resume may start from, moved aside before the next attempt (never deleted):
    after a NaN, those written after the last finite step (their weights may hold the NaN update);
    after a crash loading a checkpoint, that checkpoint (damage no scan sees would crash every resume)."""
    failure, last = ev.failure, ev.attempts[-1]
    if failure.kind is FailureKind.NAN_LOSS:
        good = ev.last_finite_step
        return () if good is None else tuple(
            SetAside(c.path, c.step, SetAsideReason.AFTER_NAN, good)
            for c in sorted(ev.checkpoints, key=lambda c: c.step, reverse=True) if c.step > good)
    if failure.kind is FailureKind.CRASH and failure.phase is Phase.CHECKPOINT_LOAD \
            and last.resumed_from and last.resumed_step is not None:
        return (SetAside(last.resumed_from, last.resumed_step, SetAsideReason.UNLOADABLE),)
    return ()


def _resume_mode(ctx: _Context, decision: Decision) -> ResumeMode:
    """A checkpoint-load OOM is retried with the optimizer state mapped to CPU first (the load spike)."""
    if ctx.failure.kind is FailureKind.RESUME_OOM and decision.action is DecisionAction.RETRY \
            and decision.resume_from is not None:
        return ResumeMode.OPTIMIZER_ON_CPU
    return ResumeMode.NORMAL


def _rewarm_steps(ctx: _Context, decision: Decision) -> int:
    """A NaN rollback re-enters warm-up when the nan_loss ladder says so (``rewarm_steps``)."""
    ladder = ctx.policy.ladders.nan_loss
    if ctx.failure.kind is not FailureKind.NAN_LOSS or ladder is None or decision.action is not DecisionAction.RETRY \
            or decision.resume_from is None:
        return 0
    return ladder.rewarm_steps


# --- budgets ---------------------------------------------------------------------------
def _budget_give_up(ctx: _Context) -> Decision | None:
    limits, elapsed_s = ctx.policy.limits, ctx.evidence.elapsed_s
    if len(ctx.attempts) >= limits.max_attempts:
        return _give_up(ctx, GiveUpReason.MAX_ATTEMPTS,
                        f"that was attempt {len(ctx.attempts)} of limits.max_attempts {limits.max_attempts}; "
                        "giving up (raise limits.max_attempts to allow more)")
    budget = limits.wall_clock_budget_s
    if budget is not None and elapsed_s >= budget:
        return _give_up(ctx, GiveUpReason.WALL_CLOCK,
                        f"the run has used {elapsed_s:.0f} s of limits.wall_clock_budget_s {budget:g} s; "
                        "giving up (raise the budget to allow more)")
    if _no_progress(ctx.attempts, limits.no_progress_attempts):
        n = limits.no_progress_attempts
        return _give_up(ctx, GiveUpReason.NO_PROGRESS,
                        f"no new optimizer step in the last {n} attempts and no knob changed "
                        f"(limits.no_progress_attempts {n}); giving up so a scheduler does not requeue forever")
    return None


def _no_progress(attempts: Sequence[AttemptView], window: int) -> bool:
    """The last ``window`` attempts reached no step beyond the best before them, same knobs."""
    if len(attempts) < window:
        return False
    first = len(attempts) - window
    before = [a.max_step for a in attempts[:first] if a.max_step is not None]
    best = max(before) if before else None
    for k in range(first, len(attempts)):
        step = attempts[k].max_step
        if step is not None and (best is None or step > best):
            return False
        if k > 0 and dict(attempts[k].knobs) != dict(attempts[k - 1].knobs):
            return False
    return True


# --- handlers, one per failure kind ------------------------------------------------------
def _on_oom(ctx: _Context, kind: FailureKind | None = None) -> Decision:
    leak = _leak_note(ctx) if kind is None and ctx.failure.kind is FailureKind.CUDA_OOM else None
    if leak is not None:
        return _retry(ctx, None, _newest(ctx.checkpoints), note=leak)
    if kind is None and ctx.failure.kind is FailureKind.CUDA_OOM and ctx.policy.limits.split_culprits:
        verdict = judge_oom(ctx.attempts, ctx.evidence.profile, max_split_steps=ctx.policy.limits.max_split_steps)
        if verdict.culprit:
            return _split(ctx, verdict)
        ctx.cause += f" ({verdict.why})" if ctx.attempts[-1].in_flight is not None else ""
    chain = ladder_chain(ctx.policy, kind or ctx.failure.kind)
    pick = pick_rung(ctx.choice, chain)
    if pick is None:
        names = ", ".join(k.value for k in chain)
        return _give_up(ctx, GiveUpReason.LADDER_EXHAUSTED,
                        f"every rung of the {names} ladder is used up or at its floor "
                        f"(now {describe_knobs(ctx.knobs)}); giving up (use a GPU with more memory, "
                        "a smaller model, or lower the floors in the policy)")
    return _retry(ctx, pick, _newest(ctx.checkpoints))


def _split(ctx: _Context, verdict) -> Decision:
    """The culprit step trained as smaller micro-batches, same knobs, from the newest checkpoint."""
    order = carried_order(ctx.attempts[-1].culprit, same_knobs=True, split=(verdict.step, verdict.factor))
    note = (f"{verdict.why}: the batch is the culprit, not the recipe; resuming with the same knobs and training "
            f"only step {verdict.step} as {verdict.factor} smaller micro-batches per micro-batch (same rows, "
            "same effective batch, same loss normalisation)")
    return dataclasses.replace(_retry(ctx, None, _newest(ctx.checkpoints), note=note), culprit=order)


def _quarantine(ctx: _Context, verdict, ckpt: CheckpointInfo | None) -> Decision:
    """The culprit rows never trained again (recorded as skipped), same knobs; bounded by the policy."""
    before = ctx.attempts[-1].culprit
    order = carried_order(before, same_knobs=True, quarantine=verdict.rows)
    total, limit = len(order.quarantine) if order else 0, ctx.policy.limits.max_quarantined_rows
    if total > limit:
        return _give_up(ctx, GiveUpReason.QUARANTINE_LIMIT,
                        f"{verdict.why}, but quarantining them would skip {total} rows, more than "
                        f"limits.max_quarantined_rows {limit}; giving up (inspect the rows listed in the report, "
                        "fix the data, or raise the limit)")
    note = (f"{verdict.why}: quarantining rows {list(verdict.rows)} (never trained again, recorded as skipped; "
            f"{total} of at most {limit} so far) and retrying with the same knobs")
    return dataclasses.replace(_retry(ctx, None, ckpt, note=note), culprit=order)


def _leak_note(ctx: _Context) -> str | None:
    """Why to restart with the same knobs, when memory grew step after step at knobs that fit
    until then (a leak in the training process: a fresh process frees it; a smaller recipe would
    only delay the next OOM) and the attempt added optimizer steps; else None."""
    growth, last = ctx.failure.memory_growth, ctx.attempts[-1]
    if not growth or growth <= 0 or last.max_step is None:
        return None
    before = [a.max_step for a in ctx.attempts[:-1] if a.max_step is not None]
    if before and last.max_step <= max(before):
        return None  # no progress since the last restart: degrade as for any OOM
    return (f"memory grew {growth / 2**20:.0f} MiB per step until the OOM, at knobs that had fit for "
            f"{last.max_step - max(before, default=0)} step(s): a leak in the training process, which "
            "a restart frees; resuming with the same knobs (the ladder applies if an attempt makes no "
            "progress)")


def _on_resume_oom(ctx: _Context) -> Decision:
    count = sum(1 for a in ctx.attempts if a.failure and a.failure.kind is FailureKind.RESUME_OOM)
    allowed = ctx.policy.limits.resume_oom_retries
    if count > allowed:
        ctx.cause += f" ({count} times, more than limits.resume_oom_retries {allowed}, so treated as a CUDA OOM)"
        return _on_oom(ctx, FailureKind.RESUME_OOM)
    note = f"retry {count} of {allowed} with the same knobs (a checkpoint-load spike, not a training-step OOM)"
    return _retry(ctx, None, _newest(ctx.checkpoints), note=note)


# Optimizer steps past both its resume point and the NaN before it that an attempt's clean checkpoint must
# lie to end a NaN streak. A run whose learning rate is off by a factor trains a step or two from each
# rollback before it overflows again; with a checkpoint every step, those checkpoints hold its finite but
# ruined weights (H200, 2026-12-01: LR 3000 -> 3 -> 0.003 kept resuming from them and never finished).
FRESH_STEPS = 10


def _nan_streak(attempts: Sequence[AttemptView], checkpoints: Sequence[CheckpointInfo]) -> int:
    """How many attempts in a row, ending with the last, failed with a non-finite loss right
    after their rollback. An attempt that trained past a clean checkpoint at least FRESH_STEPS beyond
    both its resume point and the previous NaN ends the streak: the walk-back restarts from there."""
    nans: list[AttemptView] = []
    for a in reversed(attempts):
        if not (a.failure and a.failure.kind is FailureKind.NAN_LOSS):
            break
        nans.append(a)
    for streak, (a, before) in enumerate(zip(nans, nans[1:]), start=1):
        start = max(a.resumed_step or 0, before.failure.step or 0)
        if a.failure.step is not None and any(start + FRESH_STEPS <= c.step <= a.failure.step for c in checkpoints):
            return streak
    return len(nans)


def _on_nan(ctx: _Context) -> Decision:
    step = ctx.failure.step
    clean = sorted((c for c in ctx.checkpoints if step is not None and c.step <= step),
                   key=lambda c: c.step, reverse=True)
    streak = _nan_streak(ctx.attempts, clean)
    verdict = judge_nan(ctx.attempts, streak)
    if verdict.culprit:  # the rows, not the weights: no walk further back, no rung
        return _quarantine(ctx, verdict, clean[0] if clean else None)
    # A loss can stay finite for a few steps after the weights were already ruined (a huge
    # update, then overflow later): when NaN comes back right after a rollback, go back
    # further each time (1st, 2nd, 4th, 8th newest clean checkpoint, then from scratch).
    back = 2 ** (streak - 1) - 1
    ckpt = clean[back] if back < len(clean) else None
    why = ("the failing step is unknown, so no checkpoint is known to be clean" if step is None
           else "the newest checkpoint at or before the last finite step" if back == 0
           else f"NaN again right after a rollback, so {back} checkpoint(s) further back"
           + ("" if ckpt else ": none left, starting from scratch"))
    if verdict.step is not None:  # the same rows again, cleared: say why they are not quarantined
        why = f"{verdict.why}; {why}"
    pick = ctx.pick(FailureKind.NAN_LOSS)
    if pick is None:
        return _retry(ctx, None, ckpt, note=f"no nan_loss rung left, retrying with the same knobs "
                      f"(counts toward the no-progress budget); {why}")
    return _retry(ctx, pick, ckpt, note=why)


def _on_hang(ctx: _Context) -> Decision:
    pick = ctx.pick(FailureKind.HANG)
    note = None if pick else "resuming with the same knobs (counts toward the no-progress budget)"
    return _retry(ctx, pick, _newest(ctx.checkpoints), note=note)


def _on_crash(ctx: _Context) -> Decision:
    if ctx.failure.usage:
        ctx.cause = ctx.failure.detail.strip().splitlines()[-1][:300] if ctx.failure.detail.strip() else ctx.cause
        return _give_up(ctx, GiveUpReason.UNRECOVERABLE,
                        "the command's own argument parser rejected it before training started; no retry can "
                        "change that (fix the command line or its config file and rerun)")
    if ctx.failure.phase is Phase.CHECKPOINT_LOAD and ctx.attempts[-1].resumed_step is not None:
        return _on_load_failure(ctx)
    streak = _crash_streak(ctx.attempts)
    limits = ctx.policy.limits
    if len(streak) >= 2 and _same_crash(streak[-1], streak[-2]):
        return _give_up(ctx, GiveUpReason.UNRECOVERABLE,
                        "the same error at the same step twice in a row: this is not a resource problem "
                        "no rung can fix; giving up (fix the error in the training script and rerun)")
    if len(streak) > limits.crash_retries:
        return _give_up(ctx, GiveUpReason.UNRECOVERABLE,
                        f"{len(streak)} crashes in a row, more than limits.crash_retries {limits.crash_retries}; "
                        "giving up (see the attempt's stderr.log)")
    b = limits.backoff
    backoff = float(min(b.max_s, b.initial_s * b.multiplier ** (len(streak) - 1)))
    pick = ctx.pick(FailureKind.CRASH)
    note = f"crash retry {len(streak)} of {limits.crash_retries} after {backoff:g} s"
    return _retry(ctx, pick, _newest(ctx.checkpoints), note=note, backoff_s=backoff)


def _on_load_failure(ctx: _Context) -> Decision:
    """The child crashed loading the checkpoint it resumed from (defect 8): that checkpoint is bad
    in a way no scan saw, and resuming from it again would crash again. Same knobs, the next older
    checkpoint (from scratch when none is left); no rung (no knob breaks a file) and no backoff.
    Bounded by max_attempts and the no-progress budget like every retry."""
    failed = ctx.attempts[-1].resumed_step
    older = [c for c in ctx.checkpoints if c.step < failed]
    ckpt = _newest(older)
    note = (f"checkpoint-{failed} failed to load, so it is set aside and the run resumes from the next "
            "older complete checkpoint" + ("" if ckpt else ": none is left, starting from scratch"))
    return _retry(ctx, None, ckpt, note=note)


# One handler per failure kind (a test checks every FailureKind has one, with words and a ladder rule).
HANDLERS: dict[FailureKind, Callable[[_Context], Decision]] = {
    FailureKind.CUDA_OOM: _on_oom, FailureKind.EVAL_OOM: _on_oom, FailureKind.HOST_OOM: _on_oom,
    FailureKind.RESUME_OOM: _on_resume_oom, FailureKind.NAN_LOSS: _on_nan,
    FailureKind.HANG: _on_hang, FailureKind.CRASH: _on_crash,
}


def _crash_streak(attempts: Sequence[AttemptView]) -> list[Failure]:
    streak: list[Failure] = []
    for a in reversed(attempts):
        if a.failure is None or a.failure.kind is not FailureKind.CRASH:
            break
        streak.insert(0, a.failure)
    return streak


def _same_crash(a: Failure, b: Failure) -> bool:
    return a.detail.strip() == b.detail.strip() and a.step == b.step


# --- decisions ------------------------------------------------------------------------
def _retry(ctx: _Context, pick: Pick | None, ckpt: CheckpointInfo | None, *,
           note: str | None = None, backoff_s: float = 0.0) -> Decision:
    knobs = dict(pick.knobs) if pick else dict(ctx.knobs)
    resume_class = pick.rung.resume if pick else ResumeClass.SAFE
    world = ctx.evidence.world_size
    before, after = effective_batch(ctx.knobs, world), effective_batch(knobs, world)
    lr_note = None
    if before is not None and after is not None and before != after:
        knobs, lr_note = lr_adjustment(ctx.policy.lr_rule, knobs, before, after)
    changes = tuple(KnobChange(k, ctx.knobs.get(k), v) for k, v in knobs.items() if ctx.knobs.get(k) != v)
    share = None
    profile = ctx.evidence.profile
    if profile is not None and any(c.knob == KNOB_MAX_SEQ_LENGTH for c in changes):
        share = truncation_share(profile, knobs[KNOB_MAX_SEQ_LENGTH])
    resume_from = None if resume_class is ResumeClass.RESTART or ckpt is None else ckpt.path
    parts = [describe_changes(changes, before, after, share, lr_note, profile is not None)
             if changes else None, note, describe_checkpoint(resume_from, resume_class), *ctx.skipped]
    reason = f"{ctx.cause}: " + "; ".join(p for p in parts if p)
    touched = any(c.knob in (KNOB_BATCH, KNOB_GRAD_ACCUM) for c in changes)
    return Decision(DecisionAction.RETRY, knobs, pick.ref if pick else None, changes, resume_from, resume_class,
                    reason, backoff_s=backoff_s, truncation_share=share,
                    effective_batch=(before, after) if touched else None, lr_note=lr_note)


def _give_up(ctx: _Context, why: GiveUpReason, text: str) -> Decision:
    reason = f"{ctx.cause}: " + "; ".join([text, *ctx.skipped])
    return Decision(DecisionAction.GIVE_UP, dict(ctx.knobs), None, (), None, None, reason, give_up=why)


def _newest(checkpoints: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
    return max(checkpoints, key=lambda c: (c.step, PurePath(c.path).name), default=None)


def rung_uses(attempts: Sequence[AttemptView]) -> dict[RungRef, int]:
    """How often each rung was applied so far (for reports)."""
    return dict(Counter(a.rung for a in attempts if a.rung is not None))

