"""Rung arithmetic: what one rung does to a knob set, and the measures around it.

Pure functions over plain dicts; ``decide`` picks the rung, this module applies it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from oomguard import knobs as knobs_registry
from oomguard.policy.records import DataProfile
from oomguard.policy.schema import (
    HalveBatchRung,
    LrRule,
    Policy,
    QuantileStepRung,
    Rung,
    ScaleRung,
    SetRung,
    StepDownRung,
)
from oomguard.protocol import KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH, FailureKind

__all__ = ["KNOB_LEARNING_RATE", "KNOB_MINIMUM", "LADDER_FALLBACK", "OOM_FALLBACK_KINDS", "OOM_KINDS",
           "apply_rung", "effective_batch", "ladder_chain", "largest_proper_divisor", "lr_adjustment",
           "rung_budget", "truncation_share"]

# A declared (not core) knob that lr_rule adjusts when the effective batch changes.
KNOB_LEARNING_RATE = knobs_registry.LEARNING_RATE
# Smallest valid value of the core integer knobs (the schema enforces the same).
KNOB_MINIMUM = {KNOB_MAX_SEQ_LENGTH: 16}
# The ladder a failure kind climbs when the policy has none of its own: an OOM kind falls back to the
# cuda_oom ladder (required by the schema); None: no ladder, the handler retries with the same knobs.
# Every FailureKind has an entry (a test checks it): a new kind must say which.
LADDER_FALLBACK: dict[FailureKind, FailureKind | None] = {
    FailureKind.CUDA_OOM: None, FailureKind.EVAL_OOM: FailureKind.CUDA_OOM,
    FailureKind.HOST_OOM: FailureKind.CUDA_OOM, FailureKind.RESUME_OOM: FailureKind.CUDA_OOM,
    FailureKind.NAN_LOSS: None, FailureKind.HANG: None, FailureKind.CRASH: None,
}
OOM_FALLBACK_KINDS = tuple(k for k, v in LADDER_FALLBACK.items() if v is FailureKind.CUDA_OOM)
OOM_KINDS = (FailureKind.CUDA_OOM, *OOM_FALLBACK_KINDS)  # out of memory, of any kind: growth is evidence


def effective_batch(knobs: Mapping[str, Any], world_size: int = 1) -> int | None:
    """Samples per optimizer step (the registry's one definition; None when a part is unknown)."""
    return knobs_registry.effective_batch(knobs, world_size)


def truncation_share(profile: DataProfile, max_len: int) -> float:
    """Share of training tokens beyond ``max_len`` (0.0-1.0).

    Integrates the piecewise-linear quantile function (trapezoids), splitting a
    segment exactly where it crosses ``max_len``.
    """
    total = cut = 0.0
    points = profile.quantiles
    for (q0, y0), (q1, y1) in zip(points, points[1:]):
        width = q1 - q0
        total += width * (y0 + y1) / 2
        cut += _excess_area(width, y0 - max_len, y1 - max_len)
    return cut / total if total > 0 else 0.0


def _excess_area(width: float, e0: float, e1: float) -> float:
    """Area of max(e, 0) where e runs linearly from e0 to e1 over ``width``."""
    if e0 >= 0 and e1 >= 0:
        return width * (e0 + e1) / 2
    if e0 <= 0 and e1 <= 0:
        return 0.0
    positive, negative = (e1, e0) if e1 > 0 else (e0, e1)
    part = width * positive / (positive - negative)
    return part * positive / 2


def apply_rung(rung: Rung, knobs: Mapping[str, Any],
               profile: DataProfile | None = None) -> dict[str, Any] | None:
    """The knobs after one application of ``rung``, or None when it changes nothing (or a knob
    it needs is not in ``knobs``: the child does not have it)."""
    if any(k not in knobs for k in knobs_registry.needs(rung.knob, rung.op.value)):
        return None
    new = dict(knobs)
    if isinstance(rung, SetRung) and rung.only_from is not None and knobs[rung.knob] not in rung.only_from:
        return None
    if isinstance(rung, HalveBatchRung):
        changed = _halve_batch(rung, new)
    else:
        value = _next_value(rung, knobs[rung.knob], profile)
        changed = value is not None and value != knobs[rung.knob] and not _saves_nothing(rung.knob, value, profile)
        if changed:
            new[rung.knob] = value
    return new if changed else None


def _saves_nothing(knob: str, value: Any, profile: DataProfile | None) -> bool:
    """A length at or above the longest row cuts nothing (rows are padded to the longest in the
    batch, not to max_seq_length): such a rung would spend an attempt for nothing. Packed rows are
    max_seq_length long whatever their samples, so there a shorter length always saves."""
    return (knob == KNOB_MAX_SEQ_LENGTH and profile is not None and not profile.packed
            and value >= profile.max_len)


def _next_value(rung: Rung, current: Any, profile: DataProfile | None) -> Any:
    if isinstance(rung, SetRung):
        return rung.value
    if isinstance(rung, StepDownRung):
        below = [v for v in rung.values if v < current]
        return max(below) if below else None
    if isinstance(rung, QuantileStepRung):
        return _quantile_step(rung, current, profile)
    assert isinstance(rung, ScaleRung)
    return _scale(rung, current)


def _scale(rung: ScaleRung, current: Any) -> Any:
    value = current * rung.factor
    if isinstance(current, int):
        value = int(math.floor(value))
        if rung.multiple_of:
            value -= value % rung.multiple_of
        floor = rung.floor if rung.floor is not None else KNOB_MINIMUM.get(rung.knob, 1)
    else:
        floor = rung.floor
    if floor is not None and value < floor:
        value = floor
    return value if value < current else None


def _quantile_step(rung: QuantileStepRung, current: int, profile: DataProfile | None) -> int | None:
    """Next profile length below ``current``, rounded down; half of it without a profile.

    Lengths at or above the longest sample save nothing (batches are padded to the
    longest sample, not to max_seq_length), so the step starts below ``max_len``. One step
    goes at least to ``max_factor`` and never below ``min_factor`` × the current length
    (rounded down to ``multiple_of``).
    """
    m = rung.multiple_of
    if profile is None:
        value = (current // 2) // m * m
    else:
        cap = min(current, profile.max_len)
        lengths = {length // m * m for _, length in profile.quantiles}
        below = [v for v in lengths if 0 < v < cap]
        value = max(below) if below else rung.floor
        value = min(value, int(cap * rung.max_factor) // m * m)  # a step that frees something
        value = max(value, int(cap * rung.min_factor) // m * m)
    value = max(value, rung.floor)
    return value if value < current else None


def _halve_batch(rung: HalveBatchRung, knobs: dict[str, Any]) -> bool:
    """Batch to its largest proper divisor, accumulation up by the same factor (exact)."""
    batch = int(knobs[KNOB_BATCH])
    smaller = largest_proper_divisor(batch)
    if smaller < rung.floor or smaller >= batch:
        return False
    knobs[KNOB_BATCH] = smaller
    knobs[KNOB_GRAD_ACCUM] = int(knobs[KNOB_GRAD_ACCUM]) * (batch // smaller)
    return True


def largest_proper_divisor(n: int) -> int:
    """n/2 for even n; for odd n its largest divisor below n (1 for a prime or 1)."""
    for p in range(2, math.isqrt(n) + 1):
        if n % p == 0:
            return n // p
    return 1


def ladder_chain(policy: Policy, kind: FailureKind) -> list[FailureKind]:
    """The ladders tried, in order, for ``kind``: its own, then each ``then:``."""
    start = kind
    if policy.ladders.get(kind) is None and LADDER_FALLBACK[kind] is not None:
        start = LADDER_FALLBACK[kind]
    chain: list[FailureKind] = []
    current: FailureKind | None = start
    while current is not None and current not in chain:
        ladder = policy.ladders.get(current)
        if ladder is None:
            break
        chain.append(current)
        current = ladder.then
    return chain


def rung_budget(policy: Policy) -> int:
    """Most rung applications any failure sequence can get: the sum of every max_times."""
    total = 0
    for kind in FailureKind:
        ladder = policy.ladders.get(kind)
        if ladder is not None:
            total += sum(r.max_times for r in ladder.rungs)
    return total


def lr_adjustment(rule: LrRule, knobs: dict[str, Any], before: int, after: int) -> tuple[dict[str, Any], str]:
    """Apply ``lr_rule`` after the effective batch went ``before`` -> ``after``; say what it did."""
    steps = f"an epoch now takes {before / after:.3g}x the optimizer steps"
    if rule is LrRule.KEEP:
        return knobs, (f"learning rate kept (lr_rule keep) although the effective batch changed "
                       f"{before} → {after}; {steps}; set lr_rule linear or sqrt to scale it")
    factor = after / before if rule is LrRule.LINEAR else math.sqrt(after / before)
    lr = knobs.get(KNOB_LEARNING_RATE)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        return knobs, (f"lr_rule {rule.value} asks for learning rate x{factor:.3g}, but the policy "
                       f"declares no numeric learning_rate knob, so the child keeps its own; {steps}; "
                       "declare learning_rate under knobs")
    new = dict(knobs)
    new[KNOB_LEARNING_RATE] = lr * factor
    return new, (f"learning_rate {lr:g} → {lr * factor:g} (lr_rule {rule.value}, x{factor:.3g} "
                 f"for effective batch {before} → {after}); {steps}")
