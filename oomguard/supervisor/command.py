"""Edit the child's command line for one attempt, in a way that cannot break it. Pure, stdlib only.

Stdlib only because the supervisor imports this and never imports torch or the trainer's
libraries: it cannot ask the child's parser what it accepts, so it only does edits that every
parser accepts when it accepted the user's command.

Trust rule: attempt 1 is the user's command byte for byte (empty ``orders`` returns ``argv``
unchanged). Later attempts only EDIT the value of a flag the command already has, in the
user's own style (``--x v`` stays two tokens, ``--x=v`` stays one, ``--bf16 True`` stays
capitalised); no argument is ever added, dropped or moved. ``{knob}`` placeholders are filled.
Whatever cannot be edited that way (the flag is absent, bare ``--bf16`` that must become
false, ``--no_bf16``) is reported ``in_process``: the in-child bootstrap sets it on the parsed
arguments object. Knob names and CLI spellings come from :mod:`oomguard.knobs` only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

from ..knobs import (
    OUTPUT_DIR_FLAGS,
    PRECISION,
    PRECISION_BOOL_FIELDS,
    PRECISIONS,
    REGISTRY,
    RESUME_FLAGS,
    Delivery,
    coerce,
    flag_spellings,
    spec,
)

__all__ = ["BuiltCommand", "build_command", "flags_in_command", "knobs_in_command", "node_count_of", "node_rank_of",
           "output_dir_of", "read_flag", "world_size_of", "RESUME_FLAGS", "OUTPUT_DIR_FLAGS"]

RESUME_KNOB = "resume_from_checkpoint"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A token after a flag that starts with "-" is only its value when it is a negative number.
_NEGATIVE_NUMBER = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|-(?:inf|nan)", re.IGNORECASE)
# Bool spellings parsers accept (HF string_to_bool, click BOOL), as (true, false) pairs.
_BOOL_PAIRS = (("true", "false"), ("t", "f"), ("yes", "no"), ("y", "n"), ("on", "off"), ("1", "0"))
_TRUTH = {word: on for pair in _BOOL_PAIRS for word, on in zip(pair, (True, False))}


@dataclasses.dataclass(frozen=True)
class BuiltCommand:
    argv: tuple[str, ...]
    delivered: Mapping[str, str]  # knob -> a knobs.Delivery value: "flag" | "placeholder" | "in_process"


@dataclasses.dataclass(frozen=True)
class _Hit:
    """One occurrence of a flag at ``argv[index]``; ``value`` None when it has none (bare)."""

    index: int
    name: str
    value: str | None
    inline: bool  # ``--name=value`` (one token) rather than ``--name value``


def _split(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, _, value = arg.partition("=")
        return name, value
    return arg, None


def _is_value(token: str) -> bool:
    return not token.startswith("-") or bool(_NEGATIVE_NUMBER.fullmatch(token))


def _hits(argv: Sequence[str], names: Sequence[str]) -> list[_Hit]:
    """Every occurrence of any of ``names``, in order."""
    found = []
    for i, arg in enumerate(argv):
        name, inline = _split(arg)
        if name not in names:
            continue
        if inline is not None:
            found.append(_Hit(i, name, inline, True))
        elif i + 1 < len(argv) and _is_value(argv[i + 1]):
            found.append(_Hit(i, name, argv[i + 1], False))
        else:
            found.append(_Hit(i, name, None, False))
    return found


def _write(out: list[str], hit: _Hit, text: str) -> None:
    if hit.inline:
        out[hit.index] = f"{hit.name}={text}"
    else:
        out[hit.index + 1] = text


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


# ---- knob spellings ------------------------------------------------------------------------------

def _knob_names(knobs: Iterable[str], extra_flags: Mapping[str, Sequence[str]] | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*REGISTRY, *knobs, *(extra_flags or {}))))


def _names(knob: str, extra_flags: Mapping[str, Sequence[str]] | None) -> tuple[str, ...]:
    """Every CLI spelling of a value knob (policy extras first, ``_``/``-`` variants)."""
    return flag_spellings(spec(knob, tuple((extra_flags or {}).get(knob, ()))).flags)


def _precision_hits(argv: Sequence[str], extra_flags: Mapping[str, Sequence[str]] | None) -> list[_Hit]:
    """Value-style precision flags (``--precision bf16``) oomguard can rewrite: known values only."""
    return [h for h in _hits(argv, _names(PRECISION, extra_flags)) if h.value in PRECISIONS]


def _bool_state(argv: Sequence[str], field: str) -> tuple[bool | None, list[_Hit]]:
    """What the argv says bool ``field`` is (last occurrence wins; None: it does not say) and
    the occurrences written with a value (``--bf16 True``, ``--bf16=false``): the editable ones."""
    negations = flag_spellings((f"--no_{field}",))
    state: bool | None = None
    editable = []
    for hit in _hits(argv, (*flag_spellings((f"--{field}",)), *negations)):
        word = (hit.value or "").lower()
        if hit.name in negations:
            state = False
        elif word in _TRUTH:
            state = _TRUTH[word]
            editable.append(hit)
        else:  # bare, or followed by a positional; ``--bf16=maybe`` says nothing
            state = None if hit.inline else True
    return state, editable


# ---- reading -------------------------------------------------------------------------------------

def _last_value(argv: Sequence[str], names: Sequence[str]) -> str | None:
    values = [h.value for h in _hits(argv, names) if h.value is not None]
    return values[-1] if values and not _PLACEHOLDER.search(values[-1]) else None


def _precision_in(argv: Sequence[str], extra_flags: Mapping[str, Sequence[str]] | None) -> str | None:
    by_value = _precision_hits(argv, extra_flags)
    if by_value:
        return by_value[-1].value
    states = {PRECISION_BOOL_FIELDS[f]: _bool_state(argv, f)[0] for f in PRECISION_BOOL_FIELDS}
    on = [p for p, s in states.items() if s]
    if on:
        return on[0]  # bf16 first, as knobs.precision_of
    return "fp32" if all(s is False for s in states.values()) else None


def knobs_in_command(argv: Sequence[str], knobs: Iterable[str] = (),
                     extra_flags: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The knob values the user's argv states (registry knobs plus ``knobs``), coerced."""
    found: dict[str, Any] = {}
    for knob in _knob_names(knobs, extra_flags):
        raw = _precision_in(argv, extra_flags) if knob == PRECISION else _last_value(argv, _names(knob, extra_flags))
        if raw is not None:
            found[knob] = coerce(knob, raw)
    return found


