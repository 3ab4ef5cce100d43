"""The records ``decide()`` reads and writes: plain frozen dataclasses and str enums.

The supervisor builds these from ``run.json`` and the child's error record; nothing
here touches a file, a clock or a process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from oomguard.protocol import FailureKind, Phase


class ResumeClass(str, enum.Enum):
    """How a knob change affects resuming from a checkpoint (DESIGN §5)."""

    SAFE = "safe"  # effective batch, LR schedule and data position stay exact
    REINDEX = "reindex"  # data position must be translated (samples seen, not batches)
    TRANSFORM = "transform"  # checkpoint must be converted (LoRA rank cut by SVD)
    NUMERIC = "numeric"  # resumes, but numerics differ (precision, learning rate)
    RESTART = "restart"  # the checkpoint cannot be used: start from scratch


class GiveUpReason(str, enum.Enum):
    LADDER_EXHAUSTED = "ladder_exhausted"
    NO_PROGRESS = "no_progress"
    MAX_ATTEMPTS = "max_attempts"
    WALL_CLOCK = "wall_clock"
    UNRECOVERABLE = "unrecoverable"


@dataclass(frozen=True)
class Failure:
    """Why an attempt ended. ``step`` is the last completed optimizer step (None: none);
    ``memory_growth`` the steady growth of step peaks (bytes/step) the child saw before it
    failed, None when memory was flat."""

    kind: FailureKind
    step: int | None = None
    phase: Phase = Phase.UNKNOWN
    detail: str = ""
    rank: int = 0
    memory_growth: float | None = None
    usage: bool = False  # the command's own argument parser rejected it before any step (deterministic)


@dataclass(frozen=True)
class RungRef:
    """A rung's position: ``policy.ladders[ladder].rungs[index]``."""

    ladder: FailureKind
    index: int


@dataclass(frozen=True)
class AttemptView:
    """One finished attempt, as ``decide()`` needs it.

    ``rung`` is the rung whose application produced this attempt's knobs (None for the
    first attempt and for retries without a change); ``max_step`` the highest completed
    optimizer step the attempt reached (None: none); ``knobs`` what the child ran with, as
    it reported (a knob it does not have is absent); ``resumed_step`` the step of the
    checkpoint it resumed from (None: a fresh start).
    """

    n: int
    knobs: Mapping[str, Any]
    rung: RungRef | None
    failure: Failure | None
    max_step: int | None
    resumed_step: int | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint directory and the optimizer step it holds."""

    path: str
    step: int


@dataclass(frozen=True)
class DataProfile:
    """Token lengths of the training set as a quantile function.

    ``quantiles`` are ``(q, length)`` pairs sorted by ``q`` from 0.0 to 1.0 (e.g. every
    0.01); lengths in tokens.
    """

    count: int
    quantiles: tuple[tuple[float, int], ...]
    max_len: int
    packed: bool = False  # lengths of samples packed into max_length rows (a shorter length still saves)

    def __post_init__(self) -> None:
        qs = [q for q, _ in self.quantiles]
        if len(qs) < 2 or qs != sorted(qs) or qs[0] != 0.0 or qs[-1] != 1.0:
            raise ValueError(
                f"DataProfile.quantiles must be sorted by q and run from 0.0 to 1.0 "
                f"(got q values {qs[:3]}...{qs[-3:]}); build it from sorted token lengths"
            )


@dataclass(frozen=True)
class KnobChange:
    knob: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Decision:
    """What the supervisor does next; ``reason`` is one sentence, root cause first."""

    action: Literal["retry", "give_up"]
    knobs: dict[str, Any]
    rung: RungRef | None
    changes: tuple[KnobChange, ...]
    resume_from: str | None
    resume_class: ResumeClass | None
    reason: str
    give_up: GiveUpReason | None = None
    backoff_s: float = 0.0  # seconds to wait before the next attempt
    truncation_share: float | None = None  # share of training tokens the new max_seq_length cuts
    effective_batch: tuple[int | None, int | None] | None = None  # (before, after): batch*accum*world_size
    lr_note: str | None = None  # set when the effective batch changes
