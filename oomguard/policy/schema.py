"""The shape of a policy file (pydantic v2). Meaning-level checks live in ``checks``.

``Policy.model_validate`` checks the shape only; load policies with
``oomguard.policy.load_policy`` / ``parse_policy``, which also run every consistency
check and report all problems of a file at once.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr

from oomguard.policy.records import ResumeClass
from oomguard.protocol import (
    KNOB_BATCH,
    KNOB_GRAD_ACCUM,
    KNOB_LORA_ALPHA,
    KNOB_LORA_R,
    KNOB_MAX_SEQ_LENGTH,
    KNOB_PRECISION,
    FailureKind,
)

__all__ = ["Backoff", "CORE_KNOB_ORDER", "Capabilities", "FlagNames", "FlagSpec", "GrowBack", "HalveBatchRung",
           "KnobValue", "Knobs", "Ladder", "Ladders", "Limits", "LrRule", "Match", "MemoryRange", "Number", "Policy",
           "Precision", "QuantileStepRung", "Rung", "RungOp", "ScaleRung", "SetRung", "StepDownRung"]

KnobValue = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
Number = Union[StrictInt, StrictFloat]
Precision = Literal["bf16", "fp16", "fp32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RungOp(str, enum.Enum):
    SCALE = "scale"
    SET = "set"
    STEP_DOWN = "step_down"
    HALVE_BATCH = "halve_batch"
    QUANTILE_STEP = "quantile_step"


class LrRule(str, enum.Enum):
    """What to do with the learning rate when a rung changes the effective batch."""

    KEEP = "keep"
    LINEAR = "linear"  # lr * new/old
    SQRT = "sqrt"  # lr * sqrt(new/old)


class _RungBase(_Strict):
    max_times: Annotated[StrictInt, Field(ge=1, description="how often this rung may be applied")] = 1
    resume: ResumeClass = Field(description="resume class (DESIGN §5)")
    note: str = ""


class ScaleRung(_RungBase):
    op: Literal[RungOp.SCALE]
    knob: str
    factor: Annotated[StrictFloat, Field(gt=0, lt=1, description="multiplier in (0, 1)")]
    floor: Number | None = Field(default=None, description="never go below this value")
    multiple_of: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="round the result down to a multiple of this (ints)")


class SetRung(_RungBase):
    op: Literal[RungOp.SET]
    knob: str
    value: KnobValue
    only_from: list[KnobValue] | None = Field(None, description=(
        "take the rung only while the knob has one of these values (a NaN's precision → bf16 only from fp16: "
        "from fp32 it would give up range for nothing)"))


class StepDownRung(_RungBase):
    op: Literal[RungOp.STEP_DOWN]
    knob: str
    values: Annotated[list[Number], Field(min_length=1, description="move to the next value below the current one")]


class HalveBatchRung(_RungBase):
    op: Literal[RungOp.HALVE_BATCH]
    knob: Literal["per_device_train_batch_size"] = KNOB_BATCH
    floor: Annotated[StrictInt, Field(ge=1, description="smallest per-device batch")] = 1


class QuantileStepRung(_RungBase):
    op: Literal[RungOp.QUANTILE_STEP]
    knob: Literal["max_seq_length"] = KNOB_MAX_SEQ_LENGTH
    floor: Annotated[StrictInt, Field(ge=16, description="smallest max_seq_length, tokens")] = 16
    multiple_of: Annotated[StrictInt, Field(ge=1, description="round down to this, tokens")] = 64
    min_factor: Annotated[StrictFloat, Field(gt=0, lt=1, description=(
        "one step never cuts below this share of the current length, however far below the next "
        "quantile lies (a long-tailed set would otherwise lose most of its tokens at once)"))] = 0.5
    max_factor: Annotated[StrictFloat, Field(gt=0, lt=1, description=(
        "one step cuts at least to this share of the current length: a step to the next 64-token "
        "quantile costs a restart and frees little (an H200 run stepped 1024 -> 960 -> 896 before "
        "the batch rung fitted)"))] = 0.875
    max_token_cut: Annotated[StrictFloat | None, Field(gt=0, le=1, description=(
        "pass this rung over (the ladder moves on) when the new length would cut more than this "
        "share of the training tokens, as the child's data profile tells; without a profile the "
        "cut is unknown and the rung is passed over too. null: no bound"))] = None


Rung = Annotated[Union[ScaleRung, SetRung, StepDownRung, HalveBatchRung, QuantileStepRung],
                 Field(discriminator="op")]


class Ladder(_Strict):
    rungs: list[Rung] = Field(default_factory=list)
    then: FailureKind | None = Field(default=None, description="when exhausted, continue with that ladder")
    rewarm_steps: Annotated[StrictInt, Field(ge=0, description=(
        "nan_loss only: after a rollback the resumed attempt re-enters warm-up, its learning rate ramped "
        "from 1/N of the schedule's to all of it over its first N optimizer steps (0: off)"))] = 0


class Ladders(_Strict):
    """One ladder per failure kind; only ``cuda_oom`` is required."""

    cuda_oom: Ladder
    resume_oom: Ladder | None = None
    eval_oom: Ladder | None = None
    nan_loss: Ladder | None = None
    host_oom: Ladder | None = None
    hang: Ladder | None = None
    crash: Ladder | None = None

    def get(self, kind: FailureKind) -> Ladder | None:
        return getattr(self, kind.value)


class MemoryRange(_Strict):
    min: Annotated[Number, Field(ge=0)] = 0  # GiB, as torch reports total memory
    max: Annotated[Number, Field(gt=0)] | None = None  # GiB; None = no upper bound


class Match(_Strict):
    name: list[str] = Field(default_factory=list, description="regexes, case-insensitive; any may match")
    memory_gib: MemoryRange | None = None
    priority: StrictInt = 0


class Capabilities(_Strict):
    bf16: StrictBool = True


class Knobs(BaseModel):
    """The starting recipe. Core knobs are typed; a policy may declare more."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, KnobValue]

    max_seq_length: Annotated[StrictInt, Field(ge=16, description="tokens")]
    per_device_train_batch_size: Annotated[StrictInt, Field(ge=1)]
    gradient_accumulation_steps: Annotated[StrictInt, Field(ge=1)]
    lora_r: Annotated[StrictInt, Field(ge=1)]
    lora_alpha: Annotated[Number, Field(gt=0)]
    precision: Precision


