"""Issue 14 item 4: sample-exact resume after a packed length change for a WRAPPED TRL script, not only
the built-in recipe: the bootstrap captures the raw ``train_dataset`` when the script builds its
``SFTTrainer``, so the guard can map the rows the ledger recorded at 128 tokens to their examples.

An uninterrupted run and one with a ``cuda_oom`` injected in step 5, whose policy halves
``max_seq_length`` (``policies/wrap_packed.yaml``; the script sets ``max_length=128`` in its code, so the
rung reaches it in-process). Over the one epoch, the resumed run must consume every example exactly
once — the same multiset as the uninterrupted run — with the unseen examples re-packed at 64 first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _wrap_packed_script as script
import pytest
from _wrap_run import oomguard_run

from oomguard import protocol
from oomguard.guard.resume.ledger import ledger_file, read_ledger
from oomguard.guard.resume.packed import packed_rows, rows_mismatch, tokenized_examples
from oomguard.recipes import default

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
POLICY = HERE / "policies" / "wrap_packed.yaml"
EXAMPLES = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(default.default_dataset_path().read_text().splitlines()[:EXAMPLES]) + "\n")
    return path


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in protocol.read_jsonl(run_dir / protocol.EVENTS_JSONL) if e.get("event") == name]


def rows_at(model_dir: Path, data: Path, length: int, out: Path) -> list[tuple[int, ...]]:
    """Example ids per packed row at ``length``, checked token by token against TRL's real rows."""
    trainer = script.build(str(model_dir), str(data), str(out), max_length=length)
    tokens = tokenized_examples(trainer, script.load(str(data)))
    rows = packed_rows(tokens, length, trainer.args)
    assert rows_mismatch(rows, tokens, trainer.train_dataset, length) is None
    return rows


def run(run_dir: Path, out: Path, model_dir: Path, data: Path, inject: str | None) -> dict:
    oomguard_run(run_dir, POLICY, sys.executable, str(HERE / "_wrap_packed_script.py"), str(model_dir), str(data),
                 str(out), inject=inject)
    return json.loads((run_dir / "run.json").read_text())


def test_wrapped_packed_script_resumes_on_exactly_the_unseen_examples(tmp_path, model_dir, data):
    run(tmp_path / "straight-run", tmp_path / "straight", model_dir, data, None)
    record = run(tmp_path / "run", tmp_path / "out", model_dir, data, "cuda_oom@step=5")

    first, second = record["attempts"]
    assert first["failure"]["kind"] == "cuda_oom" and second["failure"] is None
    assert second["knobs"]["max_seq_length"] == 64
    [moved] = events(tmp_path / "run", "packed_position_reindexed")
    assert not events(tmp_path / "run", "resume_position_inexact")
    at128, at64 = (rows_at(model_dir, data, n, tmp_path / f"map{n}") for n in (128, 64))
    assert moved["max_length"] == [128, 64] and moved["rows"] == len(at64)
    assert moved["examples_seen_in_epoch"] + moved["remaining_in_epoch"] == EXAMPLES

    resumed_rows = {moved["first_rows_at"] + k: tuple(r) for k, r in enumerate(moved["first_rows"])}
    want = [i for e in read_ledger(ledger_file(tmp_path / "straight-run")) for r in e.samples for i in at128[r]]
    got = []
    for e in read_ledger(ledger_file(tmp_path / "run")):
        mapping = at128 if e.attempt == 1 else {**dict(enumerate(at64)), **resumed_rows}
        got.extend(i for r in e.samples for i in mapping[r])
    assert sorted(want) == list(range(EXAMPLES))  # the reference: one epoch, every example once
    assert sorted(got) == sorted(want), f"twice: {sorted(set(i for i in got if got.count(i) > 1))}"
    first_resumed = [i for e in read_ledger(ledger_file(tmp_path / "run")) if e.attempt == 2 for r in e.samples
                     for i in resumed_rows.get(r, ())]
    assert first_resumed, "the unseen examples were not trained first"
