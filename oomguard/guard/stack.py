"""The child's training stack against the range oomguard is tested in, said once per attempt.

The guard runs inside whatever stack the user's trainer pins. :func:`check_stack` reads the installed
versions (package metadata: nothing is imported), compares them with
:data:`~oomguard.guard.trainer_patches.TESTED_RANGE` and :data:`~oomguard.guard.trainer_patches.FLOOR`,
and asks :func:`~oomguard.guard.trainer_patches.missing_loaded` which private internals this stack
lacks. The answer is one ``guard_stack`` event (rank 0) and, when anything is off, one warning a run:
the run goes on, and the parts that cannot work say so (``guard_degraded``) instead of crashing it.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from typing import Mapping

from oomguard.guard import trainer_patches as internals
from oomguard.guard.notices import warn_once
from oomguard.guard.writer import EventWriter
from oomguard.protocol import Event

__all__ = ["StackCheck", "check_stack", "installed_versions", "journal_stack", "outside_range"]

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


def installed_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{package: version}`` of those installed (distribution metadata; no import)."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def outside_range(versions: Mapping[str, str], tested: Mapping[str, tuple[str, str]] = internals.TESTED_RANGE,
                  floor: Mapping[str, str] = internals.FLOOR) -> list[str]:
    """One line per package outside the tested range (below the floor: unsupported). Pure."""
    lines = []
    for name, version in sorted(versions.items()):
        if name not in tested:
            continue
        low, high = tested[name]
        have = internals.minor_version(version)
        if name in floor and have < internals.minor_version(floor[name]):
            lines.append(f"{name} {version} is below oomguard's floor {floor[name]}: unsupported, parts of the "
                         f"guard may not work (tested: {low}-{high})")
        elif have < internals.minor_version(low):
            lines.append(f"{name} {version} is older than the tested {low}-{high}")
        elif have > internals.minor_version(high):
            lines.append(f"{name} {version} is newer than the tested {low}-{high}")
    return lines


@dataclasses.dataclass(frozen=True)
class StackCheck:
    versions: dict[str, str]
    outside: list[str]
    missing: list[str]  # "owner.name: problem"
    degraded: list[str]  # "where: why" of each missing internal: what the guard cannot do here

    @property
    def tested(self) -> bool:
        return not self.outside and not self.missing

    def summary(self) -> str:
        said = "; ".join(self.outside + [f"missing {m}" for m in self.missing])
        lost = "; ".join(self.degraded)
        return (f"oomguard: this training stack is outside what oomguard is tested with ({said})"
                + (f"; without those internals: {lost}" if lost else "")
                + ". The run goes on; see docs/COMPATIBILITY.md")


def check_stack() -> StackCheck:
    versions = installed_versions()
    gaps = internals.missing_loaded(internals.INTERNALS)
    return StackCheck(versions=versions, outside=outside_range(versions), missing=[p for _, p in gaps],
                      degraded=sorted({f"{i.where}: {i.why}" for i, _ in gaps}))


def journal_stack(journal: EventWriter, attempt: int, rank: int) -> StackCheck | None:
    """The ``guard_stack`` event (rank 0) and, if the stack is not a tested one, one warning a run.
    Never raises: a failed check is itself said and the run goes on."""
    if rank != 0:
        return None
    try:
        check = check_stack()
    except Exception as exc:  # the check must not be what stops a run
        journal.emit(Event.GUARD_DEGRADED.value, part="stack check", error=f"{type(exc).__name__}: {exc}",
                     consequence="the stack's versions were not compared with the tested range")
        return None
    journal.emit(Event.GUARD_STACK.value, attempt=attempt, versions=check.versions, tested=check.tested,
                 outside=check.outside, missing=check.missing, degraded=check.degraded)
    if not check.tested:
        warn_once("stack:" + ",".join(f"{k}={v}" for k, v in sorted(check.versions.items())), check.summary(),
                  stacklevel=2)
    return check
