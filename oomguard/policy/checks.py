"""Consistency checks a schema cannot express: unknown knobs, rungs that can never
help, bf16 where the GPU class has none, broken ``then:`` chains, bad flags.

Each check returns ``(key.path, problem)`` pairs; ``loader`` adds the file name.
Checks run on whichever sections validated, so one pass reports every problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Iterator

from pydantic import TypeAdapter, ValidationError

from oomguard import knobs as registry
from oomguard.policy.ladder import apply_rung
from oomguard.policy.schema import (
    Capabilities,
    FlagNames,
    HalveBatchRung,
    Knobs,
    Ladders,
    Limits,
    Match,
    QuantileStepRung,
    Rung,
    ScaleRung,
    SetRung,
    StepDownRung,
)
from oomguard.protocol import KNOB_PRECISION, FailureKind

__all__ = ["Sections", "check_sections"]

Problem = tuple[str, str]


@dataclass(frozen=True)
class Sections:
    """The policy sections that passed the schema (None: missing or invalid)."""

    knobs: Knobs | None = None
    ladders: Ladders | None = None
    capabilities: Capabilities | None = None
    match: Match | None = None
    limits: Limits | None = None
    flags: dict[str, FlagNames] | None = None


def check_sections(s: Sections) -> list[Problem]:
    problems: list[Problem] = []
    if s.match is not None:
        problems += _match_problems(s.match)
    if s.limits is not None:
        problems += _limits_problems(s.limits)
    bf16 = s.capabilities.bf16 if s.capabilities is not None else True
    if s.knobs is not None:
        start = s.knobs.model_dump()
        if not bf16 and start[KNOB_PRECISION] == "bf16":
            problems.append(("knobs.precision", "precision bf16 but capabilities.bf16 is false "
                             "(this GPU class has no bf16) (got bf16, expected fp16 or fp32)"))
        problems += _start_value_problems(start)
        if s.ladders is not None:
            problems += _ladders_problems(s.ladders, start, bf16)
        if s.flags is not None:
            problems += _flags_problems(s.flags, start)
    return problems


def _match_problems(match: Match) -> Iterator[Problem]:
    for i, pattern in enumerate(match.name):
        try:
            re.compile(pattern)
        except re.error as e:
            yield f"match.name.{i}", f"invalid regex: {e} (got {pattern!r}, expected a Python regex)"
    mem = match.memory_gib
    if mem is not None and mem.max is not None and mem.min > mem.max:
        yield "match.memory_gib", f"min is above max (got min {mem.min}, max {mem.max}, expected min <= max)"


def _limits_problems(limits: Limits) -> Iterator[Problem]:
    b = limits.backoff
    if b.max_s < b.initial_s:
        yield ("limits.backoff.max_s", f"max_s is below initial_s {b.initial_s} "
               f"(got {b.max_s}, expected >= {b.initial_s})")


def _ladders_problems(ladders: Ladders, start: dict[str, Any], bf16: bool) -> Iterator[Problem]:
    if not ladders.cuda_oom.rungs:
        yield ("ladders.cuda_oom.rungs", "the cuda_oom ladder is empty; add at least one rung, "
               "e.g. {op: halve_batch, resume: safe} (got [], expected >= 1 rung)")
    yield from _then_problems(ladders)
    for kind in FailureKind:
        ladder = ladders.get(kind)
        if ladder is not None and ladder.rewarm_steps and kind is not FailureKind.NAN_LOSS:
            yield (f"ladders.{kind.value}.rewarm_steps", "only the nan_loss ladder re-enters warm-up after a "
                   f"rollback; move it there or drop it (got {ladder.rewarm_steps})")
        for i, rung in enumerate(ladder.rungs if ladder else ()):
            for key, text in _rung_problems(rung, start, bf16):
                yield f"ladders.{kind.value}.rungs.{i}{key}", text


def _then_problems(ladders: Ladders) -> Iterator[Problem]:
    for kind in FailureKind:
        ladder = ladders.get(kind)
        if ladder is None or ladder.then is None:
            continue
        path = f"ladders.{kind.value}.then"
        if ladders.get(ladder.then) is None:
            yield path, f"no {ladder.then.value} ladder to continue with; add it or drop then (got {ladder.then.value})"
            continue
        seen, current = [kind], ladder.then
        while current is not None and current not in seen:
            seen.append(current)
            nxt = ladders.get(current)
            current = nxt.then if nxt else None
        if current is not None:
            loop = " -> ".join(k.value for k in seen + [current])
            yield path, f"then: makes a loop ({loop}); end the chain at one ladder (got {ladder.then.value})"


def _rung_problems(rung: Rung, start: dict[str, Any], bf16: bool) -> list[Problem]:
    knob = rung.knob
    if knob not in start:
        return [(".knob", f"unknown knob {knob!r}; declare it under knobs first "
                 f"(got {knob}, expected one of: {', '.join(start)})")]
    problems = _value_problems(rung, start[knob], bf16)
    if not problems and knob != KNOB_PRECISION and apply_rung(rung, start) is None:
        problems.append(("", f"applied to the starting {knob} {start[knob]!r} it changes nothing, "
                         f"this rung can never help (got op {rung.op.value})"))
    return problems


# The rungs that free memory without retraining differently (issue 18 item 6): their resume class is the
# registry's, so a policy cannot call an optimizer change (quantized states, moments reset) "safe".
FREE_RUNG_KNOBS = (registry.GRADIENT_CHECKPOINTING, registry.ACTIVATION_OFFLOAD, registry.OPTIM,
                   registry.EXPANDABLE_SEGMENTS)


def _start_value_problems(start: dict[str, Any]) -> Iterator[Problem]:
    for knob, value in start.items():
        why = registry.value_problem(knob, value)
        if why:
            yield f"knobs.{knob}", why


def _free_rung_problems(rung: Rung) -> list[Problem]:
    """A free rung is a ``set`` of a valid value, with the registry's resume class."""
    knob = rung.knob
    if knob not in FREE_RUNG_KNOBS:
        return []
    if not isinstance(rung, SetRung):
        return [(".op", f"{knob} takes op set (got op {rung.op.value}, expected set)")]
    why = registry.value_problem(knob, rung.value)
    if why:
        return [(".value", why)]
    want = registry.spec(knob).resume.value
    if rung.resume.value != want:
        return [(".resume", f"a {knob} change resumes as {want} ({registry.spec(knob).doc or 'see the registry'}) "
                 f"(got resume: {rung.resume.value}, expected resume: {want})")]
    return []


