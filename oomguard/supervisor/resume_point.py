"""Which checkpoint a run may resume from: its own complete ones, newest first.

A checkpoint is this run's when a child of it reported saving it, an attempt resumed from it, the
user's own ``--resume_from_checkpoint`` names it, or it was written after the run started (HF's
regular saves are journaled by nobody). Another run's checkpoints in the same output dir are
reported (``checkpoint_foreign``) and never touched; incomplete or unloadable ones of this run are
moved aside, never deleted.

Queries do not act: :func:`survey_checkpoints`, :func:`usable_checkpoints` and :func:`resume_point`
read the disk and the journal and change nothing. The loop acts on what they found with
:func:`tidy_checkpoints` (report the foreign, move the incomplete aside) and :func:`set_aside`
(the checkpoints a decision moves out of reach).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..protocol import Event
from ..protocol.run_record import SetAside, SetAsideReason
from .checkpoints import (
    CheckpointScan,
    move_aside,
    move_aside_incomplete,
    quarantine_checkpoint,
    scan_checkpoints,
    written_since,
)
from .command import RESUME_FLAGS, read_flag
from .journal import Journal

__all__ = ["CheckpointSurvey", "RESUME_ANY", "SAVE_EVENTS", "checkpoint_dir", "own_test", "resume_point",
           "set_aside", "survey_checkpoints", "tidy_checkpoints", "usable_checkpoints"]

# Events in which a child names a checkpoint it wrote (the fake child and the guard's own saves;
# HF's regular saves are journaled by nobody, so they count by their mtime: written_since).
SAVE_EVENTS = (Event.CHECKPOINT_SAVED, Event.EMERGENCY_SAVE, Event.SHUTDOWN_SAVED, Event.PRESSURE_SAVE)
RESUME_ANY = ("true", "1", "yes", "last")  # --resume_from_checkpoint True: "the newest in output_dir"


@dataclasses.dataclass(frozen=True)
class CheckpointSurvey:
    """The checkpoint dir as this run sees it: its own checkpoints and another run's, newest first."""

    own: tuple[CheckpointScan, ...] = ()
    foreign: tuple[CheckpointScan, ...] = ()

    @property
    def complete(self) -> list[CheckpointScan]:
        return [s for s in self.own if s.complete]

    @property
    def incomplete(self) -> list[CheckpointScan]:
        return [s for s in self.own if not s.complete]


def checkpoint_dir(journal: Journal) -> Path | None:
    """Where the child's Trainer saves: its reported output_dir, else its flag (None: unknown yet)."""
    return Path(journal.record.checkpoint_dir) if journal.record.checkpoint_dir else None


def survey_checkpoints(journal: Journal, events: list[dict[str, Any]] | None = None) -> CheckpointSurvey:
    """Every ``checkpoint-N`` of the checkpoint dir, this run's apart from another run's (defect 3: an
    output dir that already held someone's newer ``checkpoint-50``). Reads; moves and emits nothing."""
    is_own = own_test(journal, journal.events() if events is None else events)
    scans = scan_checkpoints(checkpoint_dir(journal))
    return CheckpointSurvey(own=tuple(s for s in scans if is_own(s)), foreign=tuple(s for s in scans if not is_own(s)))


def usable_checkpoints(journal: Journal, events: list[dict[str, Any]] | None = None) -> list[CheckpointScan]:
    """This run's complete checkpoints, newest first (a query: nothing moves)."""
    return survey_checkpoints(journal, events).complete


def resume_point(journal: Journal, events: list[dict[str, Any]] | None = None) -> str | None:
    """The newest complete checkpoint of this run (None: a fresh start)."""
    usable = usable_checkpoints(journal, events)
    return str(usable[0].path) if usable else None


def own_test(journal: Journal, events: list[dict[str, Any]] | None = None) -> Callable[[CheckpointScan], bool]:
    """``scan -> bool``: whether this run wrote (or was told to use) a checkpoint (see the module text)."""
    named = _named_checkpoints(journal, journal.events() if events is None else events)
    return lambda scan: _resolved(scan.path) in named or written_since(scan, journal.record.started)


def _named_checkpoints(journal: Journal, events: list[dict[str, Any]]) -> set[str] | _AnyCheckpoint:
    """Checkpoints this run wrote or was told to use: those its children reported saving, those it
    resumed from, and the one the user's own ``--resume_from_checkpoint`` names (relative to our
    cwd, which the child shares)."""
    record = journal.record
    user = read_flag(record.command, RESUME_FLAGS)
    if user is not None and user.strip().lower() in RESUME_ANY:
        return _AnyCheckpoint()  # the user asked for whatever the output dir holds
    paths = [e["path"] for e in events if e.get("event") in SAVE_EVENTS and isinstance(e.get("path"), str)]
    paths += [a.resumed_from for a in record.attempts if a.resumed_from]
    paths += [user] if user else []
    return {_resolved(Path(p)) for p in paths}


