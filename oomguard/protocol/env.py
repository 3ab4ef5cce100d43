"""The environment the supervisor gives the child (contract, DESIGN §3). Stdlib only."""

from __future__ import annotations

import enum
import json
from typing import Any

__all__ = ["ENV_RUN_DIR", "ENV_ATTEMPT", "ENV_ERROR_FILE", "ENV_KNOBS", "ENV_RESUME_FROM", "ENV_VRAM_LIMIT",
           "ENV_INJECT", "ENV_CHECKPOINT_DIR", "ENV_SUPERVISOR_PID", "ENV_BOOTSTRAP", "ENV_BOOTSTRAP_SKIP",
           "ENV_DELIVERED", "ENV_OBSERVE", "ENV_RESUME_MODE", "ENV_NAN_SKIP_STEPS", "ENV_REWARM_STEPS",
           "ENV_STRICT_EVENTS", "ENV_CULPRIT", "ENV_FAKE_MEMORY", "GROW_REQUEST_JSON", "ResumeMode",
           "parse_orders"]

ENV_RUN_DIR = "OOMGUARD_RUN_DIR"
ENV_ATTEMPT = "OOMGUARD_ATTEMPT"
ENV_ERROR_FILE = "OOMGUARD_ERROR_FILE"
ENV_KNOBS = "OOMGUARD_KNOBS"  # JSON object of knob -> value oomguard asks the child to set ({} on attempt 1)
ENV_RESUME_FROM = "OOMGUARD_RESUME_FROM"  # checkpoint dir, or "" for a fresh start
ENV_VRAM_LIMIT = "OOMGUARD_VRAM_LIMIT"  # e.g. "24GiB"; "" for none
ENV_INJECT = "OOMGUARD_INJECT"  # e.g. "cuda_oom@step=5;nan@step=9"
# additions beyond DESIGN §3 (additive, documented in the README)
ENV_CHECKPOINT_DIR = "OOMGUARD_CHECKPOINT_DIR"  # where the child writes checkpoint-N/
ENV_SUPERVISOR_PID = "OOMGUARD_SUPERVISOR_PID"  # the child stops if this process dies

# The in-child bootstrap (oomguard/bootstrap/) that guards an unchanged Trainer command (issue 4).
ENV_BOOTSTRAP = "OOMGUARD_BOOTSTRAP"  # "0"/"off"/"false": no PYTHONPATH injection, nothing patched
ENV_BOOTSTRAP_SKIP = "OOMGUARD_BOOTSTRAP_SKIP"  # comma list of parts to leave alone, e.g. "knobs,resume"
ENV_DELIVERED = "OOMGUARD_DELIVERED"  # JSON knob -> "flag" | "placeholder" | "in_process" (how each order travels)
ENV_OBSERVE = "OOMGUARD_OBSERVE"  # comma list of policy-declared knob names the child reports too

ENV_RESUME_MODE = "OOMGUARD_RESUME_MODE"  # a ResumeMode value, decided by policy.decide(); "" = normal
ENV_NAN_SKIP_STEPS = "OOMGUARD_NAN_SKIP_STEPS"  # the policy's limits.nan_skip_steps: non-finite updates skipped
ENV_REWARM_STEPS = "OOMGUARD_REWARM_STEPS"  # this attempt re-enters warm-up over N optimizer steps (NaN rollback)
# issue 19: JSON {"split": {"<optimizer step>": factor}, "quarantine": [row, ...]} (run_record.CulpritOrder):
# the culprit steps the child trains as smaller micro-batches and the rows it never trains; "" = none
ENV_CULPRIT = "OOMGUARD_CULPRIT"
# issue 18 item 5 (grow back): the supervisor writes <run_dir>/grow_request.json ({"attempt": n, "step": s,
# "reason": ...}); that attempt's guard saves a checkpoint at its next step end, stops, journals
# ``grow_stopped`` and exits 0; the next attempt resumes from that checkpoint with the batch before the rung
GROW_REQUEST_JSON = "grow_request.json"
# tests only, where no CUDA memory figures exist (CPU): "per_token=BYTES[,base=BYTES]" makes the fault layer
# (guard/callbacks/faults.py) journal a fabricated step peak, base + per_token x the step's largest training
# micro-batch's tokens, as a ``memory`` event each step; armed like OOMGUARD_INJECT (only under a live supervisor)
ENV_FAKE_MEMORY = "OOMGUARD_FAKE_MEMORY"
# "1": emit_event raises ValueError on an event the catalogue (protocol.events) does not allow (tests)
ENV_STRICT_EVENTS = "OOMGUARD_STRICT_EVENTS"


class ResumeMode(str, enum.Enum):
    """How the child loads the checkpoint it resumes from (the supervisor's decision)."""

    NORMAL = "normal"
    OPTIMIZER_ON_CPU = "optimizer_on_cpu"  # after a resume_oom: map the optimizer state to CPU first


def parse_orders(raw: str | None) -> dict[str, Any]:
    """``OOMGUARD_KNOBS`` -> the orders (``{}`` when unset or empty). The one parser of it, both sides.

    Raises ValueError naming the variable, the value and the fix."""
    if not (raw or "").strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_KNOBS}={raw[:200]!r} is not JSON ({exc}); pass a JSON object such as "
                         "'{\"per_device_train_batch_size\": 2}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{ENV_KNOBS}={raw[:200]!r} is not a JSON object of knob -> value "
                         f"(got {type(value).__name__})")
    return value
