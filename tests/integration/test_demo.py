"""`oomguard demo`: the real recipe under the real supervisor, an OOM and a NaN, to the end.

This is the project's main job (README's first command). On CPU the OOM is injected as a real
`torch.OutOfMemoryError` inside the step; everything else is real: 4-bit training, the guard's
emergency checkpoint, the supervisor's rung and resume, the NaN guard and rollback.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _shared import shared_demo

from oomguard.protocol import read_jsonl

MAX_STEPS = 24


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run, shared with test_report_html.py (one run of `oomguard demo` per test session)."""
    code, stderr, run_dir = shared_demo(tmp_path_factory, MAX_STEPS)
    return subprocess.CompletedProcess(["oomguard", "demo"], code, "", stderr), run_dir


@pytest.mark.slow
def test_demo_exits_0_and_prints_the_summary_root_cause_first(demo):
    r, run_dir = demo
    assert r.returncode == 0, r.stderr[-4000:]
    summary = r.stderr[r.stderr.rindex("oomguard: run finished"):]
    lines = summary.splitlines()
    assert lines[1].startswith("root cause: cuda_oom after step 6")
    assert "requested (as the child ran it) → final:" in summary and "effective batch" in summary
    # only changes the child showed are listed as made
    assert "(changed)" in summary and "not verified" not in summary and "not applied" not in summary


@pytest.mark.slow
def test_demo_journal_shows_both_failures_rungs_and_resumes(demo):
    _, run_dir = demo
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "succeeded"
    kinds = [(a["failure"] or {}).get("kind") for a in run["attempts"]]
    assert kinds == ["cuda_oom", "nan_loss", None]
    oom, nan, last = run["attempts"]
    assert oom["decision"]["rung"]["ladder"] == "cuda_oom" and oom["decision"]["changes"]
    assert nan["decision"]["rung"]["ladder"] == "nan_loss" and nan["decision"]["changes"]
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    for needed in ("fault_injected", "emergency_save", "nan_detected", "decision", "data_profile", "memory"):
        assert needed in events, needed


@pytest.mark.slow
def test_no_completed_step_is_lost_or_repeated_across_the_oom(demo):
    _, run_dir = demo
    run = json.loads((run_dir / "run.json").read_text())
    oom, nan, last = run["attempts"]
    # the OOM hit the forward of step 7: step 6 was the last completed one, the guard saved it,
    # and the next attempt resumed exactly there
    assert oom["failure"]["step"] == 6 and oom["failure"]["phase"] == "forward_backward"
    assert nan["resumed_from"].endswith("checkpoint-6")
    error = json.loads((run_dir / "attempts" / "001" / "error.json").read_text())
    assert error["saved_checkpoint"].endswith("checkpoint-6")
    # the final trainer state reaches max_steps and logs every step exactly once
    final = run_dir / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json"
    state = json.loads(final.read_text())
    assert state["global_step"] == MAX_STEPS
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged == list(range(1, MAX_STEPS + 1))


@pytest.mark.slow
def test_nan_rolls_back_to_a_checkpoint_at_or_before_it_never_after(demo):
    _, run_dir = demo
    run = json.loads((run_dir / "run.json").read_text())
    nan, last = run["attempts"][1], run["attempts"][2]
    k = nan["failure"]["step"]  # last completed step before the non-finite one
    resumed = int(last["resumed_from"].rpartition("-")[2])
    assert resumed <= k
    nan_time = nan["ended"]
    ckpt = Path(last["resumed_from"])
    assert (ckpt / "trainer_state.json").stat().st_mtime < nan_time  # written before the NaN


@pytest.mark.slow
def test_the_nan_rungs_learning_rate_is_in_force_after_the_rollback(demo):
    """HF restores scheduler.pt/optimizer.pt over a new learning rate: the rung must still take
    effect. Checked from the child's own trainer_state.json, not from the journal."""
    _, run_dir = demo
    run = json.loads((run_dir / "run.json").read_text())
    nan, last = run["attempts"][1], run["attempts"][2]
    change = next(c for c in nan["decision"]["changes"] if c["knob"] == "learning_rate")
    assert change["new"] < change["old"]
    resumed = int(last["resumed_from"].rpartition("-")[2])
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    before = [h["learning_rate"] for h in state["log_history"] if "loss" in h and h["step"] <= resumed]
    after = [h["learning_rate"] for h in state["log_history"] if "loss" in h and h["step"] > resumed]
    assert after and all(abs(lr - change["new"]) <= 1e-12 for lr in after), after
    assert before[-1] == pytest.approx(change["old"])
    assert last["verified"]["learning_rate"] == "verified"
