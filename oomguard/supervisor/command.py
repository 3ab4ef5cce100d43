"""Build the child's command line from the user's command and the current knobs. Pure.

Knobs reach a child four ways (README, "How knobs reach your command"): flags already
present in the command are rewritten in place; a flag the policy marks ``append`` is added
when absent; ``{knob}`` placeholders are filled; and every child also gets
``OOMGUARD_KNOBS`` / ``attempts/NNN/knobs.json``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from ..protocol import KNOB_PRECISION

# Flags HF-style commands use for each knob when the policy does not say otherwise.
DEFAULT_FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "max_seq_length": ("--max_seq_length", "--max_length", "--max-seq-length", "--max-length"),
    "per_device_train_batch_size": ("--per_device_train_batch_size", "--per-device-train-batch-size"),
    "gradient_accumulation_steps": ("--gradient_accumulation_steps", "--gradient-accumulation-steps"),
    "lora_r": ("--lora_r", "--lora-r"),
    "lora_alpha": ("--lora_alpha", "--lora-alpha"),
}
PRECISION_FLAGS = {"bf16": "--bf16", "fp16": "--fp16"}
RESUME_FLAGS = ("--resume_from_checkpoint", "--resume-from-checkpoint")
OUTPUT_DIR_FLAGS = ("--output_dir", "--output-dir")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """How one knob maps to flags: ``names`` (first is used when appending)."""

    names: tuple[str, ...]
    append: bool = False
    style: str = "value"  # "value": --flag V ; "bool": precision-like --bf16/--fp16
    values: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BuiltCommand:
    argv: tuple[str, ...]
    delivered: Mapping[str, str]  # knob -> "flag" | "appended" | "placeholder" | "env"


def flag_specs(policy_flags: Mapping[str, Any] | None, knobs: Sequence[str] = ()) -> dict[str, FlagSpec]:
    """Defaults for the core knobs (and ``--<knob>`` for any other policy knob), overridden by
    the policy's ``flags`` section. A flag the user wrote is read as the request and rewritten."""
    specs = {k: FlagSpec(names=(f"--{k}", f"--{k.replace('_', '-')}")) for k in knobs}
    specs.update({k: FlagSpec(names=v) for k, v in DEFAULT_FLAG_NAMES.items()})
    # bool style: ``values`` are the bare flags (--bf16/--fp16), ``names`` value-style spellings
    # (the built-in recipe's --precision bf16) read and rewritten as well
    specs[KNOB_PRECISION] = FlagSpec(names=("--precision",), style="bool", values=PRECISION_FLAGS)
    for knob, raw in (policy_flags or {}).items():
        get = raw.get if isinstance(raw, Mapping) else lambda k, d=None, r=raw: getattr(r, k, d)
        names = tuple(get("names", ()) or ()) or (specs[knob].names if knob in specs else ())
        values = dict(get("values", {}) or {})
        style = get("style", "value") or "value"
        specs[knob] = FlagSpec(names=names, append=bool(get("append", False)), style=style, values=values)
    return specs


