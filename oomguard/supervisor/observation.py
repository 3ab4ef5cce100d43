"""What the child really runs, and whether oomguard's changes landed. Pure.

The in-child bootstrap reports its recipe twice per attempt (``recipe_observed``): as the Trainer
is built (after oomguard's orders), and "in force" at train begin, after a checkpoint's optimizer
and scheduler state was loaded. From those the supervisor takes (Trust rules 2 and 3):
- ``requested``: what attempt 1 ran; the ladder starts there;
- the capabilities: which knobs a change can reach, and how (a flag the command has, or in-process);
- per ordered knob: verified (the child shows the value), not applied (it shows another), or
  unverified (the child never reported, e.g. it is not a Trainer or died before training began).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Iterable, Mapping

from ..knobs import LEARNING_RATE, MAX_SEQ_LENGTH, PRECISION, Delivery
from ..protocol import EVENT_RECIPE_OBSERVED, STAGE_BUILT, STAGE_IN_FORCE

__all__ = ["Check", "NOT_APPLIED", "Observation", "UNVERIFIED", "VERIFIED", "Verdict", "capabilities",
           "observation_of", "same", "verify"]


class Verdict(str, enum.Enum):
    """What the child shows of an ordered knob change (``AttemptRecord.verified`` values)."""

    VERIFIED = "verified"  # the child shows the ordered value
    NOT_APPLIED = "not_applied"  # it shows another
    UNVERIFIED = "unverified"  # it never reported the knob


VERIFIED, NOT_APPLIED, UNVERIFIED = Verdict.VERIFIED, Verdict.NOT_APPLIED, Verdict.UNVERIFIED


@dataclasses.dataclass(frozen=True)
class Observation:
    """Rank 0's reports of one attempt (either may be missing)."""

    built: Mapping[str, Any] | None = None
    in_force: Mapping[str, Any] | None = None

    @property
    def seen(self) -> bool:
        return self.built is not None or self.in_force is not None

    @property
    def knobs(self) -> dict[str, Any]:
        """The knob values, those in force over those at construction."""
        return {**((self.built or {}).get("knobs") or {}), **((self.in_force or {}).get("knobs") or {})}

    @property
    def fields(self) -> dict[str, str]:
        return {**((self.built or {}).get("fields") or {}), **((self.in_force or {}).get("fields") or {})}

    @property
    def output_dir(self) -> str | None:
        return (self.in_force or {}).get("output_dir") or (self.built or {}).get("output_dir")

    def payload(self) -> dict[str, Any] | None:
        """What run.json keeps of it: the freshest report plus the merged knobs."""
        base = self.in_force or self.built
        return None if base is None else {**base, "knobs": self.knobs, "fields": self.fields}


@dataclasses.dataclass(frozen=True)
class Check:
    knob: str
    status: Verdict
    expected: Any
    observed: Any
    why: str


def observation_of(events: Iterable[Mapping[str, Any]], attempt: int, since: float) -> Observation:
    """The newest rank-0 ``recipe_observed`` of each stage written by ``attempt``."""
    found: dict[str, Mapping[str, Any]] = {}
    for e in events:
        if e.get("event") != EVENT_RECIPE_OBSERVED or e.get("rank", 0) != 0:
            continue
        if e.get("attempt") != attempt or e.get("time", 0) < since:
            continue
        found[e.get("stage", STAGE_BUILT)] = e
    return Observation(built=found.get(STAGE_BUILT), in_force=found.get(STAGE_IN_FORCE))


def capabilities(observation: Observation, flags: Mapping[str, str], *, in_process: bool,
                 placeholders: Iterable[str] = ()) -> dict[str, str]:
    """knob -> how a change of it reaches the child: a flag it has (named), a ``{knob}``
    placeholder, or in-process on the field the child reported."""
    out = {k: f"{Delivery.FLAG.value} {flag}" for k, flag in flags.items()}
    out.update({k: Delivery.PLACEHOLDER.value for k in placeholders})
    if in_process:
        for knob, field in observation.fields.items():
            out.setdefault(knob, f"{Delivery.IN_PROCESS.value} {field}")
    return out


def verify(orders: Mapping[str, Any], observation: Observation, *, longest_row: int | None = None) -> list[Check]:
    """One Check per ordered knob, against what the child reported."""
    seen = observation.knobs
    out = []
    for knob, want in orders.items():
        if knob in seen:
            ok = same(knob, want, seen[knob])
            out.append(Check(knob, VERIFIED if ok else NOT_APPLIED, want, seen[knob],
                             "" if ok else f"the child runs {knob}={seen[knob]!r}, not {want!r}"))
        elif knob == MAX_SEQ_LENGTH and longest_row is not None:
            ok = longest_row <= int(want)
            out.append(Check(knob, VERIFIED if ok else NOT_APPLIED, want, longest_row,
                             "" if ok else f"the child's longest training row is {longest_row} tokens, "
                                           f"over the ordered {want}"))
        else:
            why = ("the child never reported its recipe (no Trainer oomguard could read)" if not observation.seen
                   else f"the child's recipe has no {knob} oomguard can read")
            out.append(Check(knob, UNVERIFIED, want, None, why))
    return out


def same(knob: str, want: Any, seen: Any) -> bool:
    if knob == PRECISION or isinstance(want, str) or isinstance(seen, str):
        return str(want) == str(seen)
    try:
        a, b = float(want), float(seen)
    except (TypeError, ValueError):
        return want == seen
    tol = 1e-6 if knob == LEARNING_RATE else 1e-9
    return math.isclose(a, b, rel_tol=tol, abs_tol=0.0)