class Backoff(_Strict):
    initial_s: Annotated[Number, Field(ge=0)] = 5
    multiplier: Annotated[Number, Field(ge=1)] = 2
    max_s: Annotated[Number, Field(ge=0)] = 300


class GrowBack(_Strict):
    """Issue 18 item 5: after a resume-safe batch rung (``halve_batch``), return to the batch before it when
    memory stays low, at the next checkpoint, with the same effective batch (``policy/grow.py``)."""

    # optimizer steps in a row, in the degraded attempt, whose sampled step peak stays under the bar: 200 is
    # ~10 min of an 8B QLoRA step on one GPU (2-3 s/step) and 20 journaled samples (every 10th step)
    after_steps: Annotated[StrictInt, Field(ge=1, description="consecutive optimizer steps below the bar")] = 200
    # the bar, a share of the cap (the emulated --vram-limit, else the card): a step's peak is a fixed part
    # (weights, optimizer state) plus activations ~ batch, so doubling the batch at most doubles the peak;
    # under half the cap the doubled batch fits even with no fixed part, at the lengths seen
    below_fraction: Annotated[StrictFloat, Field(gt=0, lt=1, description="share of the cap")] = 0.5
    # grow-backs per run; 0 turns grow back off
    max_times: Annotated[StrictInt, Field(ge=0, description="grow-backs per run (0: off)")] = 2


class Limits(_Strict):
    max_attempts: Annotated[StrictInt, Field(ge=1)] = 20
    no_progress_attempts: Annotated[StrictInt, Field(ge=1)] = 3
    wall_clock_budget_s: Annotated[Number, Field(gt=0)] | None = None  # None = no budget
    hang_timeout_s: Annotated[Number, Field(gt=0)] = 600
    # s to an attempt's first heartbeat (imports, model load, dataset map, rendezvous, checkpoint
    # load: minutes on an 8B); None: hang_timeout_s. A hang before the first step is a hang too.
    startup_timeout_s: Annotated[Number, Field(gt=0)] | None = None
    crash_retries: Annotated[StrictInt, Field(ge=0)] = 2
    resume_oom_retries: Annotated[StrictInt, Field(ge=0)] = 2
    backoff: Backoff = Field(default_factory=Backoff)
    gpu_release_timeout_s: Annotated[Number, Field(ge=0)] = 120
    host_oom_percent: Annotated[Number, Field(gt=0, le=100)] = 90  # % host memory in use
    nan_skip_steps: Annotated[StrictInt, Field(ge=0)] = 0
    # issue 19: rows a recurring NaN may quarantine (never trained, listed in the report) before the run
    # gives up (quarantine_limit); 0: never quarantine, give up instead
    max_quarantined_rows: Annotated[StrictInt, Field(ge=0)] = 64
    # issue 19: a CUDA OOM on one oversized batch trains that step as smaller micro-batches (same rows, same
    # knobs) instead of degrading the run; false: every CUDA OOM goes to the cuda_oom ladder (as before)
    split_culprits: StrictBool = True
    # at most this many optimizer steps split at the same knobs: past it the batches, not a rare one, are too big
    # and the cuda_oom ladder applies
    max_split_steps: Annotated[StrictInt, Field(ge=1)] = 8
    # s the rest of an attempt may run after one rank wrote its error record, before the supervisor
    # stops it: a rank blocked in a collective for a dead peer otherwise waits out NCCL's timeout
    failed_rank_linger_s: Annotated[Number, Field(gt=0)] = 15
    # issue 18 item 5: back to the batch before a halve_batch rung when memory stays low (max_times 0: off)
    grow_back: GrowBack = Field(default_factory=GrowBack)


class FlagNames(_Strict):
    """Extra spellings of one knob on the child's command line, beyond the registry's
    (``oomguard/knobs.py``): ``names`` are found and edited in place where the command has
    them. oomguard never appends a flag (Trust rule 1), so there is no ``append``."""

    names: list[str] = Field(default_factory=list)


class Policy(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    description: str = ""
    match: Match | None = Field(default=None, description="null: never auto-selected, only by name")
    capabilities: Capabilities = Field(default_factory=Capabilities)
    knobs: Knobs
    ladders: Ladders
    lr_rule: LrRule = LrRule.KEEP
    limits: Limits = Field(default_factory=Limits)
    flags: dict[str, FlagNames] = Field(default_factory=dict, description=(
        "knob -> {names: [extra CLI spellings]}; the registry knows the HF/TRL/common ones"))
    _source: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        """The file this policy was loaded from ("" when built in memory)."""
        return self._source

    def start_knobs(self) -> dict[str, Any]:
        """The starting recipe as a plain dict (core knobs first, then declared ones)."""
        return self.knobs.model_dump()


FlagSpec = FlagNames  # the former name (a knob's registry entry is ``knobs.KnobSpec``)

CORE_KNOB_ORDER = (KNOB_MAX_SEQ_LENGTH, KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_LORA_R,
                   KNOB_LORA_ALPHA, KNOB_PRECISION)
