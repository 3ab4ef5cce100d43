"""The sentences in ``Decision.reason``: root cause first, then what changes and why."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Mapping, Sequence

from oomguard.policy.records import Failure, KnobChange, ResumeClass
from oomguard.policy.schema import Limits
from oomguard.protocol import CORE_KNOBS, KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH, FailureKind, Phase

__all__ = ["KIND_WORDS", "describe_cause", "describe_changes", "describe_checkpoint", "describe_knobs"]

# What each failure kind is called in a decision (a test checks every FailureKind has its words).
KIND_WORDS = {
    FailureKind.CUDA_OOM: "CUDA OOM",
    FailureKind.RESUME_OOM: "CUDA OOM while loading the checkpoint",
    FailureKind.EVAL_OOM: "CUDA OOM during evaluation",
    FailureKind.NAN_LOSS: "non-finite loss or gradient",
    FailureKind.HOST_OOM: "host memory exhausted (the child was SIGKILLed)",
    FailureKind.HANG: "hang",
    FailureKind.CRASH: "crash",
}
_RESUME_WORDS = {
    ResumeClass.SAFE: "",
    ResumeClass.REINDEX: (" (same samples per step, so the data position is exact; with packing the journal flags "
                          "it inexact)"),
    ResumeClass.TRANSFORM: " (checkpoint transformed to the new setting, e.g. LoRA rank cut by SVD)",
    ResumeClass.NUMERIC: " (numerically different from here on)",
}


def describe_cause(failure: Failure, limits: Limits) -> str:
    """'CUDA OOM at step 37 (forward_backward)' and the like."""
    words = KIND_WORDS[failure.kind]
    if failure.kind is FailureKind.HANG:
        words = f"no heartbeat for {limits.hang_timeout_s:g} s (hang)"
    if failure.step is None:
        where = " before the first optimizer step"
    elif failure.kind is FailureKind.NAN_LOSS:
        where = f" after step {failure.step}"
    else:
        where = f" at step {failure.step}"
    text = words + where
    if failure.phase is not Phase.UNKNOWN:
        text += f" ({failure.phase.value})"
    if failure.rank:
        text += f" on rank {failure.rank}"
    if failure.detail and failure.kind is FailureKind.CRASH:
        text += f": {failure.detail.strip().splitlines()[-1][:200]}"
    return text


def describe_changes(changes: Sequence[KnobChange], before: int, after: int, share: float | None,
                     lr_note: str | None, has_profile: bool) -> str:
    text = " with ".join(f"{c.knob} {_fmt(c.old)} → {_fmt(c.new)}" for c in changes)
    if any(c.knob in (KNOB_BATCH, KNOB_GRAD_ACCUM) for c in changes):
        if before == after:
            text += f" (effective batch {before} kept)"
        else:
            text += f" (effective batch changes {before} → {after}; {lr_note})"
    if any(c.knob == KNOB_MAX_SEQ_LENGTH for c in changes):
        if share is not None:
            text += f" (truncates {share:.1%} of training tokens)"
        elif not has_profile:
            text += " (no data profile: the share of tokens truncated is unknown)"
    return text


def describe_checkpoint(resume_from: str | None, resume_class: ResumeClass) -> str:
    if resume_class is ResumeClass.RESTART:
        return "starting from scratch (this change cannot resume from a checkpoint)"
    if resume_from is None:
        return "starting from scratch (no usable checkpoint yet)"
    return f"resuming from {PurePath(resume_from).name}{_RESUME_WORDS[resume_class]}"


def describe_knobs(knobs: Mapping[str, Any]) -> str:
    """The core knobs only: the ones a reader recognises at a glance."""
    return ", ".join(f"{k} {_fmt(knobs[k])}" for k in CORE_KNOBS if k in knobs)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
