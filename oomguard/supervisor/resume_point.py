"""Which checkpoint a run may resume from: its own complete ones, newest first.

A checkpoint is this run's when a child of it reported saving it, an attempt resumed from it, the
user's own ``--resume_from_checkpoint`` names it, or it was written after the run started (HF's
regular saves are journaled by nobody). Another run's checkpoints in the same output dir are
reported (``checkpoint_foreign``) and never touched; incomplete or unloadable ones of this run are
moved aside, never deleted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .command import RESUME_FLAGS, read_flag
from .checkpoints import (CheckpointScan, checkpoint_step, move_aside, move_aside_incomplete, scan_checkpoints,
                          written_since)
from .journal import AttemptRecord, Journal


def checkpoint_dir(journal: Journal) -> Path | None:
    """Where the child's Trainer saves: its reported output_dir, else its flag (None: unknown yet)."""
    return Path(journal.record.checkpoint_dir) if journal.record.checkpoint_dir else None


def usable_checkpoints(journal: Journal) -> list[CheckpointScan]:
    """This run's complete checkpoints, newest first. Another run's (defect 3: an output dir that
    already held someone's newer ``checkpoint-50``) are reported once and left untouched."""
    events = journal.events()
    is_own = own_test(journal, events)
    own: list[CheckpointScan] = []
    for scan in scan_checkpoints(checkpoint_dir(journal)):
        if is_own(scan):
            own.append(scan)
        else:
            _report_foreign(journal, events, scan)
    for bad in (s for s in own if not s.complete):
        journal.event("checkpoint_skipped", path=str(bad.path), step=bad.step, problems=list(bad.problems))
        _move_aside(journal, bad)  # issue 5
    return [s for s in own if s.complete]


# Events in which a child names a checkpoint it wrote (the fake child and the guard's own saves;
# HF's regular saves are journaled by nobody, so they count by their mtime: written_since).
SAVE_EVENTS = ("checkpoint_saved", "emergency_save", "shutdown_saved", "pressure_save")
RESUME_ANY = ("true", "1", "yes", "last")  # --resume_from_checkpoint True: "the newest in output_dir"


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


def _report_foreign(journal: Journal, events: list[dict[str, Any]], scan: CheckpointScan) -> None:
    """One ``checkpoint_foreign`` event per foreign checkpoint: why it is not resumed from, and how to."""
    path = str(scan.path)
    if any(e.get("event") == "checkpoint_foreign" and e.get("path") == path for e in events):
        return
    journal.event("checkpoint_foreign", path=path, step=scan.step, why=(
        f"{scan.path.name} was written before this run started and no attempt of it saved or resumed "
        "from it: another run's checkpoint, left untouched and never resumed from (to continue from it, "
        "name it in the command with --resume_from_checkpoint, or give this run its own output dir)"))


def _move_aside(journal: Journal, bad: CheckpointScan) -> None:
    """A resumed run would save into the skipped folder again and its stale files could survive."""
    try:
        moved = move_aside_incomplete(bad, len(journal.record.attempts))
    except OSError as exc:
        journal.event("checkpoint_moved_aside", path=str(bad.path), step=bad.step, moved_to=None,
                      error=f"{exc}: move it out of the checkpoint dir by hand before a resume rewrites it")
        return
    journal.event("checkpoint_moved_aside", path=str(bad.path), step=bad.step, moved_to=str(moved))


def own_test(journal: Journal, events: list[dict[str, Any]] | None = None):
    """``scan -> bool``: whether this run wrote (or was told to use) a checkpoint (see usable_checkpoints)."""
    named = _named_checkpoints(journal, journal.events() if events is None else events)
    return lambda scan: _resolved(scan.path) in named or written_since(scan, journal.record.started)


def move_aside_unloadable(journal: Journal, attempt: AttemptRecord) -> None:
    """A checkpoint the child crashed loading (defect 8: damage no scan sees) would crash every
    resume from it: move it aside (never deleted) so the decision takes the next older one."""
    path = Path(attempt.resumed_from) if attempt.resumed_from else None
    if path is None or not path.is_dir() or checkpoint_step(path) is None:
        return
    why = f"attempt {attempt.n} crashed loading it (phase checkpoint_load): damaged in a way the scan cannot see"
    try:
        moved = move_aside(path, f"unloadable-{attempt.n}")
    except OSError as exc:
        journal.event("checkpoint_moved_aside", path=str(path), step=checkpoint_step(path), moved_to=None, why=why,
                      error=f"{exc}: move it out of the checkpoint dir by hand, or the next resume may pick it again")
        return
    journal.event("checkpoint_moved_aside", path=str(path), step=checkpoint_step(path), moved_to=str(moved), why=why)


def resume_point(journal: Journal) -> str | None:
    """The newest complete checkpoint of this run (None: a fresh start)."""
    usable = usable_checkpoints(journal)
    return str(usable[0].path) if usable else None