def _value_problems(rung: Rung, current: Any, bf16: bool) -> list[Problem]:
    knob, out = rung.knob, _free_rung_problems(rung)
    if out:
        return out
    if isinstance(rung, SetRung):
        out += _type_problems(".value", knob, rung.value, current)
        # exempt precision: a command's --fp16/--bf16 sets its start, and "bf16 on NaN" must
        # still fire for a run that asked for fp16 under a bf16 policy
        if not out and rung.value == current and knob != KNOB_PRECISION:
            out.append((".value", f"sets {knob} to its starting value, this rung can never help "
                        f"(got {rung.value!r}, expected a value other than {current!r})"))
        if knob == KNOB_PRECISION and rung.value == "bf16" and not bf16:
            out.append((".value", "sets precision bf16 but capabilities.bf16 is false "
                        "(got bf16, expected fp16 or fp32)"))
        return out
    if not _is_number(current):
        return [(".knob", f"op {rung.op.value} needs a numeric knob, {knob} starts as "
                 f"{type(current).__name__} (got {current!r}, expected a number; "
                 f"write floats with a dot, e.g. 2.0e-4)")]
    if isinstance(rung, StepDownRung):
        for j, v in enumerate(rung.values):
            out += _type_problems(f".values.{j}", knob, v, current)
        if not out and not any(v < current for v in rung.values):
            out.append((".values", f"no value below the starting {knob} {current}, this rung can "
                        f"never help (got {rung.values}, expected a value < {current})"))
        return out
    if isinstance(rung, (ScaleRung, HalveBatchRung, QuantileStepRung)) and rung.floor is not None:
        out += _type_problems(".floor", knob, rung.floor, current)
        if not out and rung.floor >= current:
            out.append((".floor", f"floor {rung.floor} is not below the starting {knob} {current}, "
                        f"this rung can never help (got {rung.floor}, expected < {current})"))
    return out


def _type_problems(key: str, knob: str, value: Any, current: Any) -> list[Problem]:
    """``value`` must be a valid value of ``knob`` (core: schema type; declared: start's type)."""
    field = Knobs.model_fields.get(knob)
    if field is not None:
        adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)]
                              if field.metadata else field.annotation)
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            return [(key, f"not a valid {knob}: {e.errors()[0]['msg']} (got {value!r})")]
        return []
    same = type(value) is type(current) or (_is_number(value) and isinstance(current, float))
    if not same:
        return [(key, f"not a valid {knob}: its starting value is {type(current).__name__} "
                 f"(got {type(value).__name__} {value!r}, expected {type(current).__name__})")]
    return []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flags_problems(flags: dict[str, FlagNames], start: dict[str, Any]) -> Iterator[Problem]:
    for knob, spec in flags.items():
        path = f"flags.{knob}"
        if knob not in start:
            yield path, f"unknown knob {knob!r}; declare it under knobs (expected one of: {', '.join(start)})"
        if not spec.names:
            yield f"{path}.names", "needs at least one extra spelling (got [], expected e.g. ['--" + knob + "'])"
        for name in spec.names:
            if not name.startswith("-"):
                yield path, f"flag {name!r} does not start with '-' (got {name!r}, expected e.g. '--{knob}')"
