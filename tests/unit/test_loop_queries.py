"""Queries do not act: a checkpoint survey reads the disk and the journal and changes nothing; the
loop's actions (tidy, set aside) are separate calls that move folders and journal each move."""

from __future__ import annotations

import os

from _loop_fakes import make_spec, write_checkpoint

from oomguard.protocol import EVENTS_JSONL, RunStatus, SetAside, SetAsideReason, read_jsonl
from oomguard.protocol.run_record import RunRecord
from oomguard.supervisor.journal import Journal
from oomguard.supervisor.resume_point import (
    resume_point,
    set_aside,
    survey_checkpoints,
    tidy_checkpoints,
    usable_checkpoints,
)


def _journal(tmp_path):
    spec = make_spec(tmp_path)
    spec.run_dir.mkdir(parents=True)
    record = RunRecord(status=RunStatus.RUNNING, command=list(spec.command), policy="p", policy_file="",
                       requested={}, config={}, checkpoint_dir=str(spec.checkpoint_dir))
    return Journal(spec.run_dir, record), spec.checkpoint_dir


def _listing(*dirs):
    return sorted(str(p) for d in dirs if d.exists() for p in d.rglob("*"))


def test_a_survey_moves_nothing_and_writes_nothing(tmp_path):
    journal, out = _journal(tmp_path)
    good, bad = write_checkpoint(out, 4), write_checkpoint(out, 6)
    (bad / "trainer_state.json").unlink()
    foreign = write_checkpoint(out, 50)
    os.utime(foreign / "trainer_state.json", (1, 1))
    os.utime(foreign, (1, 1))
    before = _listing(out, journal.run_dir)
    survey = survey_checkpoints(journal)
    assert [s.step for s in survey.complete] == [4] and [s.step for s in survey.incomplete] == [6]
    assert [s.step for s in survey.foreign] == [50]
    assert [s.path for s in usable_checkpoints(journal)] == [good] and resume_point(journal) == str(good)
    assert _listing(out, journal.run_dir) == before  # nothing moved, no journal line written

    tidy_checkpoints(journal, survey, journal.events())
    names = [e["event"] for e in read_jsonl(journal.run_dir / EVENTS_JSONL)]
    assert names == ["checkpoint_foreign", "checkpoint_skipped", "checkpoint_moved_aside"]
    assert not bad.exists() and (out / "quarantine" / "checkpoint-6.incomplete-0").is_dir() and foreign.is_dir()
    tidy_checkpoints(journal, survey_checkpoints(journal), journal.events())
    assert len(list(read_jsonl(journal.run_dir / EVENTS_JSONL))) == 3  # a foreign one is reported once


def test_set_aside_moves_what_a_decision_names_and_says_so(tmp_path):
    journal, out = _journal(tmp_path)
    nan, unloadable = write_checkpoint(out, 8), write_checkpoint(out, 6)
    done = set_aside(journal, [SetAside(str(nan), 8, SetAsideReason.AFTER_NAN, 4),
                               SetAside(str(unloadable), 6, SetAsideReason.UNLOADABLE),
                               SetAside(str(out / "checkpoint-99"), 99, SetAsideReason.AFTER_NAN, 4)])
    assert done == [str(nan), str(unloadable)]  # a folder already gone is nothing to move
    aside = out / "quarantine"
    assert (aside / "checkpoint-8").is_dir() and (aside / "checkpoint-6.unloadable-0").is_dir()
    events = list(read_jsonl(journal.run_dir / EVENTS_JSONL))
    assert [e["event"] for e in events] == ["checkpoint_quarantined", "checkpoint_moved_aside"]
    assert events[0]["last_finite_step"] == 4 and "crashed loading it" in events[1]["why"]