def _split(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, _, value = arg.partition("=")
        return name, value
    return arg, None


def read_flag(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """Value of the last occurrence of any of ``names`` (``--f V`` or ``--f=V``)."""
    found = None
    for i, arg in enumerate(argv):
        name, value = _split(arg)
        if name in names:
            if value is not None:
                found = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                found = argv[i + 1]
            else:
                found = "true"
    return found


def _coerce(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def knobs_in_command(argv: Sequence[str], specs: Mapping[str, FlagSpec]) -> dict[str, Any]:
    """The knob values the user wrote in the command (the request, where present)."""
    found: dict[str, Any] = {}
    for knob, spec in specs.items():
        if spec.style == "bool":
            for value, flag in spec.values.items():
                raw = read_flag(argv, (flag,))
                if raw is not None and raw.lower() not in _FALSE:
                    found[knob] = value
            raw = read_flag(argv, spec.names) if spec.names else None
            if raw is not None:
                found[knob] = raw
        else:
            raw = read_flag(argv, spec.names)
            if raw is not None:
                found[knob] = _coerce(raw)
    return found


def _replace_value(argv: list[str], names: Sequence[str], value: str) -> bool:
    hit = False
    for i, arg in enumerate(argv):
        name, inline = _split(arg)
        if name not in names:
            continue
        hit = True
        if inline is not None:
            argv[i] = f"{name}={value}"
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            argv[i + 1] = value
        else:
            argv.insert(i + 1, value)
    return hit


def _apply_bool(argv: list[str], spec: FlagSpec, chosen: str) -> tuple[list[str], bool]:
    """Drop every precision flag, then put back the chosen one where the user had one."""
    present = [f for f in spec.values.values() if read_flag(argv, (f,)) is not None]
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name, inline = _split(arg)
        if name in spec.values.values():
            nxt = argv[i + 1].lower() if i + 1 < len(argv) else ""
            skip = inline is None and nxt in _TRUE + _FALSE
            continue
        out.append(arg)
    flag = spec.values.get(chosen)
    if flag and (present or (spec.append and read_flag(out, spec.names) is None)):
        out.append(flag)
    return out, bool(present)


def build_command(argv: Sequence[str], knobs: Mapping[str, Any], specs: Mapping[str, FlagSpec],
                  resume_from: str | None = None) -> BuiltCommand:
    """The command for one attempt. Unknown ``{name}`` placeholders are left as written."""
    out = [_PLACEHOLDER.sub(lambda m: str(knobs.get(m.group(1), m.group(0))), a) for a in argv]
    delivered = {k: "placeholder" for a in argv for k in _PLACEHOLDER.findall(a) if k in knobs}
    for knob, value in knobs.items():
        spec = specs.get(knob)
        if spec is None or knob in delivered:
            delivered.setdefault(knob, "env")
            continue
        if spec.style == "bool":
            by_value = bool(spec.names) and _replace_value(out, spec.names, str(value))
            out, present = _apply_bool(out, spec, str(value))
            delivered[knob] = "flag" if present or by_value else ("appended" if spec.append else "env")
        elif _replace_value(out, spec.names, str(value)):
            delivered[knob] = "flag"
        elif spec.append and spec.names:
            out += [spec.names[0], str(value)]
            delivered[knob] = "appended"
        else:
            delivered[knob] = "env"
    if resume_from and _replace_value(out, RESUME_FLAGS, resume_from):
        delivered["resume_from_checkpoint"] = "flag"
    return BuiltCommand(argv=tuple(out), delivered=delivered)


TORCHRUN_NPROC_FLAGS = ("--nproc_per_node", "--nproc-per-node")
TORCHRUN_NNODES_FLAGS = ("--nnodes",)
ACCELERATE_NPROC_FLAGS = ("--num_processes", "--num-processes")


def _count(raw: str | None) -> int | None:
    """``"2"`` -> 2; torchrun's elastic ``"1:4"`` -> 4 (the most it may run); else None."""
    if raw is None:
        return None
    top = raw.rpartition(":")[2]
    return int(top) if top.isdigit() and int(top) > 0 else None


def world_size_of(argv: Sequence[str]) -> int:
    """Processes a launcher starts over all nodes, 1 for a plain command.

    torchrun's ``--nproc_per_node`` is per node (× ``--nnodes``); accelerate's ``--num_processes``
    is already the total over ``--num_machines`` (accelerate divides it per machine). A value
    oomguard cannot count (``--nproc_per_node gpu``/``auto``, a config file) reads as 1.
    """
    torchrun = _count(read_flag(argv, TORCHRUN_NPROC_FLAGS))
    if torchrun is not None:
        return torchrun * (_count(read_flag(argv, TORCHRUN_NNODES_FLAGS)) or 1)
    return _count(read_flag(argv, ACCELERATE_NPROC_FLAGS)) or 1


def output_dir_of(argv: Sequence[str]) -> str | None:
    return read_flag(argv, OUTPUT_DIR_FLAGS)
