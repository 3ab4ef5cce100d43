"""``decide()``: from the attempt history to the next step. Pure: no clock, no I/O.

Budgets are checked first (attempts, wall clock, no progress); then each failure kind
has one handler (DESIGN §4). Rung use counts come from the history's ``rung`` fields.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable, Mapping, Sequence

from oomguard.knobs import needs
from oomguard.protocol import KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH, KNOB_PRECISION, FailureKind, Phase
from oomguard.policy.ladder import (apply_rung, effective_batch, ladder_chain, lr_adjustment,
                                    truncation_share)
from oomguard.policy.narrative import (describe_cause, describe_changes, describe_checkpoint,
                                       describe_knobs)
from oomguard.policy.records import (AttemptView, CheckpointInfo, DataProfile, Decision, Failure,
                                     GiveUpReason, KnobChange, ResumeClass, RungRef)
from oomguard.policy.schema import Policy, Rung, SetRung


@dataclass(frozen=True)
class _Pick:
    ref: RungRef
    rung: Rung
    knobs: dict[str, Any]


@dataclass
class _Context:
    policy: Policy
    attempts: Sequence[AttemptView]
    checkpoints: Sequence[CheckpointInfo]
    profile: DataProfile | None
    world_size: int
    bf16_ok: bool
    failure: Failure
    knobs: dict[str, Any]
    cause: str
    capabilities: Mapping[str, str] | None = None  # knob -> how it reaches the child; None: unrestricted
    fp16_ok: bool = True
    skipped: list[str] = field(default_factory=list)  # rungs passed over, with why


def decide(policy: Policy, attempts: Sequence[AttemptView], checkpoints: Sequence[CheckpointInfo], *,
           profile: DataProfile | None = None, elapsed_s: float = 0.0, world_size: int = 1,
           bf16_ok: bool | None = None, fp16_ok: bool = True,
           capabilities: Mapping[str, str] | None = None) -> Decision:
    """What to do after the last attempt in ``attempts`` failed.

    ``capabilities``: knob -> how a change of it reaches the child (observed in the child and
    its command); a rung on a knob not listed is passed over, saying why. None: every knob.
    ``fp16_ok``: fp16 mixed precision can run (a CUDA GPU); ``bf16_ok``: bf16 can."""
    if not attempts or attempts[-1].failure is None:
        raise ValueError("decide() needs a history whose last attempt failed (got "
                         f"{'no attempts' if not attempts else 'a last attempt without failure'}); "
                         "call it only after a failed attempt")
    failure = attempts[-1].failure
    ctx = _Context(policy, attempts, checkpoints, profile, world_size,
                   policy.capabilities.bf16 if bf16_ok is None else bf16_ok,
                   failure, dict(attempts[-1].knobs), describe_cause(failure, policy.limits),
                   capabilities=capabilities, fp16_ok=fp16_ok)
    budget = _budget_give_up(ctx, elapsed_s)
    if budget is not None:
        return budget
    return _HANDLERS[failure.kind](ctx)


# --- budgets ---------------------------------------------------------------------------
def _budget_give_up(ctx: _Context, elapsed_s: float) -> Decision | None:
    limits = ctx.policy.limits
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
    chain = ladder_chain(ctx.policy, kind or ctx.failure.kind)
    pick = _pick_rung(ctx, chain)
    if pick is None:
        names = ", ".join(k.value for k in chain)
        return _give_up(ctx, GiveUpReason.LADDER_EXHAUSTED,
                        f"every rung of the {names} ladder is used up or at its floor "
                        f"(now {describe_knobs(ctx.knobs)}); giving up (use a GPU with more memory, "
                        "a smaller model, or lower the floors in the policy)")
    return _retry(ctx, pick, _newest(ctx.checkpoints))


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


def _nan_streak(attempts: Sequence[AttemptView], checkpoints: Sequence[CheckpointInfo]) -> int:
    """How many attempts in a row, ending with the last, failed with a non-finite loss right
    after their rollback. An attempt that trained past a clean checkpoint beyond both its resume
    point and the previous NaN ends the streak: the walk-back restarts from that checkpoint."""
    nans: list[AttemptView] = []
    for a in reversed(attempts):
        if not (a.failure and a.failure.kind is FailureKind.NAN_LOSS):
            break
        nans.append(a)
    for streak, (a, before) in enumerate(zip(nans, nans[1:]), start=1):
        start = max(a.resumed_step or 0, before.failure.step or 0)
        if a.failure.step is not None and any(start < c.step <= a.failure.step for c in checkpoints):
            return streak
    return len(nans)


def _on_nan(ctx: _Context) -> Decision:
    step = ctx.failure.step
    clean = sorted((c for c in ctx.checkpoints if step is not None and c.step <= step),
                   key=lambda c: c.step, reverse=True)
    # A loss can stay finite for a few steps after the weights were already ruined (a huge
    # update, then overflow later): when NaN comes back right after a rollback, go back
    # further each time (1st, 2nd, 4th, 8th newest clean checkpoint, then from scratch).
    back = 2 ** (_nan_streak(ctx.attempts, clean) - 1) - 1
    ckpt = clean[back] if back < len(clean) else None
    why = ("the failing step is unknown, so no checkpoint is known to be clean" if step is None
           else "the newest checkpoint at or before the last finite step" if back == 0
           else f"NaN again right after a rollback, so {back} checkpoint(s) further back"
           + ("" if ckpt else ": none left, starting from scratch"))
    pick = _pick_rung(ctx, ladder_chain(ctx.policy, FailureKind.NAN_LOSS))
    if pick is None:
        return _retry(ctx, None, ckpt, note=f"no nan_loss rung left, retrying with the same knobs "
                      f"(counts toward the no-progress budget); {why}")
    return _retry(ctx, pick, ckpt, note=why)


def _on_hang(ctx: _Context) -> Decision:
    pick = _pick_rung(ctx, ladder_chain(ctx.policy, FailureKind.HANG))
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
    pick = _pick_rung(ctx, ladder_chain(ctx.policy, FailureKind.CRASH))
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


_HANDLERS: dict[FailureKind, Callable[[_Context], Decision]] = {
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


# --- rungs and decisions --------------------------------------------------------------
def _pick_rung(ctx: _Context, chain: Sequence[FailureKind]) -> _Pick | None:
    """The first rung, in chain order, with uses left that changes the knobs."""
    used = Counter(a.rung for a in ctx.attempts if a.rung is not None)
    for kind in chain:
        ladder = ctx.policy.ladders.get(kind)
        for i, rung in enumerate(ladder.rungs if ladder else ()):
            ref = RungRef(kind, i)
            if used[ref] >= rung.max_times:
                continue
            why = _cannot_take(ctx, rung)
            if why:
                ctx.skipped.append(f"passed over {kind.value} rung {i} ({_rung_words(rung)}): {why}")
                continue
            new = apply_rung(rung, ctx.knobs, ctx.profile)
            if new is None or new == ctx.knobs:
                continue
            over = _cut_over_bound(rung, new, ctx.profile)
            if over is not None:
                ctx.skipped.append(f"passed over {kind.value} rung {i} (max_seq_length → "
                                   f"{new[KNOB_MAX_SEQ_LENGTH]}): {over}")
                continue
            return _Pick(ref, rung, new)
    return None


def _cannot_take(ctx: _Context, rung: Rung) -> str | None:
    """Why the child cannot take ``rung`` (Trust rule 2: a rung only on a knob the child can
    take, a precision only one the device has), or None."""
    for knob in needs(rung.knob, rung.op.value):
        if knob not in ctx.knobs:
            return f"the child's recipe has no {knob} oomguard could observe"
        if ctx.capabilities is not None and knob not in ctx.capabilities:
            return (f"the child cannot take a new {knob}: its command has no such flag and no argument "
                    "object oomguard can set it on, or an earlier change of it did not show in the child")
    if isinstance(rung, SetRung) and rung.knob == KNOB_PRECISION:
        if rung.value == "bf16" and not ctx.bf16_ok:
            return "this device has no bf16 (no CUDA GPU, or compute capability below 8.0)"
        if rung.value == "fp16" and not ctx.fp16_ok:
            return "fp16 mixed precision needs a CUDA GPU and none is in use"
    return None


def _rung_words(rung: Rung) -> str:
    if isinstance(rung, SetRung):
        return f"{rung.knob} → {rung.value}"
    return "per_device_train_batch_size ÷ 2" if rung.op.value == "halve_batch" else f"{rung.knob} {rung.op.value}"


def _cut_over_bound(rung, new: Mapping[str, Any], profile: DataProfile | None) -> str | None:
    """Why a bounded quantile_step may not apply (its cut exceeds ``max_token_cut``), or None."""
    bound = getattr(rung, "max_token_cut", None)
    if bound is None:
        return None
    if profile is None:
        return f"the training tokens it would cut are unknown (no data profile yet; max_token_cut {bound:.0%})"
    share = truncation_share(profile, new[KNOB_MAX_SEQ_LENGTH])
    return None if share <= bound else \
        f"it would cut {share:.1%} of the training tokens, more than max_token_cut {bound:.0%}"


def _retry(ctx: _Context, pick: _Pick | None, ckpt: CheckpointInfo | None, *,
           note: str | None = None, backoff_s: float = 0.0) -> Decision:
    knobs = dict(pick.knobs) if pick else dict(ctx.knobs)
    resume_class = pick.rung.resume if pick else ResumeClass.SAFE
    before, after = effective_batch(ctx.knobs, ctx.world_size), effective_batch(knobs, ctx.world_size)
    lr_note = None
    if before is not None and after is not None and before != after:
        knobs, lr_note = lr_adjustment(ctx.policy.lr_rule, knobs, before, after)
    changes = tuple(KnobChange(k, ctx.knobs.get(k), v) for k, v in knobs.items() if ctx.knobs.get(k) != v)
    share = None
    if ctx.profile is not None and any(c.knob == KNOB_MAX_SEQ_LENGTH for c in changes):
        share = truncation_share(ctx.profile, knobs[KNOB_MAX_SEQ_LENGTH])
    resume_from = None if resume_class is ResumeClass.RESTART or ckpt is None else ckpt.path
    parts = [describe_changes(changes, before, after, share, lr_note, ctx.profile is not None)
             if changes else None, note, describe_checkpoint(resume_from, resume_class), *ctx.skipped]
    reason = f"{ctx.cause}: " + "; ".join(p for p in parts if p)
    touched = any(c.knob in (KNOB_BATCH, KNOB_GRAD_ACCUM) for c in changes)
    return Decision("retry", knobs, pick.ref if pick else None, changes, resume_from, resume_class,
                    reason, backoff_s=backoff_s, truncation_share=share,
                    effective_batch=(before, after) if touched else None, lr_note=lr_note)


def _give_up(ctx: _Context, why: GiveUpReason, text: str) -> Decision:
    reason = f"{ctx.cause}: " + "; ".join([text, *ctx.skipped])
    return Decision("give_up", dict(ctx.knobs), None, (), None, None, reason, give_up=why)


def _newest(checkpoints: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
    return max(checkpoints, key=lambda c: (c.step, PurePath(c.path).name), default=None)


def rung_uses(attempts: Sequence[AttemptView]) -> dict[RungRef, int]:
    """How often each rung was applied so far (for reports)."""
    return dict(Counter(a.rung for a in attempts if a.rung is not None))

