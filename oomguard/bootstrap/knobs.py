"""Knobs onto a TrainingArguments-like object, across the field names in use. Pure but for ``apply``.

``max_seq_length`` is ``max_length`` in TRL >= 0.20 (``SFTConfig``) and ``max_seq_length``
before; ``precision`` is the pair ``bf16``/``fp16``. Any other knob the policy declares is
applied where the arguments object has a field of that name (``learning_rate``...).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

from oomguard import knobs as registry
from oomguard import protocol

__all__ = ["apply", "BY_COMMAND", "field_names", "force_off_auto_find_batch_size", "FieldEdit", "KnobSkipped",
           "LORA_KNOBS", "plan", "via", "Via"]

# Knobs that live in the PEFT config, not the arguments (bootstrap/lora.py).
LORA_KNOBS = (protocol.KNOB_LORA_R, protocol.KNOB_LORA_ALPHA)
# Knobs the supervisor puts in the child's environment before torch starts: nothing to set here.
ENV_ONLY = registry.ENV_KNOBS
# How the supervisor's command editor says an order reached the command line.
BY_COMMAND = (registry.Delivery.FLAG.value, registry.Delivery.PLACEHOLDER.value)


class Via(str, enum.Enum):
    """Which path delivered a knob to the child."""

    FLAG = "flag"  # the supervisor rewrote the command; the value was already right in-process
    IN_PROCESS = "in_process"  # the bootstrap set it on the object the child built
    UNCHANGED = "unchanged"  # the child's own value already equalled the knob


@dataclasses.dataclass(frozen=True)
class FieldEdit:
    """One order set on one field of the child's arguments object (the policy's knob change is
    ``protocol.run_record.KnobChange``)."""

    knob: str
    field: str
    old: Any
    new: Any
    via: Via

    def to_dict(self) -> dict[str, Any]:
        return {"knob": self.knob, "field": self.field, "old": self.old, "new": self.new, "via": self.via.value}


@dataclasses.dataclass(frozen=True)
class KnobSkipped:
    knob: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"knob": self.knob, "why": self.why}


def field_names(args: Any) -> set[str]:
    if dataclasses.is_dataclass(args):
        return {f.name for f in dataclasses.fields(args)}
    return set(vars(args))


def via(knob: str, old: Any, new: Any, delivered: Mapping[str, str]) -> Via:
    if old != new:
        return Via.IN_PROCESS
    return Via.FLAG if delivered.get(knob) in BY_COMMAND else Via.UNCHANGED


def plan(args: Any, orders: Mapping[str, Any], delivered: Mapping[str, str] | None = None, *,
         cuda: bool = True) -> tuple[list[FieldEdit], list[KnobSkipped]]:
    """What applying oomguard's ``orders`` to ``args`` would change, and what cannot be applied (why).
    Only orders are applied: on attempt 1 of a wrapped command there are none (Trust rule 1)."""
    delivered = delivered or {}
    names = field_names(args)
    changes: list[FieldEdit] = []
    skipped: list[KnobSkipped] = []
    for knob, value in orders.items():
        if knob in LORA_KNOBS or knob in ENV_ONLY:
            continue
        if knob == protocol.KNOB_PRECISION:
            found, why = _precision(args, names, str(value), delivered, cuda)
        elif knob == registry.ACTIVATION_OFFLOAD:
            found, why = _offload(args, names, bool(value), delivered)
        else:
            found, why = _plain(args, names, knob, value, delivered)
        changes += found
        if why:
            skipped.append(KnobSkipped(knob, why))
    return changes, skipped


def _plain(args: Any, names: set[str], knob: str, value: Any, delivered) -> tuple[list[FieldEdit], str]:
    candidates = registry.spec(knob).fields
    fields = [f for f in candidates if f in names]
    if not fields:
        return [], (f"{type(args).__name__} has no field {' or '.join(candidates)}; "
                    "the knob reaches the child only as a flag it already has")
    out = []
    for name in fields:
        old = getattr(args, name)
        new = _as_type_of(old, value)
        out.append(FieldEdit(knob, name, old, new, via(knob, old, new, delivered)))
    return out, ""


def _as_type_of(old: Any, value: Any) -> Any:
    """``value`` in the type of the field's ``old`` value: an int field stays int, a str enum (transformers'
    ``OptimizerNames``) stays that enum where ``value`` is one of its members."""
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        return type(old)(value)
    if isinstance(old, enum.Enum) and isinstance(value, str):
        try:
            return type(old)(value)
        except ValueError:
            return value
    return value


def _offload(args: Any, names: set[str], on: bool, delivered) -> tuple[list[FieldEdit], str]:
    """``offload`` into the checkpointing kwargs, where this transformers reads it (>= 5.24): an older one
    passes unknown keys on to ``torch.utils.checkpoint`` and fails."""
    kwarg_fields = [f for f in registry.spec(registry.ACTIVATION_OFFLOAD).fields if f in names]
    if not kwarg_fields:
        return [], f"{type(args).__name__} has no activation/gradient checkpointing kwargs"
    if on and not offload_supported():
        return [], ("this transformers' Trainer does not read offload from the checkpointing kwargs (checked: "
                    "5.24 does; 5.17's gradient_checkpointing_enable takes offload= but its Trainer was not "
                    "checked to pass it); the saved activations stay on the GPU")
    out = []
    for name in kwarg_fields:
        old = getattr(args, name)
        new = {**(old if isinstance(old, dict) else {}), "offload": on}
        out.append(FieldEdit(registry.ACTIVATION_OFFLOAD, name, old, new,
                             via(registry.ACTIVATION_OFFLOAD, old, new, delivered)))
    return out, ""


def offload_supported() -> bool:
    """transformers' ``activation_checkpointing_enable`` takes ``offload`` (5.24+)."""
    import inspect

    from transformers import PreTrainedModel

    enable = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    return enable is not None and "offload" in inspect.signature(enable).parameters


def _precision(args: Any, names: set[str], value: str, delivered, cuda: bool) -> tuple[list[FieldEdit], str]:
    if value not in protocol.PRECISIONS:
        return [], f"precision {value!r} is not one of {', '.join(protocol.PRECISIONS)}"
    if not {"bf16", "fp16"} <= names:
        return [], f"{type(args).__name__} has no bf16/fp16 fields"
    if value == "fp16" and not cuda:
        return [], "fp16 mixed precision needs a CUDA GPU and none is visible; the child's precision is kept"
    want = {"bf16": value == "bf16", "fp16": value == "fp16"}
    old = {"bf16": bool(getattr(args, "bf16")), "fp16": bool(getattr(args, "fp16"))}
    how = via(protocol.KNOB_PRECISION, old, want, delivered)
    return [FieldEdit(protocol.KNOB_PRECISION, f, old[f], want[f], how) for f in ("bf16", "fp16")], ""


def apply(args: Any, changes: list[FieldEdit]) -> None:
    """Set each planned field; keep ``mixed_precision`` (derived in __post_init__) in step."""
    for change in changes:
        setattr(args, change.field, change.new)
    if any(c.knob == protocol.KNOB_PRECISION for c in changes) and hasattr(args, "mixed_precision"):
        args.mixed_precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "no"


def force_off_auto_find_batch_size(args: Any) -> bool:
    """Turn ``auto_find_batch_size`` off; True when the child had it on (two adapters fight, DESIGN §5)."""
    if not getattr(args, "auto_find_batch_size", False):
        return False
    args.auto_find_batch_size = False
    return True
