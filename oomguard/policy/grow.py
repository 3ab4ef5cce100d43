"""Grow back (issue 18 item 5): after a resume-safe batch rung, return to the batch before it when memory stays
low. Pure: no clock, no I/O, no torch.

The rule: the newest degrade still in force is a ``halve_batch`` rung (resume-safe: per-device batch down,
accumulation up by the same factor); the step peaks the running attempt journaled stayed under
``limits.grow_back.below_fraction`` of the cap for ``after_steps`` optimizer steps in a row; then the run goes back
to the batch and accumulation from before that rung (same effective batch, so the resume is sample-exact) at a
checkpoint the child saves on request. Bounds: at most ``max_times`` grow-backs per run (0: off); never into a
batch that ran out of memory twice; never while the rung has no use left (a new OOM at the grown batch must be
able to take the same rung again rather than fall to a worse one); a length, rank or precision rung (or any
rung that is not resume-safe) is never undone, nor anything beneath it. The leak rule (an OOM after steady growth
restarts with the same knobs) is ``decide()``'s and stays as it is.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Collection, Mapping, Sequence

from oomguard.knobs import effective_batch
from oomguard.policy.culprit import carried_order
from oomguard.policy.ladder import OOM_KINDS
from oomguard.policy.records import (
    AttemptView,
    Decision,
    DecisionAction,
    GrowTarget,
    KnobChange,
    MemoryPoint,
    ResumeClass,
    RungRef,
)
from oomguard.policy.schema import HalveBatchRung, Policy
from oomguard.protocol import KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH

__all__ = ["below_streak", "decide_grow", "grow_target", "grow_words"]

GIB = 2**30
_SHORT = {KNOB_BATCH: "batch", KNOB_GRAD_ACCUM: "accumulation"}


def _degrades(attempts: Sequence[AttemptView], grown: Collection[int]) -> list[tuple[RungRef, int, dict[str, Any]]]:
    """The degrades still in force, oldest first: (rung, the attempt it was applied before, the knobs before it).
    A grow-back (an attempt in ``grown``) undoes the newest; a knob change that is neither forgets them all."""
    stack: list[tuple[RungRef, int, dict[str, Any]]] = []
    for before, a in zip(attempts, attempts[1:]):
        if a.rung is not None:
            stack.append((a.rung, a.n, dict(before.knobs)))
        elif a.n in grown and stack:
            stack.pop()
        elif _batch_of(before.knobs) != _batch_of(a.knobs):
            stack.clear()
    return stack


def _batch_of(knobs: Mapping[str, Any]) -> tuple[Any, Any]:
    return knobs.get(KNOB_BATCH), knobs.get(KNOB_GRAD_ACCUM)


def _ooms_at(attempts: Sequence[AttemptView], knobs: Mapping[str, Any]) -> int:
    """How often a batch of this size (at this length) ran out of memory in this run."""
    key = (knobs.get(KNOB_BATCH), knobs.get(KNOB_MAX_SEQ_LENGTH))
    return sum(1 for a in attempts if a.failure is not None and a.failure.kind in OOM_KINDS
               and (a.knobs.get(KNOB_BATCH), a.knobs.get(KNOB_MAX_SEQ_LENGTH)) == key)


def grow_target(policy: Policy, attempts: Sequence[AttemptView], grown: Collection[int] = ()) -> GrowTarget | None:
    """The degrade the running attempt (``attempts[-1]``) may grow back from, or None. ``grown``: the numbers
    of the attempts that started after a grow-back."""
    allowed = policy.limits.grow_back.max_times
    stack = _degrades(attempts, grown)
    if not stack or not attempts or len(grown) >= allowed:
        return None
    ref, degraded, before = stack[-1]
    ladder = policy.ladders.get(ref.ladder)
    rung = ladder.rungs[ref.index] if ladder is not None and 0 <= ref.index < len(ladder.rungs) else None
    if not isinstance(rung, HalveBatchRung) or rung.resume is not ResumeClass.SAFE:
        return None
    now = dict(attempts[-1].knobs)
    target = {**now, KNOB_BATCH: before.get(KNOB_BATCH), KNOB_GRAD_ACCUM: before.get(KNOB_GRAD_ACCUM)}
    kept = effective_batch(now)
    if kept is None or effective_batch(target) != kept or not now[KNOB_BATCH] < target[KNOB_BATCH]:
        return None
    if _ooms_at(attempts, target) >= 2:
        return None  # a batch that ran out of memory twice is never grown back into
    if Counter(a.rung for a in attempts)[ref] >= rung.max_times:
        return None  # an OOM at the grown batch could not take this rung again
    changes = tuple(KnobChange(k, now.get(k), target[k]) for k in (KNOB_BATCH, KNOB_GRAD_ACCUM)
                    if now.get(k) != target[k])
    # quarantined rows stay quarantined; split steps go (a new batch regroups the rows)
    culprit = carried_order(attempts[-1].culprit, same_knobs=False)
    return GrowTarget(ref, degraded, target, changes, kept, len(grown), allowed, culprit)


def below_streak(samples: Sequence[MemoryPoint], cap: int, fraction: float) -> tuple[int, int]:
    """(optimizer steps, highest peak) of the newest unbroken run of samples under ``fraction`` × ``cap``: from
    the first sample after the last one at or over the bar to the newest sample, both included. A step is as
    high as its highest rank. Steps between journaled samples (every 10th after the first 10) are not seen: they
    count as the samples around them say. (0, 0) when the newest sample is at or over the bar."""
    bar = fraction * cap
    per_step: dict[int, int] = {}
    for s in samples:
        per_step[s.step] = max(s.peak, per_step.get(s.step, 0))
    first, high = None, 0
    for step in sorted(per_step):
        if per_step[step] >= bar:
            first, high = None, 0
            continue
        first = step if first is None else first
        high = max(high, per_step[step])
    return (0, 0) if first is None else (max(per_step) - first + 1, high)


def grow_words(changes: Sequence[KnobChange], steps: int, fraction: float) -> str:
    """"batch 2 → 4 (accumulation 8 → 4) after 200 steps below 50 % of the cap"."""
    parts = [f"{_SHORT.get(c.knob, c.knob)} {c.old} → {c.new}" for c in changes]
    head = parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")
    return f"{head} after {steps} steps below {fraction * 100:.0f} % of the cap"


def decide_grow(policy: Policy, target: GrowTarget | None, samples: Sequence[MemoryPoint],
                cap: int | None) -> Decision | None:
    """A grow-back decision once the samples allow it (resume point still unknown: the checkpoint the child
    saves on request), else None. ``cap``: bytes, the emulated card's limit or the card's memory."""
    rule = policy.limits.grow_back
    if target is None or not cap or cap <= 0 or not samples:
        return None
    steps, high = below_streak(samples, cap, rule.below_fraction)
    if steps < rule.after_steps:
        return None
    reason = (f"grow back: {grow_words(target.changes, steps, rule.below_fraction)} (step peak at most "
              f"{high / GIB:.2f} of {cap / GIB:.2f} GiB): memory stayed low after the {target.rung.ladder.value} "
              f"halve_batch rung before attempt {target.degraded}, so the run returns to the batch before it at "
              f"the next checkpoint, effective batch {target.effective_batch} unchanged (the resume is sample-"
              f"exact); grow-back {target.grown + 1} of at most {target.allowed} (limits.grow_back.max_times)")
    return Decision(DecisionAction.RETRY, dict(target.knobs), None, target.changes, None, ResumeClass.SAFE, reason,
                    effective_batch=(target.effective_batch, target.effective_batch), culprit=target.culprit)