class _AnyCheckpoint:
    """Every checkpoint counts as named (the user's ``--resume_from_checkpoint True``)."""

    def __contains__(self, _path: object) -> bool:
        return True


def _resolved(path: Path) -> str:
    return os.path.realpath(path)


# --- actions: the loop takes them on what a survey or a decision found -----------------------
def tidy_checkpoints(journal: Journal, survey: CheckpointSurvey, events: list[dict[str, Any]],
                     *, moved: Iterable[str] = ()) -> None:
    """Report each foreign checkpoint once (why it is not resumed from, and how to), and move this
    run's incomplete ones aside (issue 5: a resumed run would save into the skipped folder again and
    its stale files could survive). ``moved``: paths a decision already set aside."""
    gone = set(moved)
    for scan in survey.foreign:
        _report_foreign(journal, events, scan)
    for bad in (s for s in survey.incomplete if str(s.path) not in gone):
        journal.event(Event.CHECKPOINT_SKIPPED, path=str(bad.path), step=bad.step, problems=list(bad.problems))
        _move_incomplete(journal, bad)


def _report_foreign(journal: Journal, events: list[dict[str, Any]], scan: CheckpointScan) -> None:
    path = str(scan.path)
    if any(e.get("event") == Event.CHECKPOINT_FOREIGN and e.get("path") == path for e in events):
        return
    journal.event(Event.CHECKPOINT_FOREIGN, path=path, step=scan.step, why=(
        f"{scan.path.name} was written before this run started and no attempt of it saved or resumed "
        "from it: another run's checkpoint, left untouched and never resumed from (to continue from it, "
        "name it in the command with --resume_from_checkpoint, or give this run its own output dir)"))


def _move_incomplete(journal: Journal, bad: CheckpointScan) -> None:
    try:
        moved = move_aside_incomplete(bad, len(journal.record.attempts))
    except OSError as exc:
        journal.event(Event.CHECKPOINT_MOVED_ASIDE, path=str(bad.path), step=bad.step, moved_to=None,
                      error=f"{exc}: move it out of the checkpoint dir by hand before a resume rewrites it")
        return
    journal.event(Event.CHECKPOINT_MOVED_ASIDE, path=str(bad.path), step=bad.step, moved_to=str(moved))


def set_aside(journal: Journal, entries: Sequence[SetAside]) -> list[str]:
    """Move the checkpoints a decision sets aside out of a resume's reach (never deleted), one event
    each; returns the paths handled (moved, or failed to move and said so)."""
    done = []
    for entry in entries:
        path = Path(entry.path)
        if not path.is_dir():
            continue
        if entry.reason is SetAsideReason.AFTER_NAN:
            _quarantine(journal, entry, path)
        else:
            _move_unloadable(journal, entry, path)
        done.append(entry.path)
    return done


def _quarantine(journal: Journal, entry: SetAside, path: Path) -> None:
    reason = f"written after the last finite step {entry.last_good_step}: its weights may hold the NaN update"
    try:
        target = quarantine_checkpoint(path)
    except OSError as exc:
        journal.event(Event.CHECKPOINT_MOVED_ASIDE, path=str(path), step=entry.step, moved_to=None, why=reason,
                      error=f"{exc}: move it out of the checkpoint dir by hand, or a resume may pick it")
        return
    journal.event(Event.CHECKPOINT_QUARANTINED, step=entry.step, path=str(path), moved_to=str(target),
                  last_finite_step=entry.last_good_step, reason=reason)


def _move_unloadable(journal: Journal, entry: SetAside, path: Path) -> None:
    """A checkpoint the child crashed loading (defect 8: damage no scan sees) would crash every
    resume from it: moved aside so the decision's older one is taken."""
    n = len(journal.record.attempts)
    why = f"attempt {n} crashed loading it (phase checkpoint_load): damaged in a way the scan cannot see"
    try:
        moved = move_aside(path, f"unloadable-{n}")
    except OSError as exc:
        journal.event(Event.CHECKPOINT_MOVED_ASIDE, path=str(path), step=entry.step, moved_to=None, why=why,
                      error=f"{exc}: move it out of the checkpoint dir by hand, or the next resume may pick it again")
        return
    journal.event(Event.CHECKPOINT_MOVED_ASIDE, path=str(path), step=entry.step, moved_to=str(moved), why=why)
