"""The policy's ``limits.nan_skip_steps`` reaches the child's NaN guard (it was read by nothing before).

A wrapped, unchanged HF Trainer script with one injected non-finite loss: with ``nan_skip_steps: 1`` the
guard drops that update and trains on in the same attempt; with the shipped bf16/fp32 value 0 it stops
the child at once and the nan ladder rolls back. Checked from the child's checkpoints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from _wrap_run import oomguard_run

HERE = Path(__file__).resolve().parent


def _policy(tmp_path: Path, skip: int) -> Path:
    policy = yaml.safe_load((HERE / "policies" / "wrap_nan.yaml").read_text())
    policy["limits"]["nan_skip_steps"] = skip
    path = tmp_path / f"skip{skip}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["event"] == name]


def test_one_skipped_update_trains_on_in_the_same_attempt(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    oomguard_run(run_dir, _policy(tmp_path, 1), sys.executable, str(HERE / "_wrap_trainer_script.py"), str(out),
                 "6", inject="nan@step=3")
    run = json.loads((run_dir / "run.json").read_text())
    assert len(run["attempts"]) == 1 and run["status"] == "succeeded"
    assert [(e["step"], e["action"], e["skipped"]) for e in _events(run_dir, "nan_detected")] == [(3, "skip", 1)]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 6 and all(x == x for x in losses[3:])  # finite after the skipped update


def test_without_skips_the_nan_stops_the_child_and_the_ladder_rolls_back(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    oomguard_run(run_dir, _policy(tmp_path, 0), sys.executable, str(HERE / "_wrap_trainer_script.py"), str(out),
                 "6", inject="nan@step=3")
    run = json.loads((run_dir / "run.json").read_text())
    assert len(run["attempts"]) == 2 and run["attempts"][0]["failure"]["kind"] == "nan_loss"
    assert [e["action"] for e in _events(run_dir, "nan_detected")] == ["stop"]
