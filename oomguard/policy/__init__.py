"""The pure policy core: schema, GPU-class matching, ladders and ``decide()``.

Imports only ``oomguard.protocol``, ``oomguard.errors``, pydantic, yaml and the
standard library: no torch, no clock, no subprocess. The only I/O is loading files.
"""

from oomguard.policy.decision import decide, rung_uses
from oomguard.policy.gpu import DEFAULT_POLICY, GpuInfo, bf16_supported, matches, select_policy
from oomguard.policy.ladder import (apply_rung, effective_batch, ladder_chain,
                                    largest_proper_divisor, rung_budget, truncation_share)
from oomguard.policy.loader import (load_all_shipped, load_policy, load_policy_arg, parse_policy,
                                    policy_json_schema, shipped_policy_paths)
from oomguard.policy.records import (AttemptView, CheckpointInfo, DataProfile, Decision, Failure,
                                     GiveUpReason, KnobChange, ResumeClass, RungRef)
from oomguard.policy.schema import (FlagSpec, Knobs, Ladder, Ladders, Limits, LrRule,
                                    Match, Policy, Rung, RungOp)

__all__ = [
    "AttemptView", "CheckpointInfo", "DEFAULT_POLICY", "DataProfile", "Decision", "Failure",
    "FlagSpec", "GiveUpReason", "GpuInfo", "KnobChange", "Knobs", "Ladder", "Ladders",
    "Limits", "LrRule", "Match", "Policy", "ResumeClass", "Rung", "RungOp", "RungRef",
    "apply_rung", "bf16_supported", "decide", "effective_batch", "ladder_chain",
    "largest_proper_divisor", "load_all_shipped", "load_policy", "load_policy_arg", "matches",
    "parse_policy", "policy_json_schema", "rung_budget", "rung_uses", "select_policy",
    "shipped_policy_paths", "truncation_share",
]