def flags_in_command(argv: Sequence[str], knobs: Iterable[str] = (),
                     extra_flags: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """knob -> the spelling ``build_command`` would edit. Listed only when an order for the knob
    would be delivered as ``flag`` (for precision: every one of bf16/fp16/fp32 would)."""
    found: dict[str, str] = {}
    for knob in _knob_names(knobs, extra_flags):
        if knob == PRECISION:
            name = _precision_flag(argv, extra_flags)
        else:
            hits = _hits(argv, _names(knob, extra_flags))
            name = hits[-1].name if hits and all(h.value is not None for h in hits) else None
        if name:
            found[knob] = name
    return found


def _precision_flag(argv: Sequence[str], extra_flags: Mapping[str, Sequence[str]] | None) -> str | None:
    for want in PRECISIONS:
        if not _edit_precision(list(argv), want, extra_flags):
            return None
    by_value = _precision_hits(argv, extra_flags)
    bools = sorted((h for f in PRECISION_BOOL_FIELDS for h in _bool_state(argv, f)[1]), key=lambda h: h.index)
    return (by_value or bools)[0].name


# ---- editing -------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    """A value as a command-line token every int/float parser reads back: ``4.0`` -> ``4``."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def _bool_text(old: str, on: bool) -> str:
    """``on`` written in the style of ``old`` (True/False, true/false, TRUE, 1/0, yes/no...)."""
    low = old.lower()
    if _TRUTH[low] is on:
        return old
    new = next(p for p in _BOOL_PAIRS if low in p)[0 if on else 1]
    return new if old == low else new.upper() if old == old.upper() else new.capitalize()


def _edit_value(out: list[str], hits: Sequence[_Hit], text: str) -> bool:
    """Rewrite every occurrence that has a value; True when all of them had one (and any exist)."""
    for hit in hits:
        if hit.value is not None:
            _write(out, hit, text)
    return bool(hits) and all(h.value is not None for h in hits)


def _edit_bool(out: list[str], hits: Sequence[_Hit], on: bool) -> bool:
    """Rewrite every valued occurrence of a bool flag in its own spelling; True when all had a bool value
    (a bare ``--flag`` already means true: it is never turned into another form)."""
    valued = [h for h in hits if h.value is not None and h.value.lower() in _TRUTH]
    for hit in valued:
        _write(out, hit, _bool_text(hit.value or "", on))
    return bool(hits) and len(valued) == len(hits)


def _set_bools(out: list[str], wanted: Mapping[str, bool]) -> None:
    """Rewrite the value-style bool flags toward ``wanted``: offs first, and a field is only
    turned on while no other one stays on (``--fp16 --bf16 true`` is rejected by HF/TRL)."""
    for on in (False, True):
        for field in (f for f, w in wanted.items() if w is on):
            if on and any(_bool_state(out, other)[0] for other in wanted if other != field):
                continue
            for hit in _bool_state(out, field)[1]:
                _write(out, hit, _bool_text(hit.value or "", on))


def _edit_precision(out: list[str], want: str, extra_flags: Mapping[str, Sequence[str]] | None) -> bool:
    """Edit the precision flags ``out`` has toward ``want``; True when ``out`` alone then states it:
    an edited ``--precision`` with no bool flag contradicting it, or both bool fields explicit."""
    if want not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {want!r}")
    by_value = _edit_value(out, _precision_hits(out, extra_flags), want)
    wanted = {field: on == want for field, on in PRECISION_BOOL_FIELDS.items()}
    _set_bools(out, wanted)
    states = {field: _bool_state(out, field)[0] for field in wanted}
    if by_value:
        return all(states[f] in (None, on) for f, on in wanted.items())
    return all(states[f] is on for f, on in wanted.items())


def _fill(argv: Sequence[str], orders: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """``{knob}`` placeholders filled from ``orders``; unknown ``{name}`` are left as written."""
    out = [_PLACEHOLDER.sub(lambda m: str(orders.get(m.group(1), m.group(0))), a) for a in argv]
    delivered = {k: Delivery.PLACEHOLDER.value for a in argv for k in _PLACEHOLDER.findall(a) if k in orders}
    return out, delivered


def placeholders_in(argv: Iterable[str]) -> set[str]:
    """The ``{knob}`` placeholders of a command."""
    return {name for arg in argv for name in _PLACEHOLDER.findall(arg)}


def build_command(argv: Sequence[str], orders: Mapping[str, Any],
                  extra_flags: Mapping[str, Sequence[str]] | None = None,
                  resume_from: str | None = None) -> BuiltCommand:
    """The command for one attempt: ``argv`` with the ordered knobs' existing flag values edited."""
    if not orders and not resume_from:
        return BuiltCommand(argv=tuple(argv), delivered={})
    out, delivered = _fill(argv, orders)
    for knob, value in orders.items():
        if knob == PRECISION:
            edited = _edit_precision(out, str(value), extra_flags)
        elif isinstance(value, bool):  # --gradient_checkpointing false -> true, in the command's spelling
            edited = _edit_bool(out, _hits(out, _names(knob, extra_flags)), value)
        else:
            edited = _edit_value(out, _hits(out, _names(knob, extra_flags)), _text(value))
        delivered.setdefault(knob, (Delivery.FLAG if edited else Delivery.IN_PROCESS).value)
    if resume_from:
        edited = _edit_value(out, _hits(out, RESUME_FLAGS), resume_from)
        delivered[RESUME_KNOB] = (Delivery.FLAG if edited else Delivery.IN_PROCESS).value
    return BuiltCommand(argv=tuple(out), delivered=delivered)


# ---- launcher facts ------------------------------------------------------------------------------

TORCHRUN_NPROC_FLAGS = ("--nproc_per_node", "--nproc-per-node")
TORCHRUN_NNODES_FLAGS = ("--nnodes",)
ACCELERATE_NPROC_FLAGS = ("--num_processes", "--num-processes")
TORCHRUN_NODE_RANK_FLAGS = ("--node_rank", "--node-rank")
ACCELERATE_NNODES_FLAGS = ("--num_machines", "--num-machines")
ACCELERATE_NODE_RANK_FLAGS = ("--machine_rank", "--machine-rank")


def _count(raw: str | None) -> int | None:
    """``"2"`` -> 2; torchrun's elastic ``"1:4"`` -> 4 (the most it may run); else None."""
    if raw is None:
        return None
    top = raw.rpartition(":")[2]
    return int(top) if top.isdigit() and int(top) > 0 else None


def world_size_of(argv: Sequence[str], nnodes: int | None = None) -> int:
    """Processes a launcher starts over all nodes, 1 for a plain command.

    torchrun's ``--nproc_per_node`` is per node (× ``--nnodes``, else ``nnodes``: the count a
    multi-node run knows from elsewhere, torchrun's ``PET_NNODES``); accelerate's ``--num_processes``
    is already the total over ``--num_machines`` (accelerate divides it per machine). A value
    oomguard cannot count (``--nproc_per_node gpu``/``auto``, a config file) reads as 1.
    """
    torchrun = _count(read_flag(argv, TORCHRUN_NPROC_FLAGS))
    if torchrun is not None:
        return torchrun * (_count(read_flag(argv, TORCHRUN_NNODES_FLAGS)) or nnodes or 1)
    return _count(read_flag(argv, ACCELERATE_NPROC_FLAGS)) or 1


def node_count_of(argv: Sequence[str]) -> str | None:
    """The node count a launcher's own flags state, as written (torchrun ``--nnodes 2`` or ``1:4``,
    accelerate ``--num_machines 2``), or None."""
    return read_flag(argv, TORCHRUN_NNODES_FLAGS) or read_flag(argv, ACCELERATE_NNODES_FLAGS)


def node_rank_of(argv: Sequence[str]) -> str | None:
    """This node's rank as the launcher's flags state it (torchrun ``--node-rank``, accelerate
    ``--machine_rank``), as written, or None. torchrun's c10d rendezvous ignores it for the ranks it
    assigns; oomguard uses it to know which node's supervisor it is."""
    return read_flag(argv, TORCHRUN_NODE_RANK_FLAGS) or read_flag(argv, ACCELERATE_NODE_RANK_FLAGS)


def output_dir_of(argv: Sequence[str]) -> str | None:
    return read_flag(argv, OUTPUT_DIR_FLAGS)
