"""JSON Schema (draft 2020-12) of ``oomguard report DIR --json`` (``"schema": "oomguard.report/1"``).

``oomguard report --json-schema`` prints it. Optional fields may be added within version 1; a field
renamed, removed or given another meaning makes ``oomguard.report/2``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REPORT_JSON_SCHEMA"]

_NULL = {"type": "null"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _NULL]}


def _obj(properties: dict[str, Any], description: str = "", extra: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties, "required": list(properties)}
    if description:
        out["description"] = description
    if not extra:
        out["additionalProperties"] = False
    return out


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_STEP = _nullable({"type": "integer", "minimum": 0})
_TIME = _nullable({"type": "number", "description": "Unix time, seconds"})

REPORT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "oomguard report",
    "description": ("`oomguard report DIR --json`: a run's outcome, every attempt, every knob change and its "
                    "verification, and what each recovery cost. Built from the run dir's run.json and events.jsonl. "
                    "Optional fields may be added within a version; any other change bumps `schema`."),
    "type": "object",
    "$defs": {
        "knobValue": {"type": ["integer", "number", "string", "boolean", "null"]},
        "knobs": {"type": "object", "additionalProperties": {"$ref": "#/$defs/knobValue"},
                  "description": "knob name -> value (max_seq_length, per_device_train_batch_size, lora_r, ...)"},
        "failure": _nullable(_obj({
            "kind": {"type": "string",
                     "description": "cuda_oom, resume_oom, eval_oom, nan_loss, host_oom, hang, crash"},
            "step": {**_STEP, "description": "the last completed optimizer step (null: none completed or unknown)"},
            "phase": {"type": "string", "description": "where in the step it failed; `unknown` when not known"},
            "detail": _STR,
            "rank": {"type": "integer", "minimum": 0, "description": "the failing process (0 for one process)"},
        })),
        "rung": _nullable(_obj({"ladder": _STR, "index": {"type": "integer", "minimum": 0}},
                               "the policy ladder rung taken")),
        "verification": {"enum": ["verified", "not_applied", "unverified"],
                         "description": ("verified: the child showed the new value; not_applied: it showed another; "
                                         "unverified: the child never reported the knob")},
    },
    "properties": {
        "schema": {"const": "oomguard.report/1"},
        "status": {"enum": ["running", "succeeded", "gave_up", "failed", "interrupted"],
                   "description": "running also stands for a run whose supervisor died"},
        "exit_code": _nullable(_INT),
        "give_up": _nullable({**_STR,
                              "description": "why the supervisor gave up (ladder_exhausted, no_progress, ...)"}),
        "root_cause": _nullable(_obj({
            "text": {**_STR, "description": "one line, as the text summary prints it"},
            "full_text": _STR,
            "give_up": _nullable(_STR),
            "attempt": {**_nullable(_INT), "description": "the first attempt that failed"},
            "failure": {"$ref": "#/$defs/failure"},
        }, "null for a run that succeeded with no failure")),
        "policy": _nullable(_STR),
        "started": _TIME,
        "ended": _TIME,
        "wall_s": {"type": "number", "minimum": 0},
        "final_step": {**_STEP, "description": "the highest optimizer step any attempt completed"},
        "world_size": {"type": "integer", "minimum": 1},
        "requested_source": {"enum": ["observed", "command"],
                             "description": "observed: as the child ran it; command: from the command's flags only"},
        "attempts": {"type": "array", "items": _obj({
            "n": {"type": "integer", "minimum": 1},
            "started": _TIME,
            "ended": _TIME,
            "exit_code": _nullable(_INT),
            "max_step": _STEP,
            "failure": {"$ref": "#/$defs/failure"},
            "interrupted": _nullable(_STR),
            "rung": {"$ref": "#/$defs/rung"},
            "resumed_from": _nullable({**_STR, "description": "the checkpoint this attempt resumed from"}),
            "knobs": {"$ref": "#/$defs/knobs"},
            "orders": {"allOf": [{"$ref": "#/$defs/knobs"}],
                       "description": "what oomguard set in the child (flags or in-process); empty on attempt 1"},
            "verified": {"type": "object", "additionalProperties": {"$ref": "#/$defs/verification"}},
        })},
        "knobs": {"type": "array", "description": "every knob requested -> final", "items": _obj({
            "knob": _STR,
            "requested": {"$ref": "#/$defs/knobValue"},
            "final": {"$ref": "#/$defs/knobValue"},
            "changed": {"type": "boolean"},
            "verification": {"anyOf": [{"$ref": "#/$defs/verification"}, _NULL],
                             "description": "null: unchanged, nothing to verify"},
        })},
        "not_applied": {"type": "array", "items": _obj({
            "knob": _STR, "expected": {"$ref": "#/$defs/knobValue"}, "attempt": _nullable(_INT), "why": _STR})},
        "recoveries": {"type": "array", "items": _obj({
            "attempt": {"type": "integer", "minimum": 1, "description": "the attempt that failed"},
            "kind": _STR,
            "step": _STEP,
            "phase": _STR,
            "reason": _STR,
            "rung": {"$ref": "#/$defs/rung"},
            "resumed_from": _nullable(_STR),
            "changes": {"type": "array", "items": _obj({
                "knob": _STR, "old": {"$ref": "#/$defs/knobValue"}, "new": {"$ref": "#/$defs/knobValue"}})},
            "truncation_share": _nullable({"type": "number", "minimum": 0, "maximum": 1,
                                           "description": "share of training tokens beyond the new max_seq_length"}),
            "cost": _obj({
                "steps_redone": _nullable({"type": "integer", "description": "completed steps trained again"}),
                "seconds_to_next_step": _nullable({"type": "number", "minimum": 0,
                                                   "description": "failure -> the next completed optimizer step"}),
            }),
        })},
        "tokens_cut": _obj({
            "share": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "max_seq_length": _obj({"requested": {"$ref": "#/$defs/knobValue"},
                                    "final": {"$ref": "#/$defs/knobValue"}}),
        }, "training tokens beyond the final max_seq_length (share as the last length rung measured it)"),
        "effective_batch": _obj({
            "requested": _nullable(_INT),
            "final": _nullable(_INT),
            "kept": _nullable({"type": "boolean"}),
            "world_size": {"type": "integer", "minimum": 1},
        }, "per-device batch x accumulation x world size"),
        "skipped_checkpoints": {"type": "array", "items": _STR},
        "problems": {"type": "array", "items": _STR,
                     "description": "what is wrong with the run's files (skipped journal lines, ...)"},
        "guard_notes": {"type": "array", "items": _STR,
                        "description": "the child's stack outside oomguard's tested range, guard parts that "
                                       "degraded on it (docs/COMPATIBILITY.md), a note on the learning rate"},
        "culprits": _obj({
            "split": {"type": "array", "items": _obj({"step": _INT, "factor": _INT}),
                      "description": "optimizer steps trained as smaller micro-batches (same rows, same gradient)"},
            "quarantined_rows": {"type": "array", "items": _INT,
                                 "description": "train-set rows never trained (a recurring NaN), skipped"},
        }, "issue 19: culprit batches split or quarantined instead of degrading the whole run"),
    },
}
REPORT_JSON_SCHEMA["required"] = list(REPORT_JSON_SCHEMA["properties"])
