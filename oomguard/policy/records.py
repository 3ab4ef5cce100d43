"""The records ``decide()`` reads and writes: plain frozen dataclasses and str enums.

What the run record holds (a failure, a rung, a decision) is the run record's own type
(``oomguard.protocol.run_record``), re-exported here; what only ``decide()`` reads is defined here,
with :class:`Evidence`: everything known after a failed attempt, gathered once by the supervisor.
Nothing here touches a file, a clock or a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from oomguard.protocol import ErrorRecord, ResumeMode
from oomguard.protocol.run_record import (
    CulpritOrder,
    Decision,
    DecisionAction,
    Failure,
    GiveUpReason,
    KnobChange,
    ResumeClass,
    RungRef,
    SetAside,
    SetAsideReason,
)

__all__ = ["AttemptView", "CheckpointInfo", "CulpritOrder", "DataProfile", "GrowTarget", "InFlight", "MemoryPoint",
           "InFlightBatch", "Decision",
           "DecisionAction", "DeviceCapabilities",
           "Evidence", "Failure", "GiveUpReason", "KnobChange", "ResumeClass", "ResumeMode", "RungRef", "SetAside",
           "SetAsideReason"]


@dataclass(frozen=True)
class InFlightBatch:
    """One micro-batch of the step an attempt failed in: its training-set rows, its tokens
    (``input_ids.numel()``: rows x padded length) and whether its loss was finite (None: it never finished,
    the one that ran out of memory)."""

    rows: tuple[int, ...]
    tokens: int
    finite: bool | None = None


@dataclass(frozen=True)
class InFlight:
    """The optimizer step an attempt failed in, as the child recorded it (``ledger/rank<k>.inflight.jsonl``):
    ``step`` the step being trained (1-based: the last completed one + 1), ``kind`` oom | nan | other,
    ``factor`` the split factor it ran at (1: whole), ``unsplittable`` why its micro-batches could not be
    split (None: they could, or no split was asked)."""

    step: int
    kind: str
    micro_batches: tuple[InFlightBatch, ...]
    factor: int = 1
    unsplittable: str | None = None

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(r for m in self.micro_batches for r in m.rows)


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
    resumed_from: str | None = None  # the checkpoint it resumed from (None: a fresh start)
    culprit: CulpritOrder | None = None  # the split steps / quarantined rows it ran under (issue 19)
    in_flight: InFlight | None = None  # the step it failed in, as the child recorded it
    fitted_tokens: tuple[int, ...] = ()  # tokens trained at once by each micro-batch of its completed steps


@dataclass(frozen=True)
class CheckpointInfo:
    """One of this run's checkpoint directories and the optimizer step it holds; ``complete``: every
    file a resume reads is there and sound (only complete ones are resumed from)."""

    path: str
    step: int
    complete: bool = True


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
class MemoryPoint:
    """One journaled memory sample of the running attempt: the optimizer step, its allocated peak (bytes, as
    torch reports; the step's own: peaks are reset per step) and the rank that measured it."""

    step: int
    peak: int
    rank: int = 0


@dataclass(frozen=True)
class GrowTarget:
    """A degrade grow back may undo (issue 18 item 5): the halve_batch rung ``rung`` applied before attempt
    ``degraded``, and the knobs with the batch and accumulation from before it (``knobs``, ``changes``: the same
    effective batch). ``grown``: grow-backs this run so far, ``allowed``: the policy's ``max_times``."""

    rung: RungRef
    degraded: int
    knobs: Mapping[str, Any]
    changes: tuple[KnobChange, ...]
    effective_batch: int
    grown: int
    allowed: int
    culprit: CulpritOrder | None = None  # the quarantined rows carried over (split steps do not survive a new batch)


@dataclass(frozen=True)
class DeviceCapabilities:
    """What the device can train in. ``bf16`` None: unknown (the policy's ``capabilities.bf16``
    stands); ``fp16``: fp16 mixed precision can run (a CUDA GPU)."""

    bf16: bool | None = None
    fp16: bool = True


@dataclass(frozen=True)
class Evidence:
    """Everything ``decide()`` weighs after a failed attempt, gathered once by the supervisor.

    ``attempts``: the history, the last one failed; ``checkpoints``: this run's own checkpoints,
    complete or not (another run's are not evidence); ``ranks``: every rank's error record of the
    last attempt, root cause first; ``profile``: the training set's lengths; ``observed``: the recipe
    the child reported in force (``recipe_observed``); ``reach``: knob -> how a change reaches the
    child (None: every knob); ``held``: knob -> why no change of it can land now, whatever the command
takes (a LoRA rank cut on a sharded checkpoint); ``elapsed_s``: wall clock since the run started."""

    attempts: Sequence[AttemptView]
    checkpoints: Sequence[CheckpointInfo] = ()
    ranks: Sequence[ErrorRecord] = ()
    profile: DataProfile | None = None
    observed: Mapping[str, Any] | None = None
    device: DeviceCapabilities = DeviceCapabilities()
    reach: Mapping[str, str] | None = None
    held: Mapping[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    world_size: int = 1

    @property
    def failure(self) -> Failure:
        """The last attempt's failure (ValueError, saying how to call, when there is none)."""
        if not self.attempts or self.attempts[-1].failure is None:
            raise ValueError("decide() needs a history whose last attempt failed (got "
                             f"{'no attempts' if not self.attempts else 'a last attempt without failure'}); "
                             "call it only after a failed attempt")
        return self.attempts[-1].failure

    @property
    def growth(self) -> float | None:
        """Bytes/step the child's memory grew before it failed (any OOM kind); None: flat or unknown."""
        return self.failure.memory_growth

    @property
    def usable(self) -> list[CheckpointInfo]:
        """The complete checkpoints: the only ones a resume may start from."""
        return [c for c in self.checkpoints if c.complete]

    @property
    def last_finite_step(self) -> int | None:
        """The newest step every rank saw finite (the lowest any rank recorded), else the failure's step."""
        finite = [r.last_finite_step for r in self.ranks if r.last_finite_step is not None]
        return min(finite) if finite else self.failure.step
