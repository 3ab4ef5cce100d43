"""The pure policy core: schema, GPU-class matching, ladders and ``decide()``.

Imports only ``oomguard.protocol``, ``oomguard.errors``, ``oomguard.knobs``, pydantic, yaml and the
standard library: no torch, no clock, no subprocess. The only I/O is loading files.
"""

from oomguard.policy.decision import HANDLERS, decide, rung_uses
from oomguard.policy.device import (
    BF16_MIN_CAPABILITY,
    DEFAULT_POLICY,
    GpuInfo,
    bf16_capable,
    bf16_supported,
    device_capabilities,
    matches,
    select_policy,
)
from oomguard.policy.ladder import (
    LADDER_FALLBACK,
    OOM_KINDS,
    apply_rung,
    effective_batch,
    ladder_chain,
    largest_proper_divisor,
    rung_budget,
    truncation_share,
)
from oomguard.policy.loader import (
    load_all_shipped,
    load_policy,
    load_policy_arg,
    parse_policy,
    policy_json_schema,
    shipped_policy_paths,
)
from oomguard.policy.records import (
    AttemptView,
    CheckpointInfo,
    DataProfile,
    Decision,
    DecisionAction,
    DeviceCapabilities,
    Evidence,
    Failure,
    GiveUpReason,
    KnobChange,
    ResumeClass,
    ResumeMode,
    RungRef,
    SetAside,
    SetAsideReason,
)
from oomguard.policy.schema import (
    FlagNames,
    FlagSpec,
    Knobs,
    Ladder,
    Ladders,
    Limits,
    LrRule,
    Match,
    Policy,
    Rung,
    RungOp,
)

__all__ = [
    "AttemptView", "BF16_MIN_CAPABILITY", "CheckpointInfo", "DEFAULT_POLICY", "DataProfile", "Decision",
    "DecisionAction", "DeviceCapabilities", "Evidence", "Failure", "FlagNames", "FlagSpec", "GiveUpReason",
    "GpuInfo", "HANDLERS", "KnobChange", "Knobs", "LADDER_FALLBACK", "Ladder", "Ladders", "Limits", "LrRule",
    "Match", "OOM_KINDS", "Policy", "ResumeClass", "ResumeMode", "Rung", "RungOp", "RungRef", "SetAside",
    "SetAsideReason", "apply_rung", "bf16_capable", "bf16_supported", "decide", "device_capabilities",
    "effective_batch", "ladder_chain", "largest_proper_divisor", "load_all_shipped", "load_policy",
    "load_policy_arg", "matches", "parse_policy", "policy_json_schema", "rung_budget", "rung_uses",
    "select_policy", "shipped_policy_paths", "truncation_share",
]
