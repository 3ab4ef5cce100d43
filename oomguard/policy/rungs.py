"""Which rung ``decide()`` takes: the first, in ladder-chain order, that has uses left, that the child
and the device can take, and that changes the knobs within its bounds. Pure.

Every rung passed over is said with why (``passed over cuda_oom rung 0 (precision → bf16): ...``):
the decision's reason carries those lines.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from oomguard.knobs import needs
from oomguard.policy.ladder import apply_rung, truncation_share
from oomguard.policy.records import AttemptView, DataProfile, RungRef
from oomguard.policy.schema import Policy, Rung, RungOp, SetRung
from oomguard.protocol import BF16_MIN_CAPABILITY, KNOB_MAX_SEQ_LENGTH, KNOB_PRECISION, FailureKind

__all__ = ["Pick", "RungChoice", "pick_rung", "rung_words"]

_BF16_CC = ".".join(map(str, BF16_MIN_CAPABILITY))  # "8.0"


@dataclass(frozen=True)
class Pick:
    """A rung to take and the knobs after it."""

    ref: RungRef
    rung: Rung
    knobs: dict[str, Any]


@dataclass
class RungChoice:
    """What a rung pick needs to know; ``skipped`` collects the rungs passed over, with why."""

    policy: Policy
    attempts: Sequence[AttemptView]
    knobs: Mapping[str, Any]
    profile: DataProfile | None
    bf16_ok: bool
    fp16_ok: bool = True
    reach: Mapping[str, str] | None = None  # knob -> how it reaches the child; None: unrestricted
    skipped: list[str] = field(default_factory=list)
    held: Mapping[str, str] = field(default_factory=dict)  # knob -> why no change of it can land now


def pick_rung(choice: RungChoice, chain: Sequence[FailureKind]) -> Pick | None:
    """The first rung, in chain order, with uses left that changes the knobs."""
    used = Counter(a.rung for a in choice.attempts if a.rung is not None)
    for kind in chain:
        ladder = choice.policy.ladders.get(kind)
        for i, rung in enumerate(ladder.rungs if ladder else ()):
            ref = RungRef(kind, i)
            if used[ref] >= rung.max_times:
                continue
            why = _cannot_take(choice, rung)
            if why:
                choice.skipped.append(f"passed over {kind.value} rung {i} ({rung_words(rung)}): {why}")
                continue
            new = apply_rung(rung, choice.knobs, choice.profile)
            if new is None or new == dict(choice.knobs):
                continue
            over = _cut_over_bound(rung, new, choice.profile)
            if over is not None:
                choice.skipped.append(f"passed over {kind.value} rung {i} (max_seq_length → "
                                      f"{new[KNOB_MAX_SEQ_LENGTH]}): {over}")
                continue
            return Pick(ref, rung, new)
    return None


def _cannot_take(choice: RungChoice, rung: Rung) -> str | None:
    """Why the child cannot take ``rung`` (Trust rule 2: a rung only on a knob the child can
    take, a precision only one the device has), or None."""
    for knob in needs(rung.knob, rung.op.value):
        if knob in choice.held:
            return choice.held[knob]
        if knob not in choice.knobs:
            return f"the child's recipe has no {knob} oomguard could observe"
        if choice.reach is not None and knob not in choice.reach:
            return (f"the child cannot take a new {knob}: its command has no such flag and no argument "
                    "object oomguard can set it on, or an earlier change of it did not show in the child")
    if isinstance(rung, SetRung) and rung.knob == KNOB_PRECISION:
        if rung.value == "bf16" and not choice.bf16_ok:
            return f"this device has no bf16 (no CUDA GPU, or compute capability below {_BF16_CC})"
        if rung.value == "fp16" and not choice.fp16_ok:
            return "fp16 mixed precision needs a CUDA GPU and none is in use"
    return None


def rung_words(rung: Rung) -> str:
    """``precision → bf16``, ``per_device_train_batch_size ÷ 2``, ``lora_r step_down``."""
    if isinstance(rung, SetRung):
        return f"{rung.knob} → {rung.value}"
    return "per_device_train_batch_size ÷ 2" if rung.op is RungOp.HALVE_BATCH else f"{rung.knob} {rung.op.value}"


def _cut_over_bound(rung: Rung, new: Mapping[str, Any], profile: DataProfile | None) -> str | None:
    """Why a bounded quantile_step may not apply (its cut exceeds ``max_token_cut``), or None."""
    bound = getattr(rung, "max_token_cut", None)
    if bound is None:
        return None
    if profile is None:
        return f"the training tokens it would cut are unknown (no data profile yet; max_token_cut {bound:.0%})"
    share = truncation_share(profile, new[KNOB_MAX_SEQ_LENGTH])
    return None if share <= bound else \
        f"it would cut {share:.1%} of the training tokens, more than max_token_cut {bound:.0%}"
