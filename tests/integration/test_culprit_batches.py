"""Culprit batches end to end (issue 19), one real run of an unchanged HF Trainer script on CPU, checked from
the child's own files (training_args.bin, trainer_state.json, the ledger), not from oomguard's journal.

The script (``_wrap_culprit_script.py``) trains 6 steps of batch 4 x accumulation 2 over 48 rows in order;
rows 12-15 are twice as long (micro-batch 2 of step 2). Two data-dependent faults: a CUDA OOM on any
micro-batch over 40 tokens (only the long one: 4 x 12 = 48) and a NaN on any micro-batch holding row 30.

- attempt 1: OOM at step 2 -> the batch is the culprit (48 tokens, 2x the largest that fit), same knobs,
  step 2 split by 2 from checkpoint-1;
- attempt 2: step 2 trains as 4 chunks of 2 rows (the child's culprit_split event, verified), then NaN at
  step 4 -> a first NaN: the nan_loss ladder (LR x0.5), rollback to checkpoint-2;
- attempt 3: NaN again at step 4 with the same rows -> rows 28-31 (the non-finite micro-batch) quarantined;
- attempt 4: step 4 trains without them (skipped in the ledger, verified) and the run finishes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from _wrap_run import BIN, ROOT, oomguard_run

from oomguard.guard.resume.ledger import ledger_file, read_ledger

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("culprit")
    policy = yaml.safe_load((HERE / "policies" / "wrap_nan.yaml").read_text())
    policy["knobs"]["gradient_accumulation_steps"] = 2
    policy["limits"]["max_attempts"] = 6
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    run_dir, out = tmp / "run", tmp / "out"
    oomguard_run(run_dir, tmp / "policy.yaml", sys.executable, str(HERE / "_wrap_culprit_script.py"), str(out), "6",
                 inject="cuda_oom@tokens=40;nan@row=30")
    return run_dir, out


def _events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["event"] == name]


@pytest.mark.slow
def test_the_culprit_step_is_split_and_every_other_step_keeps_the_users_batch(run):
    run_dir, out = run
    record = json.loads((run_dir / "run.json").read_text())
    first, second, third, fourth = record["attempts"]
    assert record["status"] == "succeeded"
    assert first["decision"]["changes"] == [] and first["decision"]["culprit"] == {"split": {"2": 2}, "quarantine": []}
    assert "the batch is the culprit" in first["decision"]["reason"]
    assert second["verified"]["culprit_split@2"] == "verified"  # from the child's event (Trust rule 3)
    [split] = _events(run_dir, "culprit_split")
    assert (split["attempt"], split["step"], split["factor"], split["micro_batches"], split["chunks"]) == (2, 2, 2, 2, 4)
    # the child's own files: the user's batch and accumulation, 6 steps, in every checkpoint
    args = torch.load(out / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["global_step"], state["train_batch_size"]) == (6, 4)
    # the ledger: 8 rows a step, 2 micro-batches a step, none over the OOM's 40 tokens at once
    steps = read_ledger(ledger_file(run_dir))
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6] and all(len(s.samples) == 8 for s in steps)
    assert all(len(s.tokens) == 2 for s in steps)
    assert steps[1].tokens == (12, 24) and steps[1].samples == tuple(range(8, 16))  # step 2: same rows, split
    assert len([f for f in _events(run_dir, "fault_injected") if f.get("tokens")]) == 1  # the split step passes


@pytest.mark.slow
def test_a_recurring_nan_batch_is_quarantined_listed_and_every_other_row_trains_exactly_once(run):
    run_dir, _ = run
    record = json.loads((run_dir / "run.json").read_text())
    _, second, third, fourth = record["attempts"]
    assert [c["knob"] for c in second["decision"]["changes"]] == ["learning_rate"]  # a first NaN: the ladder
    assert third["decision"]["culprit"]["quarantine"] == [28, 29, 30, 31] and third["decision"]["changes"] == []
    assert fourth["culprit"]["quarantine"] == [28, 29, 30, 31] and fourth["verified"]["quarantine"] == "verified"
    [skipped] = _events(run_dir, "rows_quarantined")
    assert (skipped["attempt"], skipped["step"], skipped["rows"]) == (4, 4, [28, 29, 30, 31])
    steps = read_ledger(ledger_file(run_dir))
    assert [s.skipped for s in steps if s.skipped] == [(28, 29, 30, 31)] and steps[3].tokens == (24, 0)
    assert Counter(r for s in steps for r in s.samples) == Counter(range(48))  # the position counts them
    assert Counter(r for s in steps for r in s.trained) == Counter(set(range(48)) - {28, 29, 30, 31})
    report = subprocess.run([str(BIN / "oomguard"), "report", str(run_dir)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60).stdout
    assert "quarantined rows (never trained, skipped in the ledger; verified): [28, 29, 30, 31]" in report
    assert "step 2 ×2 (verified)" in report and "change not applied" not in report
    doc = json.loads(subprocess.run([str(BIN / "oomguard"), "report", str(run_dir), "--json"], capture_output=True,
                                    text=True, cwd=ROOT, timeout=60).stdout)
    assert doc["culprits"] == {"split": [{"step": 2, "factor": 2}], "quarantined_rows": [28, 29, 30, 31]}
