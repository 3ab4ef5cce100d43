"""Knobs onto a TrainingArguments-like object, across the field names in use. Pure but for ``apply``.

``max_seq_length`` is ``max_length`` in TRL >= 0.20 (``SFTConfig``) and ``max_seq_length``
before; ``precision`` is the pair ``bf16``/``fp16``. Any other knob the policy declares is
applied where the arguments object has a field of that name (``learning_rate``...).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

from oomguard import protocol

# Knob -> the argument fields that carry it, newest spelling first.
FIELDS: dict[str, tuple[str, ...]] = {
    protocol.KNOB_MAX_SEQ_LENGTH: ("max_length", "max_seq_length"),
    protocol.KNOB_BATCH: ("per_device_train_batch_size",),
    protocol.KNOB_GRAD_ACCUM: ("gradient_accumulation_steps",),
}
# Knobs that live in the PEFT config, not the arguments (bootstrap/lora.py).
LORA_KNOBS = (protocol.KNOB_LORA_R, protocol.KNOB_LORA_ALPHA)
# How the supervisor's command builder says a knob reached the command line.
BY_COMMAND = ("flag", "appended", "placeholder")
# A knob no rung has changed yet, not on the command line: the policy's value is only an offer.
# The child keeps a value its script set explicitly (one that differs from the arguments class's
# default) and reports it; the supervisor adopts it as the requested value (the ladder starts there).
OFFER = protocol.DELIVERY_OFFER


class Via(str, enum.Enum):
    """Which path delivered a knob to the child."""

    FLAG = "flag"  # the supervisor rewrote the command; the value was already right in-process
    IN_PROCESS = "in_process"  # the bootstrap set it on the object the child built
    UNCHANGED = "unchanged"  # the child's own value already equalled the knob
    ADOPTED = "adopted"  # an offered knob the script had set itself: its value stays


@dataclasses.dataclass(frozen=True)
class KnobChange:
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


def class_default(obj: Any, name: str) -> Any:
    """The default of field ``name`` in ``obj``'s dataclass (``dataclasses.MISSING`` if none)."""
    if not dataclasses.is_dataclass(obj):
        return dataclasses.MISSING
    for f in dataclasses.fields(obj):
        if f.name == name:
            return f.default
    return dataclasses.MISSING


def script_set(obj: Any, names: tuple[str, ...]) -> bool:
    """True when the script gave any of ``names`` a value other than its class default."""
    return any((d := class_default(obj, n)) is not dataclasses.MISSING and getattr(obj, n, d) != d for n in names)


def plan(args: Any, knobs: Mapping[str, Any], delivered: Mapping[str, str] | None = None, *,
         cuda: bool = True) -> tuple[list[KnobChange], list[KnobSkipped]]:
    """What applying ``knobs`` to ``args`` would change, and what cannot be applied (why)."""
    delivered = delivered or {}
    names = field_names(args)
    changes: list[KnobChange] = []
    skipped: list[KnobSkipped] = []
    for knob, value in knobs.items():
        if knob in LORA_KNOBS:
            continue
        if delivered.get(knob) == OFFER and script_set(args, _fields_of(knob, names)):
            changes += _adopted(args, names, knob)
            continue
        if knob == protocol.KNOB_PRECISION:
            found, why = _precision(args, names, str(value), delivered, cuda)
        else:
            found, why = _plain(args, names, knob, value, delivered)
        changes += found
        if why:
            skipped.append(KnobSkipped(knob, why))
    return changes, skipped


def _fields_of(knob: str, names: set[str]) -> tuple[str, ...]:
    fields = ("bf16", "fp16") if knob == protocol.KNOB_PRECISION else FIELDS.get(knob, (knob,))
    return tuple(f for f in fields if f in names)


def _adopted(args: Any, names: set[str], knob: str) -> list[KnobChange]:
    return [KnobChange(knob, f, getattr(args, f), getattr(args, f), Via.ADOPTED) for f in _fields_of(knob, names)]


def _plain(args: Any, names: set[str], knob: str, value: Any, delivered) -> tuple[list[KnobChange], str]:
    fields = [f for f in FIELDS.get(knob, (knob,)) if f in names]
    if not fields:
        return [], (f"{type(args).__name__} has no field {' or '.join(FIELDS.get(knob, (knob,)))}; "
                    "the knob reaches the child only as a flag or through OOMGUARD_KNOBS")
    out = []
    for name in fields:
        old = getattr(args, name)
        new = type(old)(value) if isinstance(old, (int, float)) and not isinstance(old, bool) else value
        out.append(KnobChange(knob, name, old, new, via(knob, old, new, delivered)))
    return out, ""


def _precision(args: Any, names: set[str], value: str, delivered, cuda: bool) -> tuple[list[KnobChange], str]:
    if value not in protocol.PRECISIONS:
        return [], f"precision {value!r} is not one of {', '.join(protocol.PRECISIONS)}"
    if not {"bf16", "fp16"} <= names:
        return [], f"{type(args).__name__} has no bf16/fp16 fields"
    if value == "fp16" and not cuda:
        return [], "fp16 mixed precision needs a CUDA GPU and none is visible; the child's precision is kept"
    want = {"bf16": value == "bf16", "fp16": value == "fp16"}
    old = {"bf16": bool(getattr(args, "bf16")), "fp16": bool(getattr(args, "fp16"))}
    how = via(protocol.KNOB_PRECISION, old, want, delivered)
    return [KnobChange(protocol.KNOB_PRECISION, f, old[f], want[f], how) for f in ("bf16", "fp16")], ""


def apply(args: Any, changes: list[KnobChange]) -> None:
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
